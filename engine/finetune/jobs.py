"""Fine-tune jobs: checks before launch, the detached runner process, records, state, cancel, resume."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from engine import managed
from engine.audit import trail as audit
from engine.finetune.dataset import check_dataset
from engine.managed import Cpu, GpuPlacement, LocalGpus, ManagedRecord, SlurmGpus
from engine.finetune.spec import DATASET_SHA_FLAG, JobSpec
from fleet.procs import JOB_FLAG

if TYPE_CHECKING:
    from store.db import Store

GIB = 1024**3


class JobError(Exception):
    """The job was not started (or cannot be acted on); the message says why and what to do."""


@dataclass
class JobOutputs:
    """What a finished job left: an adapter (fine-tunes) or a model (merge/quantize), and what it measured."""

    adapter_path: str | None = None
    output_path: str | None = None
    final_loss: float | None = None
    gpu_peak_reserved_bytes: int | None = None
    gpu_peak_allocated_bytes: int | None = None


class JobState(StrEnum):
    """A job's state, stored as its text."""

    RUNNING = "running"  # started (or queued in Slurm) and not ended
    FINISHED = "finished"  # its adapter or model is written
    FAILED = "failed"  # it ended without finishing (the reason says why)
    CANCELLED = "cancelled"  # cancelled by an operator (a checkpoint lets `resume` continue)


ENDED = (JobState.FINISHED, JobState.FAILED, JobState.CANCELLED)


def _local(gpus: Sequence[int] | None) -> GpuPlacement:
    return LocalGpus(tuple(gpus)) if gpus else Cpu()


@dataclass
class JobRecord(ManagedRecord):
    KIND: ClassVar[str] = "job"
    LISTED_BY: ClassVar[str] = "fleetdeck finetune ls"
    STATES: ClassVar[type[JobState]] = JobState

    state: JobState

    outputs: JobOutputs = field(default_factory=JobOutputs)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "JobRecord":
        rec = super().from_json({k: v for k, v in doc.items() if k != "outputs"})
        rec.outputs = JobOutputs(**{k: v for k, v in (doc.get("outputs") or {}).items()
                                    if k in JobOutputs.__dataclass_fields__})
        return rec

    @property
    def job_dir(self) -> Path:
        """The job's own folder: its spec, progress, checkpoints and log (every job has one)."""
        return Path(self.workdir or ".")

    @property
    def progress_path(self) -> Path:
        return self.job_dir / "progress.jsonl"

    def to_json(self) -> dict[str, Any]:
        d = self.to_doc()
        d["progress"] = last_step(self)
        return d


