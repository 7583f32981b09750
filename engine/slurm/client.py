"""The site's Slurm, through its client commands only (sbatch, squeue, scontrol, scancel, sinfo).

fleetdeck never schedules around Slurm: a fine-tune handed to it is an `sbatch` of the same runner
process, with GPUs asked for as the site does (`--gres=gpu:N` or `--gpus=N`), a time limit, and
`--signal=B:TERM@SECONDS` so the runner saves a checkpoint before the limit as it does on cancel. Every
command is an argument list (no shell); a command that fails raises SlurmError with its own words.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text

from engine.io.tables import table

# States in which a job still holds (or waits for) its allocation.
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "SIGNALING",
          "STAGE_OUT", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "STOPPED"}
WRAPPER = '#!/bin/sh\n# fleetdeck: run the job\'s command as given (its arguments, never a shell string)\nexec "$@"\n'
TIME_RE = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")


class SlurmError(Exception):
    """A Slurm command failed or is missing; the message is Slurm's own, with what to do."""


@dataclass
class SlurmJob:
    id: str
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, PREEMPTED, NODE_FAIL, ...
    reason: str | None = None  # why it waits: Resources, Priority, QOSMaxGRESPerUser, ...
    node: str | None = None
    elapsed: str | None = None
    time_limit: str | None = None
    exit_code: str | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        why = f" ({self.reason})" if self.reason and self.reason not in ("None", "(null)") else ""
        where = f" on {self.node}" if self.node else ""
        return f"Slurm {self.id} {self.state}{why}{where}, {self.elapsed or '0:00'} of {self.time_limit or 'no limit'}"


@dataclass
class Where:
    """How to reach the Slurm that holds a job, kept in the job's record (the config may change later)."""

    conf: str | None = None
    bin_dir: str | None = None

    @classmethod
    def of(cls, settings: Any) -> "Where":
        return cls(str(settings.conf) if settings.conf else None, str(settings.bin_dir) if settings.bin_dir else None)


@dataclass
class Placement:
    """A job or server handed to Slurm: its id, the sbatch options (a resume resubmits the same), how to
    reach that Slurm, and the scheduler's latest view of it. Kept in the managed record, beside its spec."""

    id: str
    options: list[str]
    conf: str | None = None
    bin_dir: str | None = None
    state: str = "PENDING"
    reason: str | None = None
    node: str | None = None
    host: str | None = None  # the address a server listens on (the node's NodeAddr), once it runs
    elapsed: str | None = None
    time_limit: str | None = None
    exit_code: str | None = None

    @classmethod
    def submitted(cls, job_id: str, options: list[str], settings: Any) -> "Placement":
        where = Where.of(settings)
        return cls(job_id, list(options), where.conf, where.bin_dir)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "Placement":
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})

    @property
    def where(self) -> Where:
        return Where(self.conf, self.bin_dir)

    def seen(self, sj: SlurmJob) -> None:
        self.state, self.reason, self.node = sj.state, sj.reason, sj.node
        self.elapsed, self.time_limit, self.exit_code = sj.elapsed, sj.time_limit, sj.exit_code

    def resubmitted(self, job_id: str) -> None:
        self.id, self.state, self.reason, self.node, self.host = job_id, "PENDING", None, None, None


@dataclass
class ClusterView:
    partitions: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    queue: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _env(settings: Any, base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    if getattr(settings, "conf", None):
        env["SLURM_CONF"] = str(settings.conf)
    return env


def run(settings: Any, argv: list[str], timeout: float = 30.0, env: dict[str, str] | None = None) -> str:
    """One Slurm client command; its stdout, or SlurmError with its stderr's last line. `env` replaces
    the environment (sbatch exports its own environment to the job: a job gets only what it is given)."""
    exe = argv[0]
    if getattr(settings, "bin_dir", None):
        exe = str(Path(settings.bin_dir) / exe)
    try:
        proc = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=timeout,
                              env={**(env if env is not None else os.environ), **_env(settings, {})})
    except FileNotFoundError:
        raise SlurmError(f"{argv[0]} not found: install Slurm's client commands (Debian: slurm-client) or set "
                         "[slurm] bin_dir") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{argv[0]} did not answer within {timeout:g} s (is slurmctld reachable?)") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        raise SlurmError(f"{argv[0]}: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return proc.stdout


