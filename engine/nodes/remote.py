"""A node over SSH as a `NodeOps`: each method builds its op's request model (fleet/protocol.py), asks the
node's agent, and reads the answer through the op's response model into the engine's own records.

The agent checks, does and audits the request there; here a read-only dashboard refuses a change before
it is sent (audited on this side). Records come back with their id shown as `@node:id`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from engine.audit import trail as audit
from engine.finetune.jobs import JobRecord
from engine.kvfit.local_models import LocalModel
from engine.nodes.ids import shown_id, split_id
from engine.nodes.ops import AdapterListing, JobProgress, ServerPlan, ServerRestarted, ServerStarted
from engine.nodes.placement import gpu_indices, slurm_ask
from engine.nodes.processes import KillError, KillRequest
from engine.slurm.client import ClusterView
from engine.vllm.record import LIVE, ServerRecord
from engine.vllm.status import ServerStatus
from fleet.protocol import OPS, BadMessage, NoArgs, Op, SlurmAsk, _Args, args_of, parse_args, parse_result
from fleet.remote import AgentError, RemoteNode


@dataclass
class AgentOps:
    """A node over SSH: the same operations, asked of its agent. Ids come back as `@node:id`."""

    node: RemoteNode

    @property
    def name(self) -> str:
        return str(self.node.name)

    def _here(self, ident: str) -> str:
        """An id as this node knows it: `@node:id` only for this node (another node's id is not sent here,
        where it could name something else), a bare id as it is."""
        node, own = split_id(ident)
        if node is not None and node != self.name:
            raise AgentError(f"{ident} is on {node}, not {self.name}: give --node {node}, or its id on {self.name}")
        return own

    def _request(self, op: Op, **fields: Any) -> Any:
        """The op's request model from the caller's values; a value the agent would refuse (a port below 1024,
        an empty id) is one line naming the field, here, before anything is sent."""
        try:
            return parse_args(op, {k: v for k, v in fields.items() if v is not None})
        except BadMessage as exc:
            raise AgentError(f"{self.name}: {exc}") from None

    def _ask(self, op: Op, args: _Args | None = None, timeout: float = 60.0) -> Any:
        if args is not None and not isinstance(args, OPS[op].request):
            raise TypeError(f"{op.value} takes {OPS[op].request.__name__}, not {type(args).__name__}")
        answer = self.node.request(op, args_of(args) if args is not None else {}, timeout=timeout)
        try:
            return parse_result(op, answer)
        except BadMessage as exc:
            raise AgentError(f"{self.name}: {exc}") from None

    def _server(self, doc: Any) -> ServerRecord:
        rec = ServerRecord.from_json(doc.model_dump())
        rec.id = shown_id(self.name, rec.id)
        return rec

    def _job(self, doc: Any) -> JobRecord:
        rec = JobRecord.from_json(doc.model_dump())
        rec.id = shown_id(self.name, rec.id)
        return rec

    # -- reading ---------------------------------------------------------------------------------
    def models(self) -> list[LocalModel]:
        try:
            docs = self._ask(Op.LIST_MODELS, timeout=30)
        except AgentError as exc:
            if "unknown op" in str(exc):
                raise AgentError(f"{self.name}: its fleetdeck is older than this dashboard's and cannot list models; "
                                 f"upgrade it: fleetdeck nodes install {self.name} --bundle DIR") from None
            raise
        return [LocalModel.from_json(d.model_dump()) for d in docs]

    def profiles(self) -> list[str]:
        return list(self._ask(Op.LIST_PROFILES, timeout=30))

    def specs(self) -> list[str]:
        try:
            return list(self._ask(Op.LIST_SPECS, timeout=30))
        except AgentError as exc:
            if "unknown op" in str(exc):
                raise AgentError(f"{self.name}: its fleetdeck is older than this dashboard's and cannot list job "
                                 f"specs; upgrade it: fleetdeck nodes install {self.name} --bundle DIR") from None
            raise

    def servers(self) -> list[ServerStatus]:
        out = []
        for doc in self._ask(Op.LIST_SERVERS, timeout=10):
            st = ServerStatus.from_json(doc.model_dump())
            st.rec.id = shown_id(self.name, st.rec.id)
            out.append(st)
        return out

    def jobs(self) -> list[JobProgress]:
        return [JobProgress(self._job(doc), list(doc.events)) for doc in self._ask(Op.LIST_JOBS, timeout=10)]

    def tail_log(self, kind: str, ident: str, n: int = 200) -> str:
        return str(self._ask(Op.TAIL_LOG, self._request(Op.TAIL_LOG, id=self._here(ident), n=n, kind=kind), timeout=30))

    def adapters(self, sid: str | None) -> AdapterListing:
        doc = self._ask(Op.LIST_ADAPTERS, self._request(Op.LIST_ADAPTERS, server=self._here(sid) if sid else None), timeout=30)
        return AdapterListing.from_json(doc.model_dump())

    def slurm_view(self) -> ClusterView:
        doc = self._ask(Op.SLURM_VIEW, NoArgs(), timeout=60).model_dump()
        return ClusterView(doc["partitions"], doc["nodes"], doc["queue"], doc["error"])

    # -- servers ---------------------------------------------------------------------------------
    def start_server(self, profile: str, gpus: list[int], *, port: int | None = None, force: bool = False,
                     model: str | None = None, slurm: SlurmAsk | None = None, gpu_snapshots: Any = None,
                     node: str | None = None) -> ServerStarted:
        # The agent plans against its own node's GPUs (`gpu_snapshots` read here are not sent) and is its node.
        where = f"slurm:{slurm.gpus}" if slurm is not None else ",".join(map(str, gpus))
        audit.refuse_if_read_only("server.start", profile, profile=profile, gpus=where)
        if model is not None:
            self.models()  # an agent older than list_models would ignore `model`: ask it first
        req = self._request(Op.START_SERVER, profile=profile, gpus=None if slurm is not None else gpus, port=port,
                            force=force, model=model, slurm=slurm)
        doc = self._ask(Op.START_SERVER, req, timeout=120)
        return ServerStarted(self._server(doc.server), doc.verdict)

    def plan_server(self, profile: str, gpus: list[int], *, model: str | None = None,
                    gpu_snapshots: Any = None) -> ServerPlan:
        """The node's own plan for its profile on its GPUs (`gpu_snapshots` read here are not sent): read-only,
        so asked of it in read-only mode too, and recorded nowhere."""
        req = self._request(Op.PLAN_SERVER, profile=profile, gpus=gpus, model=model)
        try:
            doc = self._ask(Op.PLAN_SERVER, req, timeout=60)
        except AgentError as exc:
            if "unknown op" in str(exc):
                raise AgentError(f"{self.name}: its fleetdeck is older than this dashboard's and plans a start only "
                                 f"when it starts; upgrade it: fleetdeck nodes install {self.name} --bundle DIR") from None
            raise
        try:
            return ServerPlan.from_json(doc.verdict)
        except ValueError as exc:
            raise AgentError(f"{self.name}: {exc}") from None

    def stop_server(self, sid: str) -> ServerRecord:
        sid = self._here(sid)
        audit.refuse_if_read_only("server.stop", shown_id(self.name, sid), server=sid)
        return self._server(self._ask(Op.STOP_SERVER, self._request(Op.STOP_SERVER, id=sid), timeout=60))

    def restart_server(self, sid: str, *, gpu_snapshots: Any = None) -> ServerRestarted:
        """The node restarts the server from its own record, as `serve restart` does there: the spec it was
        started with (the model picked for it too), the same GPUs or Slurm ask; one that had ended is planned
        against the node's GPUs as they are now (`gpu_snapshots`, read here, are not sent)."""
        own = self._here(sid)
        audit.refuse_if_read_only("server.stop", shown_id(self.name, own), server=own)
        req = self._request(Op.RESTART_SERVER, id=own)
        try:
            doc = self._ask(Op.RESTART_SERVER, req, timeout=180)
        except AgentError as exc:
            if "unknown op" not in str(exc):
                raise
            return self._restart_by_name(own)  # an agent older than restart_server
        return ServerRestarted(self._server(doc.old), self._server(doc.new))

    def _restart_by_name(self, own: str) -> ServerRestarted:
        """Stop, then start the profile of the server's name on its placement: all an older agent can do. The
        record's name is its profile's `name`, which need not be a file the node's folders hold by that name:
        refused, before the stop, unless it is a profile there (a model picked for the server is not asked again)."""
        shown = shown_id(self.name, own)
        rec = next((st.rec for st in self.servers() if st.rec.id == shown), None)
        if rec is None:
            raise AgentError(f"{self.name}: no server {own!r} (fleetdeck serve ls --node {self.name})")
        ask, gpus = slurm_ask(rec), gpu_indices(rec)  # read before the stop, which must not run if these fail
        if rec.name not in self.profiles():
            raise AgentError(f"{self.name}: its fleetdeck is older than this dashboard's and can restart a server only "
                             f"by its profile's name, and it has no profile named {rec.name!r}: nothing was stopped; "
                             f"upgrade it: fleetdeck nodes install {self.name} --bundle DIR")
        old = self.stop_server(rec.id)
        started = self.start_server(rec.name, gpus, port=None, force=rec.state in LIVE, slurm=ask)
        return ServerRestarted(old, started.rec)

    def prune_servers(self) -> list[str]:
        raise AgentError(f"{self.name}: prune its ended servers on the node (`fleetdeck serve prune`)")

    # -- jobs ------------------------------------------------------------------------------------
    def start_job(self, spec: str, gpus: list[int] | None, *, force: bool = False, slurm: SlurmAsk | None = None,
                  gpu_snapshots: Any = None, node: str | None = None) -> JobRecord:
        where = f"slurm:{slurm.gpus}" if slurm is not None else (",".join(map(str, gpus)) if gpus else "cpu")
        audit.refuse_if_read_only("job.start", spec, spec=spec, gpus=where)
        req = self._request(Op.START_JOB, spec=spec, gpus=None if slurm is not None else (gpus or None), force=force,
                            slurm=slurm)
        return self._job(self._ask(Op.START_JOB, req, timeout=180))

    def cancel_job(self, jid: str) -> JobRecord:
        jid = self._here(jid)
        audit.refuse_if_read_only("job.cancel", shown_id(self.name, jid), job=jid)
        return self._job(self._ask(Op.CANCEL_JOB, self._request(Op.CANCEL_JOB, id=jid), timeout=180))

    def resume_job(self, jid: str) -> JobRecord:
        jid = self._here(jid)
        audit.refuse_if_read_only("job.resume", shown_id(self.name, jid), job=jid)
        return self._job(self._ask(Op.RESUME_JOB, self._request(Op.RESUME_JOB, id=jid), timeout=60))

    def prune_jobs(self) -> list[str]:
        raise AgentError(f"{self.name}: prune its ended jobs on the node (`fleetdeck finetune prune`)")

    # -- adapters --------------------------------------------------------------------------------
    def load_adapter(self, sid: str, adapter: str, name: str | None = None) -> str:
        sid = self._here(sid)
        audit.refuse_if_read_only("adapter.load", adapter, server=shown_id(self.name, sid), adapter=adapter)
        req = self._request(Op.LOAD_ADAPTER, server=sid, adapter=adapter, name=name)
        return str(self._ask(Op.LOAD_ADAPTER, req, timeout=180))

    def swap_adapter(self, sid: str, old: str, adapter: str, name: str | None = None) -> str:
        sid = self._here(sid)
        audit.refuse_if_read_only("adapter.swap", adapter, server=shown_id(self.name, sid), old=old, adapter=adapter)
        req = self._request(Op.SWAP_ADAPTER, server=sid, adapter=adapter, name=name, old=old)
        return str(self._ask(Op.SWAP_ADAPTER, req, timeout=180))

    def unload_adapter(self, sid: str, name: str) -> str:
        sid = self._here(sid)
        audit.refuse_if_read_only("adapter.unload", name, server=shown_id(self.name, sid), adapter=name)
        return str(self._ask(Op.UNLOAD_ADAPTER, self._request(Op.UNLOAD_ADAPTER, server=sid, name=name), timeout=60))

    # The agent protocol has no op to signal a process: refused here, audited, with what to do instead,
    # rather than stretched over an op that means something else.
    def kill_process(self, req: KillRequest, grace_s: float = 5.0) -> str:
        audit.refuse_if_read_only("process.kill", f"{req.node}:{req.pid}", node=req.node, pid=req.pid)
        why = (f"{self.name} is reached over SSH and its agent cannot signal processes: "
               f"ssh {self.name} and kill {req.pid} there, or stop its server or job")
        audit.record("process.kill", f"{req.node}:{req.pid}", "refused", why, node=req.node, pid=req.pid,
                     gpu=req.gpu, user=req.user, command=req.command[:200])
        raise KillError(why)


def connect(config: Any, name: str) -> RemoteNode:
    """Connect to a node of the fleet config through its agent (the CLI's `--node`); raises AgentError if it
    does not answer. The caller closes it.

    The first session decides: it ends connected, incompatible or unreachable, bounded by the node's
    hello_timeout_s (ssh's ConnectTimeout is inside it). A clock of its own here would be a second,
    shorter limit that a slow but working node (a loaded machine starting Python) could miss."""
    node = next((n for n in config.node if n.name == name), None)
    if node is None:
        raise AgentError(f"no node {name!r} in the fleet config (nodes: {', '.join(n.name for n in config.node) or 'none'})")
    remote = RemoteNode.over_ssh(node.name, node.ssh, list(node.ssh_options), node.agent_command or None,
                                 read_only=audit.is_read_only(), hello_timeout_s=node.hello_timeout_s)
    safety_net = time.monotonic() + node.hello_timeout_s + 30  # only if the session's own watchdog never fires
    while remote.link.status == "connecting" and time.monotonic() < safety_net:
        time.sleep(0.1)
    if remote.link.status != "connected":
        remote.close()
        raise AgentError(f"{name}: {remote.link.error or 'no answer from its agent'}")
    return remote