def read_events(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written right now
    return events


def last_step(rec: JobRecord) -> dict[str, Any] | None:
    steps = [e for e in read_events(rec.progress_path) if e.get("event") == "step"]
    return steps[-1] if steps else None


def training_estimate(spec: JobSpec) -> Any:
    from engine.kvfit import ArchError, load_model
    from engine.kvfit.training import estimate_training

    try:
        arch, _ = load_model(str(spec.base_model))
    except ArchError as exc:
        raise JobError(f"cannot size the base model: {exc}") from exc
    # The peft backend trains the 16-bit model without gradient checkpointing; unsloth quantizes
    # (load_in_4bit) and checkpoints. Each is estimated as it runs.
    peft = spec.backend == "peft"
    return estimate_training(arch, spec.lora_rank, tuple(spec.target_modules), spec.load_in_4bit and not peft,
                             spec.batch_size, spec.max_seq_length, gradient_checkpointing=not peft)


def preflight(spec: JobSpec, gpus: Sequence[Any] | None, force: bool) -> tuple[Any, Any]:
    """Dataset check and VRAM estimate; raises JobError unless it will start (`force` skips VRAM only)."""
    if not Path(spec.base_model).is_dir():
        raise JobError(f"base model {spec.base_model} is not a local folder (air-gapped hosts train from local copies)")
    report = check_dataset(Path(spec.dataset), Path(spec.base_model), spec.max_seq_length)
    if not report.ok:
        raise JobError(f"dataset {spec.dataset} has problems, nothing was started:\n  " + "\n  ".join(report.errors or ["no examples"]))
    estimate = training_estimate(spec)
    if gpus:
        tight = min(gpus, key=lambda g: g.memory_free_bytes if g.memory_free_bytes is not None else g.memory_total_bytes or 0)
        free = tight.memory_free_bytes if tight.memory_free_bytes is not None else tight.memory_total_bytes
        if free is not None and estimate.total_bytes > free and not force:
            raise JobError(
                f"the job needs about {estimate.total_bytes / GIB:.1f} GiB (weights {estimate.weights_bytes / GIB:.1f}, "
                f"LoRA+optimizer {(estimate.lora_bytes + estimate.optimizer_bytes) / GIB:.1f}, activations "
                f"{estimate.activation_bytes / GIB:.1f}, overhead {estimate.overhead_bytes / GIB:.1f}) but GPU {tight.index} "
                f"has {free / GIB:.1f} GiB free; use load_in_4bit, a smaller batch or max_seq_length, or --force"
            )
    elif spec.backend == "unsloth" and not force:
        raise JobError("the unsloth backend needs a GPU: give --gpus INDEX, or use backend = \"peft\" with --gpus cpu")
    return report, estimate


def _spawn(rec: JobRecord, resume: bool) -> None:
    rec.pid, rec.create_time = managed.spawn(list(rec.argv) + (["--resume"] if resume else []), rec.env, rec.log_path)


@dataclass
class SlurmRequest:
    """A fine-tune handed to the site's Slurm instead of started here."""

    settings: Any  # fleet.config.SlurmSettings
    gpus: int = 1
    partition: str | None = None
    time_limit: str | None = None


def start(store: Store, spec: JobSpec, gpus: Sequence[int] | None, *, gpu_snapshots: Sequence[Any] | None = None,
          force: bool = False, adapter_root: Path | None = None, node: str | None = None,
          slurm: SlurmRequest | None = None, jobs_dir: Path | None = None) -> JobRecord:
    """`jobs_dir`: where the job's own folder goes (default: the state dir's jobs/; the demo has its own)."""
    where = str(SlurmGpus(slurm.gpus) if slurm else _local(gpus))
    with audit.audited("job.start", spec.name, refusals=(JobError, ValueError), spec=spec.name, gpus=where,
                       force=force) as entry:
        if slurm is not None:
            rec = _submit(store, spec, slurm, force=force, adapter_root=adapter_root, jobs_dir=jobs_dir)
            entry.target = entry.params["job"] = rec.id
            entry.params["dataset_sha256"] = checked_sha256(rec)
            return rec
        rec = _start(store, spec, gpus, gpu_snapshots=gpu_snapshots, force=force, adapter_root=adapter_root, node=node,
                     jobs_dir=jobs_dir)
        entry.target = entry.params["job"] = rec.id
        entry.params["dataset_sha256"] = checked_sha256(rec)
        return rec


def checked_sha256(rec: JobRecord) -> str | None:
    """The dataset SHA-256 a fine-tune's start checked (its runner's argv carries it); None for jobs started
    before fleetdeck passed it, and for merge/quantize jobs."""
    argv = list(rec.argv)
    if DATASET_SHA_FLAG in argv[:-1]:
        return argv[argv.index(DATASET_SHA_FLAG) + 1]
    return None


def _prepare(spec: JobSpec, adapter_root: Path | None, dataset_sha256: str,
             jobs_dir: Path | None = None) -> tuple[str, Path, list[str]]:
    """A new job's id, its private folder with the spec the runner reads, and the runner's argv. The runner
    refuses a dataset whose SHA-256 is not the one the start's check took (changed since, or before a resume)."""
    from store.paths import private_dir, state_dir

    jid = f"ft-{spec.name}-{uuid.uuid4().hex[:6]}"
    parent = private_dir(jobs_dir or state_dir() / "jobs")
    workdir = private_dir(parent / jid)
    spec_path = workdir / "spec.json"
    with open(os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as fh:
        fh.write(spec.model_dump_json(indent=2))
    root = adapter_root or spec.adapter_root
    argv = [sys.executable, "-m", "engine.finetune.runner", JOB_FLAG, jid, "--spec", str(spec_path), "--workdir", str(workdir),
            DATASET_SHA_FLAG, dataset_sha256]
    if root:
        argv += ["--adapter-root", str(root)]
    return jid, workdir, argv


def _start(store: Store, spec: JobSpec, gpus: Sequence[int] | None, *, gpu_snapshots: Sequence[Any] | None,
           force: bool, adapter_root: Path | None, node: str | None, jobs_dir: Path | None) -> JobRecord:
    report, _ = preflight(spec, gpu_snapshots, force)
    jid, workdir, argv = _prepare(spec, adapter_root, report.sha256, jobs_dir)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus) if gpus else ""}
    rec = JobRecord(id=jid, name=spec.name, node=node or socket.gethostname(), pid=None, create_time=None, argv=argv,
                    env=env, gpus=_local(gpus), port=None,
                    log_path=str(workdir / "job.log"), spec=spec.model_dump(mode="json"), workdir=str(workdir),
                    state=JobState.RUNNING, reason=None, started_at=time.time())
    _spawn(rec, resume=False)
    rec.save(store)
    return rec


