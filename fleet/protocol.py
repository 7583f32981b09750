"""The agent protocol's messages, typed: one JSON object a line, each with the protocol version `v` and a
`type`. The dashboard sends `subscribe` and `request`; the agent sends `hello`, `snapshot` and
`response`. Both sides build and read them through these models, so a field is spelled once.
A message from the other side that does not fit is refused with what was wrong, never acted on.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args

from pydantic import (BaseModel, ConfigDict, Field, StrictInt, TypeAdapter, ValidationError, field_validator,
                      model_validator)

from fleet.protocol_fields import (AdapterRef, Force, GpuList, Ident, LineCount, LogKind, ModelName, OldAdapter, Partition,
                                   Port, ProfileName, ServedAs, ServerId, SlurmGpus, SlurmTime, SpecName)

# 2: server and job records carry workdir, slurm and (jobs) outputs beside their spec, no longer inside it
PROTOCOL_VERSION = 2
MIN_INTERVAL_S, MAX_INTERVAL_S = 0.2, 60.0  # an agent clamps a subscription's interval to these


class Op(str, Enum):
    """Every request a dashboard may send an agent; the agent answers these and nothing else."""

    PING = "ping"
    LIST_SERVERS = "list_servers"
    START_SERVER = "start_server"
    STOP_SERVER = "stop_server"
    LIST_JOBS = "list_jobs"
    START_JOB = "start_job"
    CANCEL_JOB = "cancel_job"
    RESUME_JOB = "resume_job"
    LIST_ADAPTERS = "list_adapters"
    LOAD_ADAPTER = "load_adapter"
    UNLOAD_ADAPTER = "unload_adapter"
    SWAP_ADAPTER = "swap_adapter"
    LIST_PROFILES = "list_profiles"
    TAIL_LOG = "tail_log"
    SLURM_VIEW = "slurm_view"
    # Added without a version bump: the wire is unchanged, and an older agent answers it with one
    # "unknown op" error (shown as "upgrade this node"), while every other op keeps working.
    LIST_MODELS = "list_models"
    LIST_SPECS = "list_specs"  # the same: the Jobs dialog lists a node's own job specs
    PLAN_SERVER = "plan_server"  # the same: the start dialog shows the node's own plan before ctrl+s (read-only)
    RESTART_SERVER = "restart_server"  # the same: the node restarts from its own record (its spec, its placement)


class _Message(BaseModel):
    # Fields a newer peer adds are ignored; the version says whether the two can talk at all.
    model_config = ConfigDict(extra="ignore")
    v: int = PROTOCOL_VERSION

    def line(self) -> str:
        return self.model_dump_json(exclude_none=False) + "\n"


class Hello(_Message):
    type: Literal["hello"] = "hello"
    fleetdeck: str | None = None
    host: str | None = None
    node: str | None = None
    nvml: str | None = None
    reason: str | None = None


class Snapshot(_Message):
    type: Literal["snapshot"] = "snapshot"
    snapshot: dict[str, Any]


class Response(_Message):
    type: Literal["response"] = "response"
    id: StrictInt | None = None  # the request's own id: "1" or true is not an answer to request 1
    ok: bool
    result: Any = None
    error: str | None = None


class Subscribe(_Message):
    type: Literal["subscribe"] = "subscribe"
    interval: float | None = None

    @field_validator("interval", mode="before")
    @classmethod
    def _seconds(cls, v: object) -> float | None:
        # A number of seconds, as JSON writes one: not true (1.0 to pydantic), not "5".
        if v is None:
            return None
        try:  # an integer too large for a float (10**400) is as much a misfit as a string
            seconds = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
        except OverflowError:
            seconds = math.nan
        if not math.isfinite(seconds):
            raise ValueError(f"interval must be seconds from {MIN_INTERVAL_S} to {MAX_INTERVAL_S}")
        return seconds


class Request(_Message):
    type: Literal["request"] = "request"
    id: StrictInt  # echoed in the answer: a string or true would come back as another id than was sent
    op: Op
    args: dict[str, Any] = Field(default_factory=dict)
    operator: str | None = None  # who asks, for the node's audit trail: the dashboard's user@host


AgentMessage = Annotated[Union[Hello, Snapshot, Response], Field(discriminator="type")]
ClientMessage = Annotated[Union[Subscribe, Request], Field(discriminator="type")]
_AGENT = TypeAdapter(AgentMessage)
_CLIENT = TypeAdapter(ClientMessage)


class BadMessage(ValueError):
    """A message that does not fit the protocol; the text says which field and why, in one line."""


def _why(exc: ValidationError, doc: dict[str, Any]) -> str:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if p not in ("request", "subscribe", "hello", "snapshot", "response")]
    if loc[:1] == ["op"]:
        return f"unknown op {doc.get('op')!r}; known: {sorted(o.value for o in Op)}"
    if loc[:1] == ["args"]:
        return "args must be a JSON object"
    if loc[:1] == ["interval"]:
        return f"interval must be seconds from {MIN_INTERVAL_S} to {MAX_INTERVAL_S}, got {doc.get('interval')!r}"
    if err["type"] == "union_tag_invalid":
        return f"unknown type {doc.get('type')!r}"
    return f"malformed message: {'.'.join(loc) or 'message'}: {err['msg']}"


def version_problem(doc: dict[str, Any]) -> str | None:
    """Why a message's `v` is not this protocol's, in one line; None when it is. `v` is a JSON number:
    "2" or true is not version 2 (2.0 is)."""
    v = doc.get("v")
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v == PROTOCOL_VERSION:
        return None
    if "v" not in doc:
        return f"no protocol version (v); this agent speaks v{PROTOCOL_VERSION}"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return f"v must be the protocol version as a number, got {v!r}; this agent speaks v{PROTOCOL_VERSION}"
    return f"protocol v{v!r} not supported; this agent speaks v{PROTOCOL_VERSION}"


def parse_client(doc: dict[str, Any]) -> Subscribe | Request:
    """What an agent reads from a dashboard; BadMessage says why not."""
    try:
        return _CLIENT.validate_python(doc)
    except ValidationError as exc:
        raise BadMessage(_why(exc, doc)) from None


def parse_agent(doc: dict[str, Any]) -> Hello | Snapshot | Response:
    """What a dashboard reads from an agent; BadMessage says why not."""
    try:
        return _AGENT.validate_python(doc)
    except ValidationError as exc:
        raise BadMessage(_why(exc, doc)) from None


# -- each op's arguments and answer -----------------------------------------------------------------------
# `Request.args` is the op's request model as JSON and `Response.result` its response model's JSON: the wire is
# what it was (a field keeps its name and kind), the models only say it once. A request model forbids fields
# it does not name: a dashboard that sends something this agent would not act on is told so, not ignored.
# Each value is checked by a validator that says, in one line, what the field must be (fleet/protocol_fields.py).


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoArgs(_Args):
    """An op that takes nothing (a list, a ping)."""


class SlurmAsk(_Args):
    """What a dashboard may ask of a node's own Slurm: a GPU count, a partition name, a time limit (the
    node checks the limit's form, engine/slurm/client.py); the rest comes from the node's [slurm] settings."""

    gpus: SlurmGpus = 1
    partition: Partition | None = None
    time: SlurmTime | None = None


def slurm_ask(gpus: int, partition: str | None = None, time: str | None = None) -> SlurmAsk:
    """A Slurm ask from the command line's flags; BadMessage (a ValueError) in one line that names the field
    (`slurm.partition must be a partition name, got '../x'`), not pydantic's report."""
    try:
        return SlurmAsk(gpus=gpus, partition=partition, time=time)
    except ValidationError as exc:
        raise BadMessage(str(exc.errors()[0]["msg"]).removeprefix("Value error, ")) from None


