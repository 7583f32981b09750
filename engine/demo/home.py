"""The demo's own folder: everything `fleetdeck demo` keeps and starts, apart from the operator's.

`~/.local/share/fleetdeck/demo/` holds its store, its launch profiles, fine-tune specs, model folders
(a config.json each), dataset, adapters, server logs, job folders, the backend's files and the record of
the helper processes the demo's dashboard started (engine/demo/lifetimes.py). `fleetdeck demo --reset` ends
what the demo started and removes the folder. One demo dashboard runs at a time (a lock held for its
life); a new one first ends whatever an earlier one left running, by recorded pid and create time, and
never adopts it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.demo.lifetimes import HelperLedger
from engine.finetune import jobs
from engine.finetune.jobs import training_estimate
from engine.finetune.spec import JobSpec
from engine.host.folders import Folders
from engine.vllm import launcher
from engine.vllm.record import LIVE, ServerState
from engine.vllm.demo import write_demo_files
from fleet.simulated import SimProcess
from store.db import open_store
from store.paths import data_dir, private_dir

if TYPE_CHECKING:
    from store.db import Store


class DemoBusy(Exception):
    """Another demo dashboard holds the demo folder; the message names its pid."""


@dataclass(frozen=True)
class DemoHome:
    root: Path

    @classmethod
    def default(cls) -> DemoHome:
        return cls(data_dir() / "demo")

    @property
    def store(self) -> Path:
        return self.root / "demo.db"

    @property
    def profiles(self) -> Path:
        return self.root / "profiles"

    @property
    def specs(self) -> Path:
        return self.root / "finetune"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def server_logs(self) -> Path:
        return self.root / "servers"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def backend(self) -> Path:
        """The backend's own files: the router config it writes, its log, the proxy's log."""
        return self.root / "backend"

    @property
    def router_config(self) -> Path:
        return self.backend / "demo-router.toml"

    @property
    def remote_config(self) -> Path:
        """The fleet config of the demo's node behind the agent: the demo's adapters and models, never the
        operator's own fleet.toml (which the agent would read by default)."""
        return self.root / "sim-remote-04.toml"

    @property
    def helpers(self) -> HelperLedger:
        return HelperLedger(self.root / "helpers.jsonl")

    def folders(self) -> Folders:
        return Folders(profiles=(self.profiles,), specs=(self.specs,), server_logs=self.server_logs, jobs=self.jobs)

    def prepare(self) -> None:
        """The demo's files, made once (kept across runs until --reset)."""
        private_dir(self.root)
        write_demo_files(self)
        self.remote_config.write_text(  # JSON's string escapes are TOML's: any path is quoted right
            f"adapter_roots = [{json.dumps(str(self.adapters))}]\n\n[models]\nroots = [{json.dumps(str(self.models))}]\n")

    # -- one demo at a time ---------------------------------------------------------------------
    def lock(self) -> int:
        """Hold the demo folder for this process's life (the kernel lets go when it ends, however it
        ends). Returns the lock's descriptor; raises DemoBusy if another demo dashboard holds it."""
        private_dir(self.root)
        fd = os.open(self.root / "demo.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DemoBusy(f"another `fleetdeck demo` is running (pid {holder}) on {self.root}: close it first "
                           "(q in its terminal)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    # -- ending what the demo started -----------------------------------------------------------
    def end_leftovers(self) -> list[str]:
        """End what an earlier demo left running (its helpers, then its servers and jobs): by the pids
        and create times it recorded. Returns a line per thing ended."""
        ended = [f"{h.what} (pid {h.pid})" for h in self.helpers.end_all()]
        if self.store.exists():
            store = open_store(self.store)
            try:
                ended += stop_everything(store)
            finally:
                store.close()
        return ended

    def reset(self) -> list[str]:
        """`fleetdeck demo --reset`: end what the demo started, then remove its folder, and with its store
        that store's audit checkpoint. The checkpoint lives beside the audit key, outside the folder; left
        behind, it named a record the next demo's fresh store lacks, and that demo's Audit screen said
        CHAIN BROKEN for good (seen after a reset). Only the demo store's own files go: the key stays."""
        from engine.audit.anchor import Anchor

        ended = self.end_leftovers() if self.root.exists() else []
        anchor = Anchor.of(self.store)  # named after the store's path: taken before the folder goes
        shutil.rmtree(self.root, ignore_errors=True)
        for f in (anchor.checkpoint_file, anchor.pending_file, anchor.lock_file):
            f.unlink(missing_ok=True)
        return ended


DEMO_ENDED = "stopped as the demo ended (q, or its terminal closed)"


def forget_earlier_runs(store: Store) -> list[str]:
    """A new demo's backend forgets the servers and jobs that earlier demos ended (their logs and job
    folders stay in the demo's folder): each run left its three servers and its job behind as stopped rows,
    and after a few runs at 80x24 the live servers were below the fold. Audited, as any prune; a demo
    that may not write (read-only) keeps them."""
    from engine.audit import trail as audit

    try:
        return [r.id for r in launcher.prune(store)] + [j.id for j in jobs.prune(store)]
    except audit.ReadOnlyError:
        return []


def stop_everything(store: Store, timeout: float = 5.0) -> list[str]:
    """Stop every server and job the demo's store records as live: through the engine (audited, as any
    stop), and if that is refused (a read-only demo) or fails, by their recorded pid and create time.
    Everything in the demo is simulated and the demo's own: nothing of it outlives the demo."""
    ended = []
    for rec in launcher.list_servers(store):
        if rec.state not in LIVE:
            continue
        if not rec.alive():
            launcher.refresh(store, rec)  # gone already: its record says so (crashed, with the log's diagnosis)
            continue
        try:
            stopped = launcher.stop(store, rec, timeout=timeout)
            if stopped.state == ServerState.STOPPED:
                # Not "stopped by the operator": the next demo listed its predecessor's servers so, and
                # nobody had stopped them.
                stopped.reason = DEMO_ENDED
                stopped.save(store)
        except Exception:
            rec.terminate(timeout, whole_group=True)
        ended.append(f"server {rec.id} (pid {rec.pid})")
    for job in jobs.list_jobs(store):
        if job.state != jobs.JobState.RUNNING:
            continue
        if not job.alive():
            jobs.refresh(store, job)  # ended already: its record says how (from its progress events)
            continue
        try:
            jobs.cancel(store, job, timeout=timeout)
        except Exception:
            job.terminate(timeout, whole_group=False)
        ended.append(f"job {job.id} (pid {job.pid})")
    return ended


class DemoProcesses:
    """What runs on the demo's simulated GPUs: the live servers and jobs its store records, on the node
    and GPUs each was started on, with their real pids (fleet.simulated.LiveProcesses). A server holds
    its profile's gpu_memory_utilization of the GPU, as vLLM does; a fine-tune its VRAM estimate."""

    def __init__(self, store_path: Path, max_age_s: float = 1.0, one_node: bool = False) -> None:
        self.store_path = store_path
        self.max_age_s = max_age_s
        self.one_node = one_node  # the store is one node's (an agent's): all it runs is on the node asked about
        self._store: Store | None = None
        self._lock = threading.Lock()
        self._read_at = 0.0
        self._by_node: dict[str, list[SimProcess]] = {}
        self._vram: dict[str, int] = {}

    def __call__(self, node: str) -> list[SimProcess]:
        with self._lock:
            if time.monotonic() - self._read_at > self.max_age_s:
                self._by_node = self._read()
                self._read_at = time.monotonic()
            if self.one_node:
                return [p for procs in self._by_node.values() for p in procs]
            return list(self._by_node.get(node, []))

    def _read(self) -> dict[str, list[SimProcess]]:
        if self._store is None:
            if not self.store_path.exists():
                return {}
            self._store = open_store(self.store_path)
        out: dict[str, list[SimProcess]] = {}
        for rec in launcher.list_servers(self._store):
            if rec.state not in LIVE or rec.pid is None or not rec.alive():
                continue
            util = float(rec.spec.get("gpu_memory_utilization", 0.9))
            for g in _gpus(rec.gpus):
                out.setdefault(rec.node, []).append(SimProcess(
                    gpu=g, kind="vllm", pid=rec.pid, model=rec.served_name, port=rec.port, memory_fraction=util,
                    user="svc-llm", command=" ".join(rec.argv)))
        for job in jobs.list_jobs(self._store):
            if job.state != jobs.JobState.RUNNING or job.pid is None or not job.alive():
                continue
            for g in _gpus(job.gpus):
                out.setdefault(job.node, []).append(SimProcess(
                    gpu=g, kind="finetune", pid=job.pid, model=job.id, memory_bytes=self._job_vram(job),
                    user="mlops", command=" ".join(job.argv)))
        return out

    def _job_vram(self, job: Any) -> int:
        if job.id not in self._vram:
            try:
                self._vram[job.id] = int(training_estimate(JobSpec.model_validate(job.spec)).total_bytes)
            except Exception:  # a spec this build cannot size: a typical QLoRA of a 7-8B model
                self._vram[job.id] = 12 * 1024**3
        return self._vram[job.id]

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


def _gpus(placement: Any) -> list[int]:
    from engine.managed import LocalGpus

    return list(placement.indices) if isinstance(placement, LocalGpus) else []
