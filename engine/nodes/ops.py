"""What a node can be asked, typed: the `NodeOps` protocol and the results its methods return.

`LocalOps` (engine/nodes/local.py) answers on this host's store; `AgentOps` (engine/nodes/remote.py) asks
a node's agent over SSH, through fleet/protocol.py's request and response models, and returns the same
types. The agent (engine/nodes/agent.py) answers each op with one LocalOps. A remote record's id is shown
as `@node:id`; `split_id` takes it apart again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import TypeAdapter, ValidationError

from engine.adapters.registry import Adapter
from engine.finetune.jobs import JobRecord
from engine.kvfit.local_models import LocalModel
from engine.kvfit.plan import FitResult
from engine.nodes.processes import KillRequest
from engine.slurm.client import ClusterView
from engine.vllm.record import ServerRecord, ServerState
from engine.vllm.status import ServerStatus
from fleet.protocol import SlurmAsk

@dataclass
class AdapterListing:
    """A node's adapters on disk (with each version's integrity) and those loaded in one of its servers."""

    adapters: list[Adapter]
    integrity: dict[str, str | None] = field(default_factory=dict)  # name -> why it cannot be trusted, or None
    loaded: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    accuracy: dict[str, float] = field(default_factory=dict)  # name -> its latest evaluation's accuracy on the node

    def to_json(self) -> dict[str, Any]:
        return {"adapters": [a.to_json() for a in self.adapters], "integrity": self.integrity, "loaded": self.loaded,
                "problems": self.problems, "accuracy": self.accuracy}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "AdapterListing":
        known = Adapter.__dataclass_fields__
        return cls([Adapter(**{k: v for k, v in a.items() if k in known}) for a in doc.get("adapters", [])],
                   dict(doc.get("integrity") or {}), list(doc.get("loaded") or []), list(doc.get("problems") or []),
                   {str(k): float(v) for k, v in (doc.get("accuracy") or {}).items()})


@dataclass
class ServerStarted:
    rec: ServerRecord
    verdict: dict[str, Any] | None  # the planner's verdict (FitResult.to_json), as the node planned it


@dataclass
class ServerPlan:
    """A start as its node plans it, nothing started: the planner's verdict for that profile on those GPUs."""

    verdict: FitResult

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "ServerPlan":
        """A verdict as a node sent it (FitResult.to_json), checked field by field; ValueError if it does not fit."""
        try:
            return cls(_FIT.validate_python({k: v for k, v in doc.items() if k != "verdict"}))
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ValueError(f"a plan that does not fit: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


_FIT: TypeAdapter[FitResult] = TypeAdapter(FitResult)


@dataclass
class ServerRestarted:
    old: ServerRecord  # as it was when restarted: a crashed one keeps its diagnosis in the history
    new: ServerRecord


@dataclass
class JobProgress:
    rec: JobRecord
    events: list[dict[str, Any]]  # its step events (the Jobs screen charts the loss from them)


class NodeOps(Protocol):
    """Everything the CLI and the TUI may do to a node. Ids in and out are the node's own, except that a
    remote node's records come back with `@node:` before their id (as the screens show them)."""

    @property
    def name(self) -> str: ...

    def servers(self) -> list[ServerStatus]: ...

    def profiles(self) -> list[str]: ...  # the launch profiles in the node's own folders

    def specs(self) -> list[str]: ...  # the fine-tune job specs in the node's own folders

    def models(self) -> list[LocalModel]: ...  # what the node's vLLM finds on its disks

    def start_server(self, profile: str, gpus: list[int], *, port: int | None = None, force: bool = False,
                     model: str | None = None, slurm: SlurmAsk | None = None, gpu_snapshots: Any = None,
                     node: str | None = None) -> ServerStarted: ...

    def plan_server(self, profile: str, gpus: list[int], *, model: str | None = None,
                    gpu_snapshots: Any = None) -> ServerPlan: ...  # read-only: what start_server would plan

    def stop_server(self, sid: str) -> ServerRecord: ...

    def restart_server(self, sid: str, *, gpu_snapshots: Any = None) -> ServerRestarted: ...

    def jobs(self) -> list[JobProgress]: ...

    def start_job(self, spec: str, gpus: list[int] | None, *, force: bool = False, slurm: SlurmAsk | None = None,
                  gpu_snapshots: Any = None, node: str | None = None) -> JobRecord: ...

    def cancel_job(self, jid: str) -> JobRecord: ...

    def resume_job(self, jid: str) -> JobRecord: ...

    def tail_log(self, kind: str, ident: str, n: int = 200) -> str: ...

    def adapters(self, sid: str | None) -> AdapterListing: ...

    def load_adapter(self, sid: str, adapter: str, name: str | None = None) -> str: ...

    def unload_adapter(self, sid: str, name: str) -> str: ...

    def swap_adapter(self, sid: str, old: str, adapter: str, name: str | None = None) -> str: ...

    def slurm_view(self) -> ClusterView: ...

    def kill_process(self, req: KillRequest, grace_s: float = 5.0) -> str: ...

    def prune_servers(self) -> list[str]: ...  # the ids forgotten

    def prune_jobs(self) -> list[str]: ...


def pruned(what: str, ids: list[str]) -> str:
    """What a prune says, the same from the CLI and the screens."""
    if not ids:
        return f"no ended {what} to prune"
    return (f"pruned {len(ids)} ended {what}: {', '.join(ids[:4])}{', ...' if len(ids) > 4 else ''} "
            "(their logs stay on disk)")


def started_text(started: ServerStarted) -> str:
    rec = started.rec
    return f"started {rec.id} on GPUs {rec.gpus}, port {rec.port}"


def restarted_text(done: ServerRestarted) -> str:
    was = f" (it had {done.old.state}: its record keeps the diagnosis)" if done.old.state == ServerState.CRASHED else ""
    return f"{done.old.id} restarted as {done.new.id}{was}"


def with_model(profile: Any, model: str | None, available: list[LocalModel]) -> Any:
    """The profile with another model from the node's own disks (`models()`): a name the node's listing
    has, nothing else (a request names what the node defines)."""
    if model is None:
        return profile
    names = [m.name for m in available if m.error is None]
    if model not in names:
        raise ValueError(f"model {model!r} is not on this node's disks; it has: {', '.join(names) or 'none'}")
    return profile.model_copy(update={"model": model, "served_model_name": profile.served_model_name})