class StartServer(_Args):
    profile: ProfileName
    gpus: GpuList | None = None  # required unless `slurm` (then the node's Slurm places it)
    port: Port | None = None
    force: Force = False
    model: ModelName | None = None  # instead of the profile's
    # Added without a version bump (as list_models was): an older agent refuses a start without gpus.
    slurm: SlurmAsk | None = None

    @model_validator(mode="after")
    def _placed(self) -> "StartServer":
        if self.slurm is None and self.gpus is None:
            raise ValueError("gpus must be a list of distinct GPU indices, got None")
        _one_placement(self.gpus, self.slurm)
        return self


class PlanServer(_Args):
    """What a start would be planned as, without starting it: the node's own profile, GPUs and models."""

    profile: ProfileName
    gpus: GpuList
    model: ModelName | None = None  # instead of the profile's


class StopServer(_Args):
    id: Ident


class RestartServer(_Args):
    id: Ident


class StartJob(_Args):
    spec: SpecName
    gpus: GpuList | None = None  # None: CPU (the peft backend)
    force: Force = False
    slurm: SlurmAsk | None = None

    @model_validator(mode="after")
    def _placed(self) -> "StartJob":
        _one_placement(self.gpus, self.slurm)
        return self


def _one_placement(gpus: list[int] | None, slurm: SlurmAsk | None) -> None:
    # Both would leave one of them silently unused (the node's Slurm places it): a request says what it means.
    if gpus is not None and slurm is not None:
        raise ValueError("gpus and slurm: give one (Slurm picks the GPUs of a start it places)")


