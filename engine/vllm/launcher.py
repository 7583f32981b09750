"""Starting, watching and stopping vLLM servers.

The launcher starts the argument list engine/vllm/command.py builds (never a shell string, the chosen GPUs
pinned with CUDA_VISIBLE_DEVICES, runtime LoRA updating on when LoRA is on), starts the server in its own
session with its output in a log file (so it outlives the dashboard), and records pid, process create
time, command, GPUs, port and log in the store. State comes from the process and the HTTP API:
starting (alive, not answering /health), ready (/health 200 and /v1/models), crashed (gone without
being stopped; the log tail says why), stopped. A Slurm server (engine/vllm/slurm_server.py) is started, watched
and stopped through the same functions; its record (engine/vllm/record.py) says where it runs.
"""

from __future__ import annotations

import os
import shlex
import socket
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import psutil

from engine import managed
from engine.managed import LocalGpus
from engine.audit import trail as audit
from engine.io.logs import tail
from engine.slurm import client as slurm_client
from engine.vllm import slurm_server
from engine.vllm.command import (LaunchError, UnplannableError, build_launch, check_exposure, choose_port, listen_host,
                                 preflight, resolve_preload)
from engine.vllm.diagnose import diagnose
from engine.vllm.profile import VLLM_LORA_RANKS, Profile
from engine.vllm.record import ENDED, LIVE, ServerRecord, ServerState, probe
from store.paths import private_dir, state_dir

if TYPE_CHECKING:
    from store.db import Store


def start(store: Store, profile: Profile, gpus: Sequence[int], *, gpu_snapshots: Sequence[Any] | None = None,
          port: int | None = None, force: bool = False, adapter_roots: list[Path] | None = None,
          node: str | None = None, log_dir: Path | None = None, slurm: Any = None) -> tuple[ServerRecord, Any]:
    """Start a server (or, with `slurm`, a jobs.SlurmRequest, submit it to Slurm); returns its record and
    the planner's verdict. Raises LaunchError on refusal."""
    where = str(managed.SlurmGpus(slurm.gpus) if slurm is not None else LocalGpus(tuple(gpus)))
    with audit.audited("server.start", profile.name, refusals=(LaunchError, ValueError), profile=profile.name,
                       model=profile.model, gpus=where, port=port, force=force) as entry:
        check_exposure(profile, listen_host(profile, slurm=slurm is not None))  # refused (and audited) first
        if slurm is not None:
            chosen = port or choose_port(profile.port, taken=_ports_taken(store))
            rec, verdict = slurm_server.submit(store, profile, slurm, port=chosen, force=force,
                                               adapter_roots=adapter_roots, log_dir=log_dir)
        else:
            rec, verdict = _start(store, profile, gpus, gpu_snapshots=gpu_snapshots, port=port, force=force,
                                  adapter_roots=adapter_roots, node=node, log_dir=log_dir)
        entry.target = entry.params["server"] = rec.id
        return rec, verdict