def check_time(limit: str) -> str:
    """A Slurm time limit (minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]); ValueError otherwise."""
    if not TIME_RE.match(limit.strip()):
        raise ValueError(f"--time {limit!r}: use minutes (90), HH:MM:SS (01:30:00) or D-HH:MM (1-12:00)")
    return limit.strip()


def sbatch_args(settings: Any, *, name: str, output: Path, gpus: int, partition: str | None = None,
                time_limit: str | None = None, signal_before_s: int = 300, comment: str | None = None,
                workdir: Path | None = None) -> list[str]:
    """sbatch's options for one job: the site's partition/account/QoS unless overridden, GPUs as the site
    asks for them, a time limit and the checkpoint signal before it."""
    args = ["sbatch", "--parsable", f"--job-name={name}", f"--output={output}", f"--error={output}",
            f"--signal=B:TERM@{signal_before_s}"]
    if workdir is not None:
        args.append(f"--chdir={workdir}")
    part = partition or settings.partition
    if part:
        args.append(f"--partition={part}")
    if settings.account:
        args.append(f"--account={settings.account}")
    if settings.qos:
        args.append(f"--qos={settings.qos}")
    if gpus:
        args.append(f"--gres=gpu:{gpus}" if settings.gpu_request == "gres" else f"--gpus={gpus}")
    if time_limit:
        args.append(f"--time={check_time(time_limit)}")
    if comment:
        args.append(f"--comment={comment}")
    return args


def submit(settings: Any, options: list[str], workdir: Path, command: list[str], env: dict[str, str]) -> str:
    """sbatch the command through a wrapper that execs its arguments, with `env` as the job's whole
    environment (sbatch's default --export=ALL passes the submitter's); the job id."""
    wrapper = workdir / "slurm-job.sh"
    wrapper.write_text(WRAPPER, encoding="utf-8")
    wrapper.chmod(0o700)
    out = run(settings, [*options, str(wrapper), *command], env=env)
    job_id = out.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch answered {out.strip()!r}, not a job id")
    return job_id


_SQUEUE_FORMAT = "%i|%T|%r|%N|%M|%l"


def job(settings: Any, job_id: str) -> SlurmJob | None:
    """The job as Slurm sees it now; None once Slurm has forgotten it (after MinJobAge)."""
    try:
        out = run(settings, ["squeue", "-h", "-j", str(job_id), "-o", _SQUEUE_FORMAT])
    except SlurmError as exc:
        if "Invalid job id" not in str(exc):
            raise
        out = ""
    line = out.strip().splitlines()[0] if out.strip() else ""
    if line:
        jid, state, reason, node, elapsed, limit = (line.split("|") + [""] * 6)[:6]
        return SlurmJob(jid, state, reason or None, node or None, elapsed or None, limit or None)
    # Finished jobs leave squeue at once but stay in scontrol until MinJobAge.
    try:
        text = run(settings, ["scontrol", "show", "job", "-o", str(job_id)])
    except SlurmError:
        return None
    kv = dict(re.findall(r"(\w+)=(\S*)", text))
    if not kv.get("JobState"):
        return None
    return SlurmJob(str(job_id), kv["JobState"], kv.get("Reason"), kv.get("NodeList") or None, kv.get("RunTime"),
                    kv.get("TimeLimit"), kv.get("ExitCode"))


def signal_batch(settings: Any, job_id: str, sig: str = "TERM") -> None:
    """Signal the job's batch process (the runner itself: the wrapper execs it)."""
    run(settings, ["scancel", "--batch", f"--signal={sig}", str(job_id)])