class CancelJob(_Args):
    id: Ident


class ResumeJob(_Args):
    id: Ident


class ListAdapters(_Args):
    server: ServerId | None = None  # and which are loaded in this server


class LoadAdapter(_Args):
    server: ServerId
    adapter: AdapterRef
    name: ServedAs | None = None


class SwapAdapter(LoadAdapter):
    old: OldAdapter


class UnloadAdapter(_Args):
    server: ServerId
    name: ServedAs


class TailLog(_Args):
    id: Ident
    n: LineCount = 60
    kind: LogKind = "server"


class _Doc(BaseModel):
    # A record as the node's engine writes it: the fields the dashboard reads are named (and checked);
    # the rest pass through whole, so an engine that adds a field does not need this file changed.
    model_config = ConfigDict(extra="allow")


class SlurmPlacementDoc(_Doc):
    id: str
    options: list[str] = Field(default_factory=list)
    state: str = "PENDING"
    host: str | None = None


class RecordDoc(_Doc):
    """A server's or a job's managed record (engine/managed.py's ManagedRecord.to_json)."""

    id: str
    name: str
    node: str
    pid: int | None = None
    # Named, so an answer without them is refused here in one line: the engine's record needs them, and a
    # TypeError from its constructor was what a misfit agent's record came to.
    create_time: float | None
    argv: list[str]
    env: dict[str, str]
    gpus: str  # "0,1", "cpu" or "slurm:N"; engine/nodes/placement.py reads it
    port: int | None = None
    log_path: str
    spec: dict[str, Any] = Field(default_factory=dict)
    state: str
    reason: str | None = None
    started_at: float
    slurm: SlurmPlacementDoc | None = None


class ServerStatusDoc(RecordDoc):
    """A server with the live figures its node read (engine/vllm/status.py's ServerStatus.to_json)."""

    figures: dict[str, Any] | None = None
    loaded_adapters: list[str] = Field(default_factory=list)
    figures_error: str | None = None


class StartedServer(_Doc):
    server: RecordDoc
    verdict: dict[str, Any] | None = None  # the planner's, as the node planned it


class PlannedServer(_Doc):
    verdict: dict[str, Any]  # the planner's (FitResult.to_json), as the node planned it against its own GPUs


class RestartedServer(_Doc):
    old: RecordDoc  # as it was when restarted (a crashed one keeps its diagnosis)
    new: RecordDoc


class JobDoc(RecordDoc):
    outputs: dict[str, Any] = Field(default_factory=dict)
    events: list[dict[str, Any]] = Field(default_factory=list)  # list_jobs only: its recent step events


class AdapterDoc(_Doc):
    name: str
    path: str
    rank: int


class AdapterListingDoc(_Doc):
    adapters: list[AdapterDoc] = Field(default_factory=list)
    integrity: dict[str, str | None] = Field(default_factory=dict)
    loaded: list[str] = Field(default_factory=list)
    problems: list[str] = Field(default_factory=list)
    accuracy: dict[str, float] = Field(default_factory=dict)


class ModelDoc(_Doc):
    name: str
    path: str
    size_bytes: int
    error: str | None = None


class ClusterDoc(_Doc):
    partitions: list[dict[str, Any]] = Field(default_factory=list)
    nodes: list[dict[str, Any]] = Field(default_factory=list)
    queue: list[dict[str, Any]] = Field(default_factory=list)
    error: str | None = None


class Pong(_Doc):
    pong: float


