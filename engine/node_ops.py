"""What can be done to a node, the same way whether it is this host or one reached over SSH.

`ops_for(app_or_sources, node)` gives a `NodeOps`: `LocalOps` calls the engine on this host's store;
`AgentOps` sends the same operations to the node's agent (which checks, does and audits them there).
The screens and commands call these and never ask where a node is. A remote record's id is shown as
`@node:id`; `split_id` takes it apart again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Protocol

from engine.audit import trail as audit
from engine.host.folders import Folders
from engine.vllm.record import LIVE, ServerState

if TYPE_CHECKING:
    from store.db import Store


@dataclass
class AdapterListing:
    """A node's adapters on disk (with each version's integrity) and those loaded in one of its servers."""

    adapters: list[Any]  # engine.adapters.Adapter
    integrity: dict[str, str | None] = field(default_factory=dict)  # name -> why it cannot be trusted, or None
    loaded: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    accuracy: dict[str, float] = field(default_factory=dict)  # name -> its latest evaluation's accuracy on the node

    def to_json(self) -> dict[str, Any]:
        return {"adapters": [a.to_json() for a in self.adapters], "integrity": self.integrity, "loaded": self.loaded,
                "problems": self.problems, "accuracy": self.accuracy}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "AdapterListing":
        from engine.adapters.registry import Adapter

        known = Adapter.__dataclass_fields__
        return cls([Adapter(**{k: v for k, v in a.items() if k in known}) for a in doc.get("adapters", [])],
                   dict(doc.get("integrity") or {}), list(doc.get("loaded") or []), list(doc.get("problems") or []),
                   {str(k): float(v) for k, v in (doc.get("accuracy") or {}).items()})


def list_adapters(store: Store, roots: list[Any], sid: str | None) -> AdapterListing:
    """This host's adapters, and those loaded in server `sid` (the agent answers with this too)."""
    from engine.adapters import registry as adapters
    from engine.adapters.registry import integrity_problem
    from engine.vllm import launcher

    from engine.adapters.evaluation import evals_of

    found, problems = adapters.scan(roots)
    listing = AdapterListing(found, {a.name: integrity_problem(a) for a in found}, [], problems)
    try:
        for e in reversed(evals_of(store)):
            listing.accuracy[e["adapter"]] = e["accuracy"]
    except Exception as exc:  # an older or locked store: the column stays empty
        listing.problems.append(f"evaluations unavailable: {exc}")
    if sid is not None:
        rec = launcher.get(store, sid)
        try:
            listing.loaded = [m["id"] for m in adapters.loaded(rec.base_url, rec.api_key)]
        except Exception as exc:  # a server that stopped answering
            listing.problems.append(f"cannot list {sid}'s loaded adapters: {exc}")
    return listing


class NodeOps(Protocol):
    name: str

    def servers(self) -> list[Any]: ...  # ServerStatus, figures included

    def start_server(self, profile: str, gpus: list[int], force: bool = False, gpu_snapshots: Any = None,
                     model: str | None = None, node: str | None = None) -> str: ...  # model: one of models(), instead of the profile's

    def stop_server(self, sid: str) -> str: ...

    def restart_server(self, rec: Any) -> str: ...

    def jobs(self) -> list[tuple[Any, list[dict[str, Any]]]]: ...  # (JobRecord, step events)

    def cancel_job(self, jid: str) -> str: ...

    def resume_job(self, jid: str) -> str: ...

    def tail_log(self, kind: str, ident: str, n: int = 200) -> str: ...

    def adapters(self, sid: str | None) -> AdapterListing: ...

    def load_adapter(self, sid: str, adapter: str) -> str: ...

    def unload_adapter(self, sid: str, name: str) -> str: ...

    def swap_adapter(self, sid: str, old: str, adapter: str) -> str: ...

    def kill_process(self, req: Any) -> str: ...  # engine.processes.KillRequest

    def prune_servers(self) -> str: ...

    def prune_jobs(self) -> str: ...

    def models(self) -> list[Any]: ...  # LocalModel: what the node's vLLM finds on its disks