def cancel(settings: Any, job_id: str) -> None:
    run(settings, ["scancel", str(job_id)])


def cluster(settings: Any) -> ClusterView:
    """Partitions, nodes with their state and allocated GPUs, and the queue, as Slurm sees them."""
    view = ClusterView()
    try:
        for line in run(settings, ["sinfo", "-h", "-o", "%P|%a|%D|%T|%l"]).splitlines():
            name, avail, count, state, limit = (line.split("|") + [""] * 5)[:5]
            view.partitions.append({"partition": name.rstrip("*"), "default": name.endswith("*"), "avail": avail,
                                    "nodes": count, "state": state, "time_limit": limit})
        for block in run(settings, ["scontrol", "show", "node", "-d", "-o"]).splitlines():
            kv = dict(re.findall(r"(\w+)=(\S*)", block))
            if not kv.get("NodeName"):
                continue
            view.nodes.append({"node": kv["NodeName"], "state": kv.get("State", ""), "partitions": kv.get("Partitions", ""),
                               "gpus": _gpu_count(kv.get("Gres", "")),
                               # GresUsed (scontrol -d) needs no accounting database; AllocTRES shows GPUs only with one
                               "gpus_alloc": max(_gpu_count(kv.get("GresUsed", "")),
                                                 _gpu_count(kv.get("AllocTRES", ""), tres=True)),
                               "cpus": kv.get("CPUTot"), "cpus_alloc": kv.get("CPUAlloc"), "reason": kv.get("Reason")})
        for line in run(settings, ["squeue", "-h", "-o", "%i|%j|%u|%T|%r|%N|%M|%l|%b"]).splitlines():
            f = (line.split("|") + [""] * 9)[:9]
            view.queue.append(dict(zip(("id", "name", "user", "state", "reason", "node", "elapsed", "time_limit", "tres"), f)))
    except SlurmError as exc:
        view.error = str(exc)
    return view


def _gpu_count(text: str, tres: bool = False) -> int:
    """GPUs in `gpu:2`, `gpu:a100:4(S:0-1)` (Gres, GresUsed `gpu:2(IDX:0-1)`) or `gres/gpu=2` (AllocTRES)."""
    if tres:
        m = re.search(r"gres/gpu=(\d+)", text)
        return int(m.group(1)) if m else 0
    total = 0
    for part in text.split(","):
        m = re.match(r"gpu(?::[^:(]+)?:(\d+)", part.strip())
        if m:
            total += int(m.group(1))
    return total


def view_renderable(view: dict[str, Any]) -> RenderableType:
    """The view as the CLI prints it and the Fleet screen shows it: partitions, nodes, the queue."""
    if view.get("error"):
        return Text(f"Slurm: {view['error']}")
    parts = "partitions: " + ", ".join(f"{p['partition']}{'*' if p['default'] else ''} {p['avail']}/{p['state']} "
                                       f"({p['nodes']} node{'s' if p['nodes'] != '1' else ''})"
                                       for p in view["partitions"])
    nodes = table(["node", "state", "GPUs alloc", "CPUs alloc", "reason"],
                  [[n["node"], n["state"], f"{n['gpus_alloc']}/{n['gpus']}", f"{n['cpus_alloc']}/{n['cpus']}",
                    n.get("reason") or ""] for n in view["nodes"]], right={"GPUs alloc", "CPUs alloc"})
    pending = [q for q in view["queue"] if q["state"] == "PENDING"]
    queue: list[RenderableType] = [Text(f"queue: {len(view['queue'])} job(s), {len(pending)} pending")]
    if view["queue"]:
        queue.append(table(["job", "name", "user", "state", "node", "request"],
                           [[q["id"], q["name"], q["user"],
                             q["state"] + (f" ({q['reason']})" if q["state"] == "PENDING" and q.get("reason") else ""),
                             q["node"], q["tres"]] for q in view["queue"]], right={"job"}, indent=2))
    return Group(Text(parts), nodes, *queue)