class OpSpec(NamedTuple):
    request: type[_Args]
    response: Any  # a type: a model, or list[...] of one, or str


# Everything a node can be asked, with what it takes and what it answers. The agent refuses to start
# without a handler for each, and the client (engine/nodes/remote.py) builds and reads these only.
OPS: dict[Op, OpSpec] = {
    Op.PING: OpSpec(NoArgs, Pong),
    Op.LIST_SERVERS: OpSpec(NoArgs, list[ServerStatusDoc]),
    Op.START_SERVER: OpSpec(StartServer, StartedServer),
    Op.STOP_SERVER: OpSpec(StopServer, RecordDoc),
    Op.LIST_JOBS: OpSpec(NoArgs, list[JobDoc]),
    Op.START_JOB: OpSpec(StartJob, JobDoc),
    Op.CANCEL_JOB: OpSpec(CancelJob, JobDoc),
    Op.RESUME_JOB: OpSpec(ResumeJob, JobDoc),
    Op.LIST_ADAPTERS: OpSpec(ListAdapters, AdapterListingDoc),
    Op.LOAD_ADAPTER: OpSpec(LoadAdapter, str),  # the engine's one-line account of what it did
    Op.UNLOAD_ADAPTER: OpSpec(UnloadAdapter, str),
    Op.SWAP_ADAPTER: OpSpec(SwapAdapter, str),
    Op.LIST_PROFILES: OpSpec(NoArgs, list[str]),
    Op.TAIL_LOG: OpSpec(TailLog, str),
    Op.SLURM_VIEW: OpSpec(NoArgs, ClusterDoc),
    Op.LIST_MODELS: OpSpec(NoArgs, list[ModelDoc]),
    Op.LIST_SPECS: OpSpec(NoArgs, list[str]),
    Op.PLAN_SERVER: OpSpec(PlanServer, PlannedServer),
    Op.RESTART_SERVER: OpSpec(RestartServer, RestartedServer),
}
_RESULTS = {op: TypeAdapter(spec.response) for op, spec in OPS.items()}


def _arg_why(op: Op, exc: ValidationError) -> str:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"] if not isinstance(p, int)) or "args"
    if err["type"] == "extra_forbidden":
        model: type[BaseModel] = OPS[op].request
        for part in [p for p in err["loc"] if isinstance(p, str)][:-1]:  # down to the object that had it
            inner = model.model_fields[part].annotation
            model = next((t for t in (inner, *get_args(inner)) if isinstance(t, type) and issubclass(t, BaseModel)), model)
        names = list(model.model_fields)
        takes = ("no arguments" if not names else f"{names[0]} only" if len(names) == 1
                 else f"{', '.join(names[:-1])} and {names[-1]} only")
        where = op.value if model is OPS[op].request else field.rsplit(".", 1)[0]
        return f"{op.value}: unknown field {field!r}; {where} takes {takes}"
    if err["type"] == "missing":
        return f"{op.value}: {field} is required"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if field == "args" or msg.startswith(field) or msg.startswith(field.split(".")[-1]):
        return msg  # the validator's own line already names the field
    return f"{field}: {msg}"


def parse_args(op: Op, args: dict[str, Any]) -> _Args:
    """A request's args as its op's request model; BadMessage names the field and what it must be."""
    try:
        return OPS[op].request.model_validate(args)
    except ValidationError as exc:
        raise BadMessage(_arg_why(op, exc)) from None


def args_of(model: _Args) -> dict[str, Any]:
    """A request model as `Request.args`: unset optional fields are left out, as a hand-built dict did."""
    return model.model_dump(mode="json", exclude_none=True)


def parse_result(op: Op, value: Any) -> Any:
    """An agent's answer as its op's response model; BadMessage when it does not fit (an agent of another
    version, or not an agent)."""
    try:
        return _RESULTS[op].validate_python(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "result"
        raise BadMessage(f"{op.value} answered {where}: {err['msg']}") from None


def result_of(op: Op, value: Any) -> Any:
    """What a handler answers, checked against its op's response model, as `Response.result`'s JSON: the
    fields it had, no defaults added (the wire carries what the engine wrote)."""
    return _RESULTS[op].dump_python(_RESULTS[op].validate_python(value), mode="json", exclude_unset=True)