def _pruned(what: str, ids: list[str]) -> str:
    if not ids:
        return f"no ended {what} to prune"
    return (f"pruned {len(ids)} ended {what}: {', '.join(ids[:4])}{', ...' if len(ids) > 4 else ''} "
            "(their logs stay on disk)")


def with_model(profile: Any, model: str | None, available: list[Any]) -> Any:
    """The profile with another model from the node's own disks (`models()`): a name the node's listing
    has, nothing else (a request names what the node defines)."""
    if model is None:
        return profile
    names = [m.name for m in available if m.error is None]
    if model not in names:
        raise ValueError(f"model {model!r} is not on this node's disks; it has: {', '.join(names) or 'none'}")
    return profile.model_copy(update={"model": model, "served_model_name": profile.served_model_name})


def split_id(shown: str) -> tuple[str | None, str]:
    """"@node:id" -> ("node", "id"); a local id -> (None, id)."""
    if shown.startswith("@") and ":" in shown:
        node, _, ident = shown[1:].partition(":")
        return node, ident
    return None, shown


@dataclass
class LocalOps:
    """This host: the engine on the dashboard's own store."""

    store: Store
    adapter_roots: list[Any]
    name: str = ""
    scrapes: dict[str, Any] | None = None  # each server's previous /metrics scrape, for rates
    folders: Folders = field(default_factory=Folders)  # profiles by name, server logs (the demo has its own)
    model_roots: list[Any] | None = None  # None: the fleet config's [models] roots

    def models(self) -> list[Any]:
        from engine.kvfit.local_models import configured_roots, list_local

        return list_local(configured_roots() if self.model_roots is None else self.model_roots)

    def servers(self) -> list[Any]:
        from engine.vllm import launcher
        from engine.vllm.status import status_of

        self.scrapes = self.scrapes if self.scrapes is not None else {}
        out = []
        for rec in launcher.list_servers(self.store):
            st = status_of(launcher.refresh(self.store, rec), self.scrapes.get(rec.id))
            if st.scrape is not None:
                self.scrapes[rec.id] = st.scrape
            out.append(st)
        return out

    def start_server(self, profile: str, gpus: list[int], force: bool = False, gpu_snapshots: Any = None,
                     model: str | None = None, node: str | None = None) -> str:
        """`model`: one of models(), instead of the profile's. `node`: which of this host's own sources the
        GPUs belong to (the demo's simulated nodes), so the record says where it runs; None is this host."""
        from engine.vllm import launcher
        from engine.vllm.profile import load_profile
        from store.config_files import toml_by_name

        spec = load_profile(toml_by_name("profile", profile, self.folders.profile_roots()))
        if model is not None:
            spec = with_model(spec, model, self.models())
        rec, _ = launcher.start(self.store, spec, gpus, gpu_snapshots=gpu_snapshots, force=force,
                                adapter_roots=list(self.adapter_roots), node=node, log_dir=self.folders.server_logs)
        return f"started {rec.id} on GPUs {rec.gpus}, port {rec.port}"

    def stop_server(self, sid: str) -> str:
        from engine.vllm import launcher

        return f"{launcher.stop(self.store, launcher.get(self.store, sid)).id} stopped"

    def restart_server(self, rec: Any) -> str:
        """A new run (a new record) of the same profile on the same GPUs and node. A server that still
        runs is stopped first; a crashed one keeps its record, diagnosis included, in the history."""
        from engine.managed import LocalGpus
        from engine.vllm import launcher, slurm_server
        from engine.vllm.profile import Profile

        rec = launcher.refresh(self.store, launcher.get(self.store, rec.id))
        if rec.state in LIVE:
            launcher.stop(self.store, rec)
        if isinstance(rec.gpus, LocalGpus):
            new, _ = launcher.start(self.store, Profile.model_validate(rec.spec), list(rec.gpus.indices), force=True,
                                    adapter_roots=list(self.adapter_roots), node=rec.node,
                                    log_dir=self.folders.server_logs)
        else:  # Slurm's: a new job with the same request
            new = slurm_server.resubmit(self.store, rec, adapter_roots=list(self.adapter_roots),
                                        log_dir=self.folders.server_logs)
        crashed = rec.state == ServerState.CRASHED
        was = f" (it had {rec.state}: its record keeps the diagnosis)" if crashed else ""
        return f"{rec.id} restarted as {new.id}{was}"

    def jobs(self) -> list[tuple[Any, list[dict[str, Any]]]]:
        from engine.finetune import jobs

        recs = [jobs.refresh(self.store, r) for r in jobs.list_jobs(self.store)]
        return [(r, jobs.read_events(r.progress_path)) for r in recs]

    def cancel_job(self, jid: str) -> str:
        from engine.finetune import jobs

        rec = jobs.cancel(self.store, jobs.get(self.store, jid))
        return f"{rec.id}: {rec.state}"

    def resume_job(self, jid: str) -> str:
        from engine.finetune import jobs

        rec = jobs.resume(self.store, jobs.get(self.store, jid))
        return f"{rec.id}: {rec.state}"

    def tail_log(self, kind: str, ident: str, n: int = 200) -> str:
        from engine.finetune import jobs
        from engine.vllm import launcher
        from engine.io.logs import tail

        rec = jobs.get(self.store, ident) if kind == "job" else launcher.get(self.store, ident)
        return tail(rec.log_path, n)

    def adapters(self, sid: str | None) -> AdapterListing:
        return list_adapters(self.store, list(self.adapter_roots), sid)

    def _load(self, sid: str, adapter: str, old: str | None) -> str:
        from engine.adapters import registry as adapters
        from engine.vllm import launcher

        server = launcher.refresh(self.store, launcher.get(self.store, sid))
        return adapters.load_into(server, adapters.by_name(list(self.adapter_roots), adapter), None, old)

    def load_adapter(self, sid: str, adapter: str) -> str:
        return self._load(sid, adapter, None)

    def swap_adapter(self, sid: str, old: str, adapter: str) -> str:
        return self._load(sid, adapter, old)

    def unload_adapter(self, sid: str, name: str) -> str:
        from engine.adapters import registry as adapters
        from engine.vllm import launcher

        rec = launcher.get(self.store, sid)
        return adapters.unload(rec.base_url, name, rec.api_key, server=rec.id)

    def kill_process(self, req: Any) -> str:
        from engine.processes import kill_gpu_process

        return kill_gpu_process(req)

    def prune_servers(self) -> str:
        from engine.vllm import launcher

        return _pruned("servers", [r.id for r in launcher.prune(self.store)])

    def prune_jobs(self) -> str:
        from engine.finetune import jobs

        return _pruned("jobs", [r.id for r in jobs.prune(self.store)])


