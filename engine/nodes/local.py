"""This host as a node: the engine on the dashboard's own store (and, run by the agent, on a node's).

One implementation of `NodeOps` for both: the CLI and the TUI call it for this host, and the agent
(engine/nodes/agent.py) answers every op of a dashboard by calling it, so what a node does for a remote
dashboard is what it does for its own operator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.adapters import registry as engine_adapters
from engine.audit import trail as audit
from engine.slurm import client as engine_slurm
from engine.adapters.evaluation import evals_of
from engine.adapters.registry import integrity_problem
from engine.adapters.registry import Adapter
from engine.finetune import jobs
from engine.finetune.jobs import JobRecord, SlurmRequest
from engine.finetune.spec import JobSpec, load_spec
from engine.host.folders import Folders
from engine.kvfit.local_models import LocalModel, configured_roots, list_local
from engine.io.logs import tail
from engine.nodes.ops import AdapterListing, JobProgress, ServerPlan, ServerRestarted, ServerStarted, with_model
from engine.managed import SlurmGpus
from engine.nodes.placement import gpu_indices
from engine.nodes.processes import KillRequest, kill_gpu_process
from engine.slurm.client import ClusterView
from engine.vllm import launcher, slurm_server
from engine.vllm.command import LaunchError, preflight
from engine.vllm.record import LIVE, ServerRecord
from engine.vllm.profile import Profile, load_profile
from engine.vllm.status import ServerStatus, status_of
from fleet.inventory import check_gpus
from fleet.protocol import SlurmAsk
from store.config_files import NAME_PATTERN, named_tomls, toml_by_name

if TYPE_CHECKING:
    from store.db import Store


class NotConfigured(ValueError):
    """The node lacks what an op needs (its [slurm] settings): a refusal, not a failure."""


class OutsideItsFolder(ValueError):
    """A name of the node's folders that is a symbolic link to somewhere else: a request names what the
    node's own folders hold, and a link would let whoever made it choose the file (refused, not a failure)."""


def within_folder(kind: str, name: str, path: Path, folders: list[Path]) -> Path:
    """`path` (a profile or spec file, an adapter folder) if its real path is inside one of `folders` (their
    real paths: a folder may itself be a link); OutsideItsFolder naming the link otherwise."""
    real = path.resolve()
    if not any(real != f and real.is_relative_to(f) for f in (Path(f).resolve() for f in folders)):
        where = f"{path} -> {real}" if real != path else f"it is {real}"
        raise OutsideItsFolder(f"{kind} {name!r} is a symbolic link out of its folder ({where}): a request "
                               f"to this node's agent follows none; put the {kind} itself in "
                               f"{' or '.join(str(f) for f in folders)}")
    return path


def usable_tomls(roots: list[Path], confined: bool = False) -> dict[str, Path]:
    """The `NAME.toml` files of `roots` a start can use, by name (the first folder that has a name wins, as
    `toml_by_name` finds them): a name a request can carry, a file (not a folder, not a dangling link) and,
    `confined` (the agent), not a link out of its folder. A list shows only what can be picked."""
    usable: dict[str, Path] = {}
    for name, path in named_tomls(roots).items():
        if not re.match(NAME_PATTERN, name) or name != name.strip() or not path.is_file():
            continue
        if confined:
            try:
                within_folder("file", name, path, [path.parent])
            except OutsideItsFolder:
                continue
        usable[name] = path
    return usable


def list_adapters(store: Store, roots: list[Path], sid: str | None) -> AdapterListing:
    """This host's adapters, and those loaded in server `sid`."""
    found, problems = engine_adapters.scan(roots)
    listing = AdapterListing(found, {a.name: integrity_problem(a) for a in found}, [], problems)
    try:
        for e in reversed(evals_of(store)):
            listing.accuracy[e["adapter"]] = e["accuracy"]
    except Exception as exc:  # an older or locked store: the column stays empty
        listing.problems.append(f"evaluations unavailable: {exc}")
    if sid is not None:
        rec = launcher.get(store, sid)
        try:
            listing.loaded = [m["id"] for m in engine_adapters.loaded(rec.base_url, rec.api_key)]
        except Exception as exc:  # a server that stopped answering
            listing.problems.append(f"cannot list {sid}'s loaded adapters: {exc}")
    return listing