def start_transform(store: Store, kind: str, name: str, args: list[str], out: Path, *, python: str | None = None,
                    gpus: Sequence[int] | None = None, params: dict[str, Any] | None = None) -> JobRecord:
    """A merge or quantize job (engine/finetune/transform.py) on the Jobs screen like a fine-tune."""
    from store.paths import private_dir, state_dir

    action = "model.merge" if kind == "merge" else "model.quantize"
    with audit.audited(action, name, refusals=(JobError,), out=str(out), **(params or {})) as entry:
        if out.exists():
            raise JobError(f"{out} already exists: name another --out (a model folder is never overwritten)")
        jid = f"{kind}-{name.replace('@', '-')}-{uuid.uuid4().hex[:6]}"
        private_dir(state_dir() / "jobs")
        workdir = private_dir(state_dir() / "jobs" / jid)
        argv = [python or sys.executable, "-m", "engine.finetune.transform", kind, JOB_FLAG, jid, "--workdir", str(workdir),
                "--out", str(out), *args]
        # Another virtual environment (llm-compressor's) finds fleetdeck's code by path.
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
               "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus) if gpus else ""}
        rec = JobRecord(id=jid, name=name, node=socket.gethostname(), pid=None, create_time=None, argv=argv, env=env,
                        gpus=_local(gpus), port=None,
                        log_path=str(workdir / "job.log"),
                        spec={"kind": kind, "name": name, "out": str(out), **(params or {})}, workdir=str(workdir),
                        state=JobState.RUNNING, reason=None, started_at=time.time())
        _spawn(rec, resume=False)
        rec.save(store)
        entry.params["out"] = str(out)
        return rec