@dataclass
class AgentOps:
    """A node over SSH: the same operations, asked of its agent. Ids come back as `@node:id`."""

    node: Any  # fleet.remote.RemoteNode

    @property
    def name(self) -> str:
        return str(self.node.name)

    def _ask(self, op: Any, args: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
        return self.node.request(op, args or {}, timeout=timeout)

    def models(self) -> list[Any]:
        from engine.kvfit.local_models import LocalModel
        from fleet.remote import AgentError, Op

        try:
            docs = self._ask(Op.LIST_MODELS, timeout=30)
        except AgentError as exc:
            if "unknown op" in str(exc):
                raise AgentError(f"{self.name}: its fleetdeck is older than this dashboard's and cannot list models; "
                                 f"upgrade it: fleetdeck nodes install {self.name} --bundle DIR") from None
            raise
        if not isinstance(docs, list):
            raise AgentError(f"{self.name}: list_models answered {type(docs).__name__}, not a list")
        return [LocalModel.from_json(d) for d in docs]

    def servers(self) -> list[Any]:
        from engine.vllm.status import ServerStatus
        from fleet.remote import Op

        out = []
        for doc in self._ask(Op.LIST_SERVERS, timeout=10):
            st = ServerStatus.from_json(doc)
            st.rec.id = f"@{self.name}:{st.rec.id}"
            out.append(st)
        return out

    def start_server(self, profile: str, gpus: list[int], force: bool = False, gpu_snapshots: Any = None,
                     model: str | None = None, node: str | None = None) -> str:
        from fleet.remote import Op

        # the agent plans against its own node's GPUs (`gpu_snapshots` read here are not sent) and is its node
        audit.refuse_if_read_only("server.start", profile, profile=profile, gpus=",".join(map(str, gpus)))
        args: dict[str, Any] = {"profile": profile, "gpus": gpus, "force": force}
        if model is not None:
            # An agent older than list_models would ignore `model` and start the profile's own: ask it first.
            self.models()
            args["model"] = model
        srv = self._ask(Op.START_SERVER, args, timeout=120)["server"]
        return f"started @{self.name}:{srv['id']} on GPUs {srv['gpus']}, port {srv['port']}"

    def stop_server(self, sid: str) -> str:
        from fleet.remote import Op

        audit.refuse_if_read_only("server.stop", f"@{self.name}:{sid}", server=sid)
        self._ask(Op.STOP_SERVER, {"id": sid}, timeout=60)
        return f"@{self.name}:{sid} stopped"

    def restart_server(self, rec: Any) -> str:
        from engine.managed import LocalGpus
        from fleet.remote import AgentError

        _, sid = split_id(rec.id)
        if not isinstance(rec.gpus, LocalGpus):  # said before the stop: the agent starts on its own GPUs only
            raise AgentError(f"{self.name}: {sid} runs on {rec.gpus}; restart it on the node (`fleetdeck serve ...`)")
        self.stop_server(sid)
        started = self.start_server(rec.name, list(rec.gpus.indices), force=True)
        return f"@{self.name}:{sid} restarted: {started}"

    def jobs(self) -> list[tuple[Any, list[dict[str, Any]]]]:
        from engine.finetune.jobs import JobRecord
        from fleet.remote import Op

        out = []
        for doc in self._ask(Op.LIST_JOBS, timeout=10):
            events = doc.get("events") or []
            rec = JobRecord.from_json(doc)
            rec.id = f"@{self.name}:{rec.id}"
            out.append((rec, events))
        return out

    def cancel_job(self, jid: str) -> str:
        from fleet.remote import Op

        audit.refuse_if_read_only("job.cancel", f"@{self.name}:{jid}", job=jid)
        doc = self._ask(Op.CANCEL_JOB, {"id": jid}, timeout=180)
        return f"@{self.name}:{doc['id']}: {doc['state']}"

    def resume_job(self, jid: str) -> str:
        from fleet.remote import Op

        audit.refuse_if_read_only("job.resume", f"@{self.name}:{jid}", job=jid)
        doc = self._ask(Op.RESUME_JOB, {"id": jid}, timeout=60)
        return f"@{self.name}:{doc['id']}: {doc['state']}"

    def tail_log(self, kind: str, ident: str, n: int = 200) -> str:
        from fleet.remote import Op

        return str(self._ask(Op.TAIL_LOG, {"id": ident, "n": n, "kind": kind}, timeout=30))

    def adapters(self, sid: str | None) -> AdapterListing:
        from fleet.remote import Op

        return AdapterListing.from_json(self._ask(Op.LIST_ADAPTERS, {"server": sid} if sid else {}, timeout=30))

    def load_adapter(self, sid: str, adapter: str) -> str:
        from fleet.remote import Op

        audit.refuse_if_read_only("adapter.load", adapter, server=f"@{self.name}:{sid}", adapter=adapter)
        return str(self._ask(Op.LOAD_ADAPTER, {"server": sid, "adapter": adapter}, timeout=180))

    def swap_adapter(self, sid: str, old: str, adapter: str) -> str:
        from fleet.remote import Op

        audit.refuse_if_read_only("adapter.swap", adapter, server=f"@{self.name}:{sid}", old=old, adapter=adapter)
        return str(self._ask(Op.SWAP_ADAPTER, {"server": sid, "adapter": adapter, "old": old}, timeout=180))

    def unload_adapter(self, sid: str, name: str) -> str:
        from fleet.remote import Op

        audit.refuse_if_read_only("adapter.unload", name, server=f"@{self.name}:{sid}", adapter=name)
        return str(self._ask(Op.UNLOAD_ADAPTER, {"server": sid, "name": name}, timeout=60))

    # The agent protocol (v2) has no op to signal a process or to prune records: these are refused here,
    # audited, with what to do instead, rather than stretched over an op that means something else.
    def kill_process(self, req: Any) -> str:
        from engine.processes import KillError

        audit.refuse_if_read_only("process.kill", f"{req.node}:{req.pid}", node=req.node, pid=req.pid)
        why = (f"{self.name} is reached over SSH and its agent cannot signal processes: "
               f"ssh {self.name} and kill {req.pid} there, or stop its server or job")
        audit.record("process.kill", f"{req.node}:{req.pid}", "refused", why, node=req.node, pid=req.pid,
                     gpu=req.gpu, user=req.user, command=req.command[:200])
        raise KillError(why)

    def prune_servers(self) -> str:
        from fleet.remote import AgentError

        raise AgentError(f"{self.name}: prune its ended servers on the node (`fleetdeck serve prune`)")

    def prune_jobs(self) -> str:
        from fleet.remote import AgentError

        raise AgentError(f"{self.name}: prune its ended jobs on the node (`fleetdeck finetune prune`)")


def serve_adapter(ops: NodeOps, adapter: str) -> str:
    """Load an adapter of a node into the first ready server of that node that can serve it."""
    from engine.adapters import registry as engine_adapters

    listing = ops.adapters(None)
    found = next((a for a in listing.adapters if a.name == adapter), None)
    if found is None:
        raise engine_adapters.AdapterError(f"no adapter {adapter!r} in the adapter roots of {ops.name or 'this host'}: "
                                           "add the job's adapter_root to the node's adapter_roots")
    for st in ops.servers():
        rec = st.rec
        lora = rec.spec.get("lora", {})
        if rec.state == ServerState.READY and not engine_adapters.compatibility_problems(
                found, rec.spec.get("model", ""), lora.get("enable", False), lora.get("max_lora_rank", 16)):
            return f"{rec.id}: " + ops.load_adapter(split_id(rec.id)[1], adapter)
    raise engine_adapters.AdapterError(f"no ready server can take {adapter} (same base model, LoRA on, max rank >= "
                                       f"{found.rank})")


def remote_ops(sources: Iterable[Any]) -> list[AgentOps]:
    """The connected SSH nodes among a poller's sources."""
    from fleet.remote import RemoteNode

    return [AgentOps(s) for s in sources if isinstance(s, RemoteNode) and s.link.status == "connected"]


def ops_named(sources: Iterable[Any], local: LocalOps, node: str | None) -> NodeOps:
    """A node by its name in the fleet: a node reached over SSH, or else this host (None, or the name of
    one of this host's own sources)."""
    from fleet.remote import AgentError, RemoteNode

    remote = next((s for s in sources if isinstance(s, RemoteNode) and s.name == node), None) if node else None
    if remote is None:
        return local
    if remote.link.status != "connected":
        raise AgentError(f"{node} is not connected ({remote.link.error or remote.link.status})")
    return AgentOps(remote)


def ops_for(sources: Iterable[Any], local: LocalOps, shown_id: str) -> tuple[NodeOps, str]:
    """The node an id (`@node:id` or a local id) lives on, and the id there."""
    from fleet.remote import AgentError, RemoteNode

    node, ident = split_id(shown_id)
    if node is None:
        return local, ident
    for s in sources:
        if isinstance(s, RemoteNode) and s.name == node:
            return AgentOps(s), ident
    raise AgentError(f"{node} is not connected")