@dataclass
class LocalOps:
    """This host: the engine on the dashboard's own store."""

    store: Store
    adapter_roots: list[Path]
    name: str = ""
    scrapes: dict[str, Any] | None = None  # each server's previous /metrics scrape, for rates
    folders: Folders = field(default_factory=Folders)  # profiles by name, server logs (the demo has its own)
    model_roots: list[Path] | None = None  # None: the fleet config's [models] roots
    slurm_settings: Any = None  # fleet.config.SlurmSettings: the node's own [slurm]; None: not configured
    source: Any = None  # the node's GPU source: a start plans against it when the caller passes no snapshots
    # The agent's: a name in a request must be a file or folder *in* the node's folders, not a link out of
    # them (the node's own operator, at the CLI, may keep links: stow-managed dotfiles, a shared folder).
    confined: bool = False

    # -- reading ---------------------------------------------------------------------------------
    def models(self) -> list[LocalModel]:
        return list_local(configured_roots() if self.model_roots is None else self.model_roots)

    def profiles(self) -> list[str]:
        return sorted(usable_tomls(self.folders.profile_roots(), self.confined))

    def specs(self) -> list[str]:
        return sorted(usable_tomls(self.folders.spec_roots(), self.confined))

    def _config_file(self, kind: str, name: str, roots: list[Path]) -> Path:
        """A profile's or job spec's file by its name in `roots`; refused naming the link when it leads out of its
        folder (confined), else with the names that can be used."""
        try:
            path = toml_by_name(kind, name, roots)
        except ValueError:
            known = ", ".join(sorted(usable_tomls(roots, self.confined)))
            raise ValueError(f"no {kind} named {name!r} on this host; known: "
                             f"{known or 'none (folders: ' + ', '.join(str(r) for r in roots) + ')'}") from None
        return self._named(kind, name, path)

    def servers(self) -> list[ServerStatus]:
        self.scrapes = self.scrapes if self.scrapes is not None else {}
        out = []
        for rec in launcher.list_servers(self.store):
            st = status_of(launcher.refresh(self.store, rec), self.scrapes.get(rec.id))
            if st.scrape is not None:
                self.scrapes[rec.id] = st.scrape
            out.append(st)
        return out

    def jobs(self) -> list[JobProgress]:
        recs = [jobs.refresh(self.store, r) for r in jobs.list_jobs(self.store)]
        return [JobProgress(r, jobs.read_events(r.progress_path)) for r in recs]

    def tail_log(self, kind: str, ident: str, n: int = 200) -> str:
        rec = jobs.get(self.store, ident) if kind == "job" else launcher.get(self.store, ident)
        return tail(rec.log_path, n)

    def adapters(self, sid: str | None) -> AdapterListing:
        return list_adapters(self.store, list(self.adapter_roots), sid)

    def slurm_view(self) -> ClusterView:
        return engine_slurm.cluster(self._slurm_settings())

    # -- servers ---------------------------------------------------------------------------------
    def _snapshots(self, gpus: list[int] | None) -> Any:
        """The node's own GPUs at these indices, to plan against; None when it cannot read them (no NVML).
        ValueError for an index the node does not have, NVML or not (fleet/inventory.py decides): a start
        without a plan (forced) still runs only on GPUs the node has."""
        if self.source is None or not gpus:
            return None
        snap = self.source.snapshot()
        check_gpus(snap, gpus)
        return snap.gpus_at(gpus) if snap.nvml == "ok" else None

    def _refused(self, action: str, target: str, exc: Exception, **params: Any) -> None:
        """A start refused before the engine's own audited block (an index the node lacks): recorded here."""
        audit.record(action, target, "refused", str(exc), **params)

    def _slurm_settings(self) -> Any:
        if self.slurm_settings is None or not self.slurm_settings.enabled:
            raise NotConfigured("Slurm is not configured on this node ([slurm] enabled = true in its fleet config)")
        return self.slurm_settings

    def _slurm_request(self, ask: SlurmAsk) -> SlurmRequest:
        limit = engine_slurm.check_time(ask.time) if ask.time is not None else None
        return SlurmRequest(self._slurm_settings(), ask.gpus, ask.partition, limit)

    def start_server(self, profile: str, gpus: list[int], *, port: int | None = None, force: bool = False,
                     model: str | None = None, slurm: SlurmAsk | None = None, gpu_snapshots: Any = None,
                     node: str | None = None) -> ServerStarted:
        """`profile`: a name in this node's profile folders, never a path or a profile's text. `model`: one
        of models(), instead of the profile's. `node`: which of this host's own sources the GPUs belong to
        (the demo's simulated nodes), so the record says where it runs; None is this host."""
        spec = load_profile(self._config_file("profile", profile, self.folders.profile_roots()))
        if model is not None:
            spec = with_model(spec, model, self.models())
        return self.start_profile(spec, gpus, port=port, force=force, slurm=slurm, gpu_snapshots=gpu_snapshots,
                                  node=node)

    def plan_server(self, profile: str, gpus: list[int], *, model: str | None = None,
                    gpu_snapshots: Any = None) -> ServerPlan:
        """What start_server would plan for `profile` (a name in this node's folders, as there) on `gpus`, against
        `gpu_snapshots` or this node's own GPUs: the same planner on the same figures, nothing started or recorded."""
        spec = load_profile(self._config_file("profile", profile, self.folders.profile_roots()))
        if model is not None:
            spec = with_model(spec, model, self.models())
        if spec.cpu_kv_cache_bytes is not None:  # vLLM's CPU build: planned against its KV space, no GPU
            return ServerPlan(preflight(spec, []))
        snaps = gpu_snapshots if gpu_snapshots is not None else self._snapshots(gpus)
        if snaps is None:
            raise LaunchError("cannot plan it: the GPUs could not be checked (no NVML readings); a start needs --force")
        return ServerPlan(preflight(spec, snaps))

    def start_profile(self, spec: Profile, gpus: list[int], *, port: int | None = None, force: bool = False,
                      slurm: SlurmAsk | None = None, gpu_snapshots: Any = None,
                      node: str | None = None) -> ServerStarted:
        """A profile already read (the CLI's `serve start FILE.toml` on its own host); never from a request."""
        req = self._slurm_request(slurm) if slurm is not None else None
        # A profile for vLLM's CPU build runs on no GPU (planned against its KV space): its indices are nominal,
        # and a node running it has no GPU to check them against.
        on_cpu = spec.cpu_kv_cache_bytes is not None
        try:
            snaps = (gpu_snapshots if gpu_snapshots is not None or req is not None or on_cpu
                     else self._snapshots(gpus))
        except ValueError as exc:
            self._refused("server.start", spec.name, exc, profile=spec.name, model=spec.model,
                          gpus=",".join(map(str, gpus)), port=port, force=force)
            raise
        rec, verdict = launcher.start(self.store, spec, [] if req is not None else gpus, gpu_snapshots=snaps,
                                      port=port, force=force, adapter_roots=list(self.adapter_roots), node=node,
                                      log_dir=self.folders.server_logs, slurm=req)
        return ServerStarted(rec, verdict.to_json() if verdict is not None else None)

    def stop_server(self, sid: str) -> ServerRecord:
        return launcher.stop(self.store, launcher.get(self.store, sid))

    def restart_server(self, sid: str, *, gpu_snapshots: Any = None) -> ServerRestarted:
        """A new run (a new record) of the same profile on the same placement (GPUs, or the same Slurm ask)
        and node. A server that still runs is stopped first and takes its own place again (not planned: the
        memory it frees shows late); one that had ended is planned against its GPUs as they are now, as a start
        is (`gpu_snapshots`, else this node's own), so it is refused where another server has taken them. A
        crashed one keeps its record, diagnosis included, in the history."""
        old = launcher.refresh(self.store, launcher.get(self.store, sid))
        profile = Profile.model_validate(old.spec)  # read before the stop: a record that cannot be read stops nothing
        gpus = gpu_indices(old)
        replacing = old.state in LIVE
        snaps = None if replacing or isinstance(old.gpus, SlurmGpus) else (
            gpu_snapshots if gpu_snapshots is not None else self._snapshots(gpus))
        if replacing:
            launcher.stop(self.store, old)
        if isinstance(old.gpus, SlurmGpus):
            # The same sbatch request again (count, partition, account, QoS, time limit), under a new name and log.
            new = slurm_server.resubmit(self.store, old, adapter_roots=list(self.adapter_roots),
                                        log_dir=self.folders.server_logs)
        else:
            new, _ = launcher.start(self.store, profile, gpus, force=replacing, gpu_snapshots=snaps,
                                    adapter_roots=list(self.adapter_roots), node=old.node,
                                    log_dir=self.folders.server_logs)
        return ServerRestarted(old, new)

    def prune_servers(self) -> list[str]:
        return [r.id for r in launcher.prune(self.store)]

    # -- jobs ------------------------------------------------------------------------------------
    def start_job(self, spec: str, gpus: list[int] | None, *, force: bool = False, slurm: SlurmAsk | None = None,
                  gpu_snapshots: Any = None, node: str | None = None) -> JobRecord:
        """`spec`: a job spec's name in this node's folders, never a path or a spec's text."""
        job = load_spec(self._config_file("job spec", spec, self.folders.spec_roots()))
        return self.start_spec(job, gpus, force=force, slurm=slurm, gpu_snapshots=gpu_snapshots, node=node)

    def start_spec(self, job: JobSpec, gpus: list[int] | None, *, force: bool = False, slurm: SlurmAsk | None = None,
                   gpu_snapshots: Any = None, node: str | None = None) -> JobRecord:
        """A spec already read (the CLI's `finetune start FILE.toml`). Its adapter lands in the spec's
        adapter_root, else this node's first adapter root (where serving it looks)."""
        root = job.adapter_root or (self.adapter_roots[0] if self.adapter_roots else None)
        if slurm is not None:
            return jobs.start(self.store, job, None, force=force, adapter_root=root, slurm=self._slurm_request(slurm),
                              jobs_dir=self.folders.jobs)
        try:
            snaps = gpu_snapshots if gpu_snapshots is not None else self._snapshots(gpus)
        except ValueError as exc:
            self._refused("job.start", job.name, exc, spec=job.name, gpus=",".join(map(str, gpus or [])) or "cpu",
                          force=force)
            raise
        return jobs.start(self.store, job, gpus or None, gpu_snapshots=snaps, force=force, adapter_root=root,
                          node=node, jobs_dir=self.folders.jobs)

    def cancel_job(self, jid: str) -> JobRecord:
        return jobs.cancel(self.store, jobs.get(self.store, jid))

    def resume_job(self, jid: str) -> JobRecord:
        return jobs.resume(self.store, jobs.get(self.store, jid))

    def prune_jobs(self) -> list[str]:
        return [r.id for r in jobs.prune(self.store)]

    # -- adapters --------------------------------------------------------------------------------
    def _load(self, sid: str, adapter: str, name: str | None, old: str | None) -> str:
        found = engine_adapters.by_name(list(self.adapter_roots), adapter)
        self._named("adapter", adapter, Path(found.path), list(self.adapter_roots))
        return self.load_adapter_from(sid, found, name, old)

    def _named(self, kind: str, name: str, path: Path, folders: list[Path] | None = None) -> Path:
        """A named file or folder, checked to be in its folders when confined; a profile's or spec's folder
        is the one it was found in (path.parent), an adapter's (whose path is already resolved) its roots."""
        return within_folder(kind, name, path, folders or [path.parent]) if self.confined else path

    def load_adapter_from(self, sid: str, adapter: Adapter, name: str | None, old: str | None) -> str:
        """An adapter already found (the CLI also takes a folder on its own host); never from a request."""
        server = launcher.refresh(self.store, launcher.get(self.store, sid))
        return engine_adapters.load_into(server, adapter, name, old)

    def load_adapter(self, sid: str, adapter: str, name: str | None = None) -> str:
        return self._load(sid, adapter, name, None)

    def swap_adapter(self, sid: str, old: str, adapter: str, name: str | None = None) -> str:
        return self._load(sid, adapter, name, old)

    def unload_adapter(self, sid: str, name: str) -> str:
        rec = launcher.get(self.store, sid)
        return engine_adapters.unload(rec.base_url, name, rec.api_key, server=rec.id)

    # -- processes -------------------------------------------------------------------------------
    def kill_process(self, req: KillRequest, grace_s: float = 5.0) -> str:
        return kill_gpu_process(req, grace_s=grace_s)