def _submit(store: Store, spec: JobSpec, req: SlurmRequest, *, force: bool, adapter_root: Path | None,
            jobs_dir: Path | None) -> JobRecord:
    """The same runner, as a Slurm batch job: GPUs, time limit and the checkpoint signal asked of sbatch."""
    from engine.slurm import client as slurm

    report, _ = preflight(spec, None, force=True)  # the dataset check; the GPUs are Slurm's to find
    estimate = training_estimate(spec)
    per_gpu = req.settings.gpu_memory_gib
    if per_gpu and estimate.total_bytes > per_gpu * GIB and not force:
        raise JobError(f"the job needs about {estimate.total_bytes / GIB:.1f} GiB on one GPU; the cluster's GPUs have "
                       f"{per_gpu:g} GiB ([slurm] gpu_memory_gib): use load_in_4bit, a smaller batch or "
                       "max_seq_length, or --force")
    if not 1 <= req.gpus <= 64:
        raise JobError(f"--gpus for Slurm is a count (1-64), got {req.gpus}")
    jid, workdir, argv = _prepare(spec, adapter_root, report.sha256, jobs_dir)
    options = slurm.sbatch_args(req.settings, name=f"fleetdeck-{jid}", output=workdir / "job.log", gpus=req.gpus,
                                partition=req.partition, time_limit=req.time_limit,
                                signal_before_s=req.settings.signal_before_s, workdir=workdir,
                                comment=f"fleetdeck {jid}: VRAM estimate {estimate.total_bytes / GIB:.1f} GiB per GPU")
    env = managed.child_env({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        slurm_id = slurm.submit(req.settings, options, workdir, argv, env)
    except slurm.SlurmError as exc:
        raise JobError(f"Slurm refused the job: {exc}") from exc
    rec = JobRecord(id=jid, name=spec.name, node="slurm", pid=None, create_time=None, argv=argv, env={},
                    gpus=SlurmGpus(req.gpus), port=None, log_path=str(workdir / "job.log"),
                    spec=spec.model_dump(mode="json"), workdir=str(workdir),
                    slurm=slurm.Placement.submitted(slurm_id, options, req.settings),
                    state=JobState.RUNNING, reason=f"Slurm {slurm_id} submitted", started_at=time.time())
    rec.save(store)
    return rec


def _slurm_state(store: Store, rec: JobRecord) -> bool:
    """Refresh a Slurm job's scheduler state into its record; True while Slurm still holds the job."""
    from engine.slurm import client as slurm

    placed = rec.slurm
    assert placed is not None
    try:
        sj = slurm.job(placed.where, placed.id)
    except slurm.SlurmError as exc:
        rec.reason = f"Slurm unreachable, state unknown: {exc}"
        return True  # never call a job ended because the controller did not answer
    if sj is None:
        if placed.state in slurm.ACTIVE:
            placed.state = "GONE"
        return False
    placed.seen(sj)
    if sj.active:
        rec.reason = sj.summary()
    return sj.active


FAILURE_HINTS = (
    ("out of memory", "CUDA out of memory: lower batch_size or max_seq_length, turn on load_in_4bit, or use a bigger GPU."),
    ("needs an NVIDIA GPU", "no GPU for unsloth: run on a GPU node, or use backend = \"peft\"."),
    ("dataset", "dataset error: run `fleetdeck finetune check SPEC`."),
    # llm-compressor 0.14's AWQ pins calibration activations in accelerator memory: on a CPU-only host it stops here.
    ("Cannot access accelerator device", "llm-compressor's AWQ needs a GPU (it stops at its first smoothing step on "
     "a CPU-only host): run `fleetdeck finetune quantize ... --gpus INDEX` on a GPU node."),
)


def refresh(store: Store, rec: JobRecord) -> JobRecord:
    if rec.state != JobState.RUNNING:
        return rec
    if rec.slurm is not None:
        if _slurm_state(store, rec):
            rec.noticed(store)
            return rec
    elif rec.alive():
        return rec
    from engine.io.logs import tail

    events = read_events(rec.progress_path)
    last = next((e for e in reversed(events) if e.get("event") in ("done", "cancelled", "error")), None)
    rec.ended_at = time.time()
    peak = next((e for e in reversed(events) if e.get("event") == "gpu_memory"), None)
    if peak:
        rec.outputs.gpu_peak_reserved_bytes = peak.get("peak_reserved_bytes")
        rec.outputs.gpu_peak_allocated_bytes = peak.get("peak_allocated_bytes")
    if last and last["event"] == "done" and last.get("output_path"):
        rec.state, rec.reason = JobState.FINISHED, f"model at {last['output_path']}"
        rec.outputs.output_path = last["output_path"]
    elif last and last["event"] == "done":
        rec.state, rec.reason = JobState.FINISHED, f"adapter at {last.get('adapter_path')}"
        rec.outputs.adapter_path = last.get("adapter_path")
        rec.outputs.final_loss = last.get("final_loss")
    elif last and last["event"] == "cancelled":
        rec.state = JobState.CANCELLED
        # Read on this node and, through the agent, on a dashboard elsewhere: both ways of resuming are named.
        rec.reason = (f"cancelled at step {last.get('step')}; resume continues it (`r` on Jobs, or "
                      f"`fleetdeck finetune resume {rec.id}` on the host it ran on, `--node NAME` from elsewhere)")
    else:
        text = (last or {}).get("reason") or tail(rec.log_path, 30)
        hint = next((h for key, h in FAILURE_HINTS if key in text), None)
        rec.state = JobState.FAILED
        sl = rec.slurm
        ended = (f"Slurm {sl.id} ended {sl.state}" + (f" (exit {sl.exit_code})" if sl.exit_code else "")
                 + (f", {sl.reason}" if sl.reason not in (None, "None") else "") + ". ") if sl else ""
        rec.reason = ended + (hint + " " if hint else "") + f"Last lines: {text[-400:]}"
    rec.noticed(store)  # not to a store opened read-only: the job is shown ended, not recorded so
    return rec


def list_jobs(store: Store) -> list[JobRecord]:
    return managed.load_all(store, JobRecord)


def get(store: Store, jid: str) -> JobRecord:
    return managed.get(store, JobRecord, jid, JobError)




def prune(store: Store) -> list[JobRecord]:
    """Forget the jobs that have ended (finished, failed, cancelled): their records leave the store;
    their folders (log, progress, checkpoints) and the adapters they wrote stay on disk. A pruned
    cancelled job can no longer be resumed from the dashboard. Audited as one action."""
    return managed.prune(store, JobRecord, ENDED, refresh)


def cancel(store: Store, rec: JobRecord, timeout: float = 120.0) -> JobRecord:
    """SIGTERM: the trainer finishes its step, saves a checkpoint and exits."""
    with audit.audited("job.cancel", rec.id, refusals=(JobError,), job=rec.id):
        return _cancel(store, rec, timeout)


def _cancel(store: Store, rec: JobRecord, timeout: float) -> JobRecord:
    if rec.slurm is not None:
        return _cancel_slurm(store, rec, timeout)
    rec.terminate(timeout, whole_group=False)  # the runner finishes its step and saves a checkpoint first
    return refresh(store, rec)


def _cancel_slurm(store: Store, rec: JobRecord, timeout: float) -> JobRecord:
    """A running job gets SIGTERM in its batch process (the runner saves a checkpoint and exits); a
    pending one is just taken out of the queue. Whatever still runs after `timeout` is scancelled."""
    from engine.slurm import client as slurm

    assert rec.slurm is not None
    where, sid = rec.slurm.where, rec.slurm.id
    try:
        sj = slurm.job(where, sid)
        if sj is not None and sj.state == "RUNNING":
            slurm.signal_batch(where, sid, "TERM")
        elif sj is not None and sj.active:
            slurm.cancel(where, sid)
        deadline = time.time() + timeout
        while time.time() < deadline and (sj := slurm.job(where, sid)) is not None and sj.active:
            time.sleep(0.5)
        if sj is not None and sj.active:
            slurm.cancel(where, sid)
    except slurm.SlurmError as exc:
        raise JobError(f"cannot cancel Slurm job {sid}: {exc}") from exc
    rec = refresh(store, rec)
    if rec.state == JobState.FAILED and not read_events(rec.progress_path):  # never started: cancelled in the queue
        rec.state, rec.reason = JobState.CANCELLED, f"taken out of Slurm's queue before it started (Slurm {sid})"
        rec.save(store)
    return rec


def resume(store: Store, rec: JobRecord) -> JobRecord:
    with audit.audited("job.resume", rec.id, refusals=(JobError,), job=rec.id):
        return _resume(store, rec)


def _same_dataset(rec: JobRecord) -> None:
    """A resume continues the checkpoint on the data it was trained on, or not at all: refused (before
    anything starts) when the dataset's bytes are no longer the ones the start checked. The runner checks
    again as it reads them (a Slurm resume runs elsewhere, later)."""
    from store.files import NotAFileError, read_regular

    expected = checked_sha256(rec)
    dataset = (rec.spec or {}).get("dataset")
    if not expected or not dataset:
        return
    try:
        digest = hashlib.sha256(read_regular(Path(dataset))).hexdigest()
    except NotAFileError as exc:
        raise JobError(f"{rec.id} cannot resume: {exc}") from None
    if digest != expected:
        raise JobError(f"{rec.id} cannot resume: dataset {dataset} changed since the job started (SHA-256 "
                       f"{expected[:12]}... then, {digest[:12]}... now); a checkpoint continues only on the data it "
                       "was trained on: start a new job")


def _resume(store: Store, rec: JobRecord) -> JobRecord:
    rec = refresh(store, rec)
    if rec.state == JobState.RUNNING:
        raise JobError(f"{rec.id} is still running")
    if rec.state == JobState.FINISHED:
        raise JobError(f"{rec.id} already finished ({rec.reason})")
    _same_dataset(rec)
    rec.state, rec.reason, rec.ended_at = JobState.RUNNING, None, None
    if rec.slurm is not None:  # resubmitted with the same options; the runner continues from its checkpoint
        from engine.slurm import client as slurm

        placed = rec.slurm
        env = managed.child_env({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        try:
            placed.resubmitted(slurm.submit(placed.where, list(placed.options), rec.job_dir,
                                            [*rec.argv, "--resume"], env))
        except slurm.SlurmError as exc:
            raise JobError(f"Slurm refused the resubmission: {exc}") from exc
        rec.reason = f"Slurm {placed.id} submitted (resume)"
    else:
        _spawn(rec, resume=True)
    rec.save(store)
    return rec
