"""A vLLM server as a long-running Slurm job: submitted with the argv a local one gets (command.py), found
on its node when Slurm starts it, stopped with scancel; a job the scheduler ends (time limit,
pre-emption, an administrator's scancel, a node failure) shows as crashed with Slurm's word for it."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from engine import managed
from engine.audit import trail as audit
from engine.io.logs import tail
from engine.slurm import client as slurm
from engine.vllm.command import (LaunchError, UnplannableError, build_launch, check_exposure, listen_host, preflight,
                                 resolve_preload)
from engine.vllm.diagnose import diagnose
from engine.vllm.profile import Profile
from engine.vllm.record import ServerRecord, ServerState, probe
from fleet.model import GpuSnapshot
from store.paths import private_dir, state_dir

if TYPE_CHECKING:
    from store.db import Store


def submit(store: Store, profile: Profile, req: Any, *, port: int, force: bool, adapter_roots: list[Path] | None,
           log_dir: Path | None) -> tuple[Any, Any]:
    """`req` is an engine.finetune.jobs.SlurmRequest (GPU count, partition, time limit, the site's settings)."""
    gib = 1024**3
    verdict, warning = None, None
    per_gpu = req.settings.gpu_memory_gib
    if profile.cpu_kv_cache_bytes is not None or per_gpu:
        # The GPUs are Slurm's to pick: plan against the cluster's GPU size from the config.
        snaps = [GpuSnapshot(node="slurm", index=i, uuid=f"slurm-{i}", name="Slurm GPU",
                             memory_total_bytes=int(per_gpu * gib), memory_used_bytes=0)
                 for i in range(req.gpus)] if per_gpu else []
        try:
            verdict = preflight(profile, snaps)
        except UnplannableError as exc:
            if not force:
                raise
            warning = f"submitted without a plan: {exc}"
        if verdict is not None and not verdict.fits and not force:
            raise LaunchError(f"preflight: {verdict.reason} (planner: {verdict.kv_tokens:,} KV tokens on "
                                       f"{req.gpus} x {per_gpu:g} GiB; --force submits it anyway)")
    elif not force:
        raise LaunchError("the cluster's GPU size is unknown, so the profile cannot be planned: set [slurm] "
                                   "gpu_memory_gib, or --force submits it anyway")
    else:
        warning = "submitted without a plan ([slurm] gpu_memory_gib is not set)"

    def reason(job: str) -> str:
        return warning or f"Slurm {job} submitted"

    def options(sid: str, log_path: Path, workdir: Path) -> list[str]:
        return slurm.sbatch_args(req.settings, name=f"fleetdeck-{sid}", output=log_path, gpus=req.gpus,
                                 partition=req.partition, time_limit=req.time_limit,
                                 signal_before_s=req.settings.signal_before_s, workdir=workdir,
                                 comment=f"fleetdeck server {sid}: {profile.model} on port {port}")

    rec = _submit(store, profile, port, req.gpus, slurm.Where.of(req.settings), options, reason,
                  adapter_roots=adapter_roots, log_dir=log_dir,
                  predicted_kv_tokens=verdict.kv_tokens if verdict is not None else None)
    return rec, verdict


def _submit(store: Store, profile: Profile, port: int, gpus: int, where: slurm.Where,
            options: Callable[[str, Path, Path], list[str]], reason: Callable[[str], str], *,
            adapter_roots: list[Path] | None, log_dir: Path | None, predicted_kv_tokens: int | None = None
            ) -> ServerRecord:
    """sbatch the profile's server (`options(sid, log_path, workdir)`: its sbatch options) and record it."""
    lora_modules = resolve_preload(profile, adapter_roots or []) if profile.lora.enable else {}
    # Not loopback: the server runs on a compute node and the login node reaches it at the node's address.
    argv, env = build_launch(profile, [], port, lora_modules, host=listen_host(profile, slurm=True))
    env.pop("CUDA_VISIBLE_DEVICES", None)  # Slurm sets it to the GPUs it allocates
    sid = f"{profile.name}-{uuid.uuid4().hex[:6]}"
    logs = private_dir(log_dir or (state_dir() / "servers"))
    workdir = private_dir(logs / f"{sid}.slurm")
    log_path = logs / f"{sid}.log"
    opts = options(sid, log_path, workdir)
    try:
        job_id = slurm.submit(where, opts, workdir, argv, managed.child_env(env))
    except slurm.SlurmError as exc:
        raise LaunchError(f"Slurm refused the server: {exc}") from exc
    shown_env = {k: ("***" if k == "VLLM_API_KEY" else v) for k, v in env.items()}
    rec = ServerRecord(
        id=sid, name=profile.name, node="slurm", pid=None, create_time=None, argv=argv, env=shown_env,
        gpus=managed.SlurmGpus(gpus), port=port, log_path=str(log_path),
        spec=profile.model_dump(mode="json"), workdir=str(workdir),
        slurm=slurm.Placement.submitted(job_id, opts, where),
        state=ServerState.STARTING, reason=reason(job_id), started_at=time.time(),
        predicted_kv_tokens=predicted_kv_tokens,
    )
    rec.save(store)
    return rec


# The sbatch options that name one run; a restart gives the new run its own (the rest is the old request).
_PER_RUN = ("--job-name", "--output", "--error", "--chdir", "--comment")


def resubmit(store: Store, old: ServerRecord, *, adapter_roots: list[Path] | None, log_dir: Path | None
             ) -> ServerRecord:
    """A new run of a Slurm server (its restart): a new record, submitted to the same Slurm with the old run's
    request (its sbatch options: GPU count, partition, account, QoS, time limit), under its own name, log and
    folder; the old record keeps its history. Audited as a `server.start`."""
    if not isinstance(old.gpus, managed.SlurmGpus) or old.slurm is None or old.port is None:
        raise LaunchError(f"{old.id} is not a Slurm server")
    profile = Profile.model_validate(old.spec)
    placed: slurm.Placement = old.slurm
    port: int = old.port
    count = old.gpus.count

    def options(sid: str, log_path: Path, workdir: Path) -> list[str]:
        fresh = {"--job-name": f"fleetdeck-{sid}", "--output": str(log_path), "--error": str(log_path),
                 "--chdir": str(workdir), "--comment": f"fleetdeck server {sid}: {profile.model} on port {port}"}
        return [f"{key}={fresh[key]}" if (key := o.split("=", 1)[0]) in _PER_RUN else o for o in placed.options]

    with audit.audited("server.start", profile.name, refusals=(LaunchError, ValueError),
                       profile=profile.name, model=profile.model, gpus=str(old.gpus), port=port, force=True) as entry:
        check_exposure(profile, listen_host(profile, slurm=True))
        rec = _submit(store, profile, port, count, placed.where, options,
                      lambda job: f"Slurm {job} submitted (a restart of {old.id})", adapter_roots=adapter_roots,
                      log_dir=log_dir)
        entry.target = entry.params["server"] = rec.id
    return rec


def _node_address(where: slurm.Where, node: str) -> str:
    """The address Slurm knows a node by (NodeAddr), which is where its server listens."""
    try:
        text = slurm.run(where, ["scontrol", "show", "node", "-o", node])
    except slurm.SlurmError:
        return node
    m = re.search(r"NodeAddr=(\S+)", text)
    return m.group(1) if m else node


def refresh(rec: Any) -> None:
    """Bring a Slurm server's record up to date (the caller saves it)."""
    placed: slurm.Placement = rec.slurm
    try:
        sj = slurm.job(placed.where, placed.id)
    except slurm.SlurmError as exc:
        rec.reason = f"Slurm unreachable, state unknown: {exc}"
        return
    if sj is None or not sj.active:
        ended = sj.state if sj else "GONE"
        placed.state = ended
        rec.state = ServerState.CRASHED
        rec.ended_at = rec.ended_at or time.time()
        d = diagnose(tail(rec.log_path, 200))
        code = f" (exit {sj.exit_code})" if sj and sj.exit_code and sj.exit_code != "0:0" else ""
        why = {"TIMEOUT": "it reached its time limit", "PREEMPTED": "the scheduler pre-empted it",
               "CANCELLED": "it was cancelled outside fleetdeck", "NODE_FAIL": "its node failed",
               "OUT_OF_MEMORY": "it ran out of memory"}.get(ended, "see the log")
        rec.reason = f"Slurm {placed.id} ended {ended}{code}: {why}" + (f". {d.text()}" if d else "")
        return
    placed.seen(sj)
    if sj.state != "RUNNING" or not sj.node:
        rec.state, rec.reason = ServerState.STARTING, sj.summary()
        return
    if not placed.host:
        placed.host = _node_address(placed.where, sj.node)
        rec.node = sj.node
    if probe(rec):
        rec.state, rec.reason = ServerState.READY, sj.summary()
    elif rec.state != ServerState.READY:
        rec.state, rec.reason = ServerState.STARTING, sj.summary() + "; vLLM is starting"


def stop(rec: Any, timeout: float) -> None:
    """scancel (TERM to the job's steps, then KILL after Slurm's KillWait), and wait for it to leave."""
    placed: slurm.Placement = rec.slurm
    where, job_id = placed.where, placed.id
    slurm.cancel(where, job_id)
    deadline = time.time() + timeout
    while time.time() < deadline:
        sj = slurm.job(where, job_id)
        if sj is None or not sj.active:
            placed.state = sj.state if sj else "GONE"
            return
        time.sleep(0.3)
