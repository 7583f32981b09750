"""The agent protocol's messages, typed: one JSON object a line, each with the protocol version `v` and a
`type`. The dashboard sends `subscribe` and `request`; the agent sends `hello`, `snapshot` and
`response`. Both sides build and read them through these models, so a field is spelled once.
A message from the other side that does not fit is refused with what was wrong, never acted on.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

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
    id: int | None = None
    ok: bool
    result: Any = None
    error: str | None = None


class Subscribe(_Message):
    type: Literal["subscribe"] = "subscribe"
    interval: float | None = None

    @field_validator("interval")
    @classmethod
    def _seconds(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"interval must be seconds from {MIN_INTERVAL_S} to {MAX_INTERVAL_S}")
        return v


class Request(_Message):
    type: Literal["request"] = "request"
    id: int
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