def _start(store: Store, profile: Profile, gpus: Sequence[int], *, gpu_snapshots: Sequence[Any] | None,
           port: int | None, force: bool, adapter_roots: list[Path] | None, node: str | None,
           log_dir: Path | None) -> tuple[ServerRecord, Any]:
    if profile.lora.enable and profile.lora.max_lora_rank not in VLLM_LORA_RANKS and not force:
        raise LaunchError(f"max_lora_rank {profile.lora.max_lora_rank} is not one vLLM accepts "
                          f"({', '.join(map(str, VLLM_LORA_RANKS))}): it would refuse to start. Use the next one up "
                          f"({next((r for r in VLLM_LORA_RANKS if r >= profile.lora.max_lora_rank), 512)}); "
                          "--force starts it anyway")
    verdict = None
    warning = None
    if gpu_snapshots is not None or profile.cpu_kv_cache_bytes is not None:
        try:
            verdict = preflight(profile, gpu_snapshots or [])
        except UnplannableError as exc:
            if not force:
                raise
            warning = f"started without a plan: {exc}"
        if verdict is not None and not verdict.fits and not force:
            raise LaunchError(f"preflight: DOES NOT FIT: {verdict.reason} (--force starts it anyway)")
    elif not force:
        raise LaunchError("the GPUs could not be checked (no NVML readings); --force starts it anyway")
    else:
        warning = "started without a plan: the GPUs could not be checked (no NVML readings)"
    lora_modules = resolve_preload(profile, adapter_roots or []) if profile.lora.enable else {}
    chosen_port = port or choose_port(profile.port, taken=_ports_taken(store))
    argv, env = build_launch(profile, gpus, chosen_port, lora_modules)
    sid = f"{profile.name}-{uuid.uuid4().hex[:6]}"
    logs = private_dir(log_dir or (state_dir() / "servers"))
    log_path = logs / f"{sid}.log"
    with open(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
        log.write(f"# fleetdeck: {' '.join(shlex.quote(a) for a in argv)}\n".encode())
    try:
        pid, create_time = managed.spawn(argv, env, str(log_path))
    except OSError as exc:
        raise LaunchError(f"could not start {argv[0]}: {exc}") from exc
    shown_env = {k: ("***" if k == "VLLM_API_KEY" else v) for k, v in env.items()}
    rec = ServerRecord(
        id=sid, name=profile.name, node=node or socket.gethostname(), pid=pid, create_time=create_time,
        argv=argv, env=shown_env, gpus=LocalGpus(tuple(gpus)), port=chosen_port, log_path=str(log_path),
        spec=profile.model_dump(mode="json"), state=ServerState.STARTING, reason=warning, started_at=time.time(),
        predicted_kv_tokens=verdict.kv_tokens if verdict is not None else None,
    )
    rec.save(store)
    return rec, verdict


def _ports_taken(store: Store) -> set[int]:
    return {r.port for r in list_servers(store) if r.state in LIVE and r.port}


def answered_by_own_process(rec: ServerRecord) -> bool:
    """The socket listening on the server's port belongs to its own process tree.

    A port chosen by choose_port is only free when it was chosen: until the server binds it (seconds for
    the simulator, minutes for a real vLLM loading weights) another process may take it, and its
    answers to /health must not make this server "ready". Processes we cannot inspect (another user's,
    an adopted pid) leave the HTTP answer as the only evidence, so it is trusted.
    """
    if rec.pid is None or not rec.port:
        return True
    try:
        root = psutil.Process(rec.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    for proc in tree:
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied:
            return True
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == rec.port for c in conns):
            return True
    return False


# vLLM V1 runs the model in a child process titled "VLLM::EngineCore" (the kernel keeps 15 characters).
ENGINE_TITLE = "VLLM::EngineCor"


def _engine_process(pid: int) -> psutil.Process | None:
    try:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                if child.name().startswith(ENGINE_TITLE) or any("EngineCore" in a for a in child.cmdline()[:1]):
                    return child
            except psutil.Error:
                continue
    except psutil.Error:
        return None
    return None


def engine_lost(rec: ServerRecord) -> str | None:
    """Why the server cannot serve although its API process lives: its engine process died.

    /health alone is not enough: vLLM's API server can answer it while the engine behind it is gone.
    The engine is remembered (pid and create time) the first time it is seen; a server without one
    (the simulator, or vLLM's older single-process engine) is judged by its API process alone.
    """
    if rec.pid is None:
        return None
    if rec.engine_pid is None:
        engine = _engine_process(rec.pid)
        if engine is not None:
            try:
                rec.engine_pid, rec.engine_create_time = engine.pid, engine.create_time()
            except psutil.Error:  # it ended between the two calls: the next refresh decides
                return None
        return None
    if managed.alive(rec.engine_pid, rec.engine_create_time):
        return None
    return (f"vLLM's engine process (pid {rec.engine_pid}) died while its API server (pid {rec.pid}) still runs: "
            "requests cannot be served. Fix: restart the server (`r` on the Servers screen, or serve stop then start); "
            "the log may say why it died.")


def refresh(store: Store, rec: ServerRecord) -> ServerRecord:
    """Bring a record up to date with the process and the HTTP API; write changes back (not to a store opened
    read-only: `noticed`)."""
    if rec.state in ENDED:
        return rec
    if rec.slurm is not None:
        before_slurm = (rec.state, rec.reason, replace(rec.slurm))
        slurm_server.refresh(rec)
        if (rec.state, rec.reason, rec.slurm) != before_slurm:
            rec.noticed(store)
        return rec
    before = (rec.state, rec.reason, rec.engine_pid)
    alive = rec.alive()
    # Probed before the engine is looked for: vLLM answers only once its engine runs, so a server first
    # seen ready has its engine recorded in the same refresh (a kill of it right after is then noticed).
    # Ready only when the answer comes from this server's own processes, not another on the same port.
    answers = alive and probe(rec) and (rec.state == ServerState.READY or answered_by_own_process(rec))
    lost = engine_lost(rec) if alive else None
    if not alive:
        # A stop may have ended it since this copy of the record was read (the Servers screen refreshes
        # while an operator stops): the stop's record stands, it is not a crash.
        stored = managed.find(store, ServerRecord, rec.id)
        if stored is not None and stored.state in ENDED:
            return stored
        rec.state = ServerState.CRASHED
        rec.ended_at = rec.ended_at or time.time()
        d = diagnose(tail(rec.log_path, 200))
        rec.reason = d.text() if d else "the process exited; see the log (`fleetdeck serve logs " + rec.id + "`)"
    elif lost:
        rec.state = ServerState.CRASHED
        rec.ended_at = rec.ended_at or time.time()
        rec.reason = lost
    elif answers:
        rec.state = ServerState.READY
    # Alive but not answering: a starting server stays starting, and a ready one that misses a probe
    # stays ready (a busy server can be slow to answer).
    if rec.state == ServerState.READY and rec.reason and rec.reason.startswith("started without a plan"):
        rec.reason = None
    if (rec.state, rec.reason, rec.engine_pid) != before:
        rec.noticed(store)
    return rec


def list_servers(store: Store, include_ended: bool = True) -> list[ServerRecord]:
    recs = managed.load_all(store, ServerRecord)
    return [r for r in recs if include_ended or r.state != ServerState.STOPPED]


def get(store: Store, sid: str) -> ServerRecord:
    return managed.get(store, ServerRecord, sid, LaunchError)




def prune(store: Store) -> list[ServerRecord]:
    """Forget the servers that have ended (stopped, crashed): their records leave the store, their log
    files stay on disk (a crash's diagnosis can still be read there). Audited as one action."""
    return managed.prune(store, ServerRecord, ENDED, refresh)


def stop(store: Store, rec: ServerRecord, timeout: float = 20.0) -> ServerRecord:
    """SIGTERM the server's process group, then SIGKILL after the timeout."""
    with audit.audited("server.stop", rec.id, server=rec.id):
        # Refreshed first: a server that crashed since it was last looked at keeps its diagnosis.
        return _stop(store, refresh(store, rec), timeout)


def _stop(store: Store, rec: ServerRecord, timeout: float) -> ServerRecord:
    if rec.slurm is not None:
        try:
            slurm_server.stop(rec, timeout)
        except slurm_client.SlurmError as exc:
            raise LaunchError(f"cannot stop Slurm job {rec.slurm.id}: {exc}") from exc
    else:
        rec.terminate(timeout, whole_group=True)
    if rec.state == ServerState.CRASHED:
        # What is left of a crashed server (an API process whose engine died) is ended, but the record
        # stays what it was: the crash and its diagnosis are the history an operator needs.
        rec.ended_at = rec.ended_at or time.time()
    else:
        rec.state = ServerState.STOPPED
        rec.ended_at = time.time()
        rec.reason = "stopped by the operator"
    rec.save(store)
    return rec


def wait_ready(store: Store, rec: ServerRecord, timeout: float = 600.0, poll: float = 0.5) -> ServerRecord:
    deadline = time.time() + timeout
    while time.time() < deadline:
        rec = refresh(store, rec)
        if rec.state != ServerState.STARTING:
            return rec
        time.sleep(poll)
    return rec
