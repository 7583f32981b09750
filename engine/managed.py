"""Processes fleetdeck starts and records in the store's `managed` table (vLLM servers, fine-tune jobs).

One record shape, saved and loaded the same way; liveness is the pid *and* its process create time,
so a pid reused by another process is never mistaken for ours; processes start detached (their own
session, output in a log file) so they outlive the dashboard and the SSH session.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Callable, ClassVar, TypeVar

import psutil

from engine.audit import trail as audit
from engine.slurm.client import Placement

if TYPE_CHECKING:
    from store.db import Store

R = TypeVar("R", bound="ManagedRecord")


# Where a record's process runs. The store's `gpus` column and the agent's wire keep the text they always had
# ("0,1", "cpu", "slurm:N"): `parse_placement` reads it and `str()` writes it, at the edge (from_json, to_doc);
# everything in between matches on the type, never on the text.
@dataclass(frozen=True, slots=True)
class LocalGpus:
    """GPUs of the record's own node, by index; none for a server on vLLM's CPU build."""

    indices: tuple[int, ...]

    def __str__(self) -> str:
        return ",".join(map(str, self.indices))


@dataclass(frozen=True, slots=True)
class Cpu:
    """A job on the CPU (`--gpus cpu`)."""

    def __str__(self) -> str:
        return "cpu"


@dataclass(frozen=True, slots=True)
class SlurmGpus:
    """A run handed to Slurm with a GPU count: Slurm picks the node and the GPUs (the record's `slurm` says
    which job it is)."""

    count: int

    def __str__(self) -> str:
        return f"slurm:{self.count}"


GpuPlacement = LocalGpus | Cpu | SlurmGpus


def parse_placement(text: str) -> GpuPlacement:
    """The placement a `gpus` text names; ValueError naming the text when it names none."""
    if text == "cpu":
        return Cpu()
    if text.startswith("slurm:"):
        count = text.removeprefix("slurm:")
        if count.isascii() and count.isdigit():
            return SlurmGpus(int(count))
    elif text == "" or all(part.isascii() and part.isdigit() for part in text.split(",")):
        return LocalGpus(tuple(int(part) for part in text.split(",")) if text else ())
    raise ValueError(f"gpus must be GPU indices (0,1), cpu or slurm:N, got {text!r}")


@dataclass
class ManagedRecord:
    KIND: ClassVar[str] = ""  # the record's `kind` in the table: "server", "job"
    LISTED_BY: ClassVar[str] = ""  # the command that lists them, for "no such ..." errors
    STATES: ClassVar[type[StrEnum]]  # the kind's states (ServerState, JobState): the stored text is the value

    id: str
    name: str
    node: str
    pid: int | None
    create_time: float | None
    argv: list[str]
    env: dict[str, str]
    gpus: GpuPlacement
    port: int | None
    log_path: str
    spec: dict[str, Any]
    state: StrEnum  # narrowed by each kind to its own enum
    reason: str | None
    started_at: float
    ended_at: float | None = None
    exit_code: int | None = None
    predicted_kv_tokens: int | None = None
    engine_pid: int | None = None  # vLLM's engine-core process, once seen
    engine_create_time: float | None = None
    # What the run has, apart from what was asked (`spec`): its own folder, and the site's Slurm's hold on it.
    workdir: str | None = None
    slurm: Placement | None = None

    @classmethod
    def from_json(cls: type[R], doc: dict[str, Any]) -> R:
        """A record from its JSON (the store's row decoded, or an agent's answer); fields this version
        does not know are left out."""
        known = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        if known.get("slurm") is not None:
            known["slurm"] = Placement.from_json(known["slurm"])
        known["gpus"] = parse_placement(str(known.get("gpus") or ""))
        known["state"] = cls.STATES(known["state"])
        return cls(**known)

    def to_doc(self) -> dict[str, Any]:
        """The record as the store's row and the agent's answer hold it (the placement as its text)."""
        return {**asdict(self), "gpus": str(self.gpus)}

    def save(self, store: Store) -> None:
        store.insert("managed", {**self.to_doc(), "kind": self.KIND}, replace=True)  # lists and dicts become JSON text

    def noticed(self, store: Store) -> None:
        """Keep what a refresh noticed rather than did (a process that ended while nobody watched, its engine
        seen): saved, except in a store opened read-only (a read-only run: the dashboard, a listing, a read-only
        agent), which shows the record as it finds it and records nothing. The next run that writes notices the
        same again and saves it."""
        if not store.read_only:
            self.save(store)

    def alive(self) -> bool:
        """The process this record started still runs (the same process: pid and create time)."""
        return alive(self.pid, self.create_time)

    def terminate(self, timeout: float, *, whole_group: bool) -> None:
        """SIGTERM (its whole process group, or the leader alone so it can save a checkpoint and end its
        children itself), wait up to `timeout`, then SIGKILL the group."""
        if self.pid is None or not self.alive():
            return
        try:
            proc = psutil.Process(self.pid)
            if whole_group:
                os.killpg(self.pid, signal.SIGTERM)
            else:
                proc.terminate()
        except (psutil.NoSuchProcess, ProcessLookupError):
            return
        except PermissionError:
            pass
        if not self._ended_within(timeout):
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self._ended_within(5.0)

    def _ended_within(self, timeout: float) -> bool:
        """Wait until the process has ended. A zombie counts as ended: psutil would wait out the whole
        timeout for one whose parent is another process (the dashboard that started it, still running)."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True


# Columns held as JSON text in the `managed` table.
JSON_COLUMNS = ("argv", "env", "spec", "slurm", "outputs")


def _from_row(cls: type[R], row: dict[str, Any]) -> R:
    return cls.from_json({k: json.loads(v) if k in JSON_COLUMNS and v is not None else v for k, v in row.items()})


def load_all(store: Store, cls: type[R]) -> list[R]:
    return [_from_row(cls, r) for r in store.query("SELECT * FROM managed WHERE kind = ? ORDER BY started_at", (cls.KIND,))]


def forget(store: Store, cls: type[ManagedRecord], ids: list[str]) -> None:
    """Remove records (prune): their files on disk are not touched."""
    if not ids:
        return
    with store.transaction() as conn:
        conn.executemany("DELETE FROM managed WHERE kind = ? AND id = ?", [(cls.KIND, i) for i in ids])


def prune(store: Store, cls: type[R], ended: tuple[StrEnum, ...], refresh: Callable[[Store, R], R]) -> list[R]:
    """Forget the records of `cls` that have ended (`ended` holds its ended states): each is refreshed first,
    so a run that ended since it was last looked at counts. Their files stay on disk. Audited as one action,
    `<kind>.prune`, naming how many and which."""
    with audit.audited(f"{cls.KIND}.prune", f"ended {cls.KIND}s") as entry:
        gone = [r for r in (refresh(store, r) for r in load_all(store, cls)) if r.state in ended]
        forget(store, cls, [r.id for r in gone])
        entry.target = f"{len(gone)} {cls.KIND}(s)"
        entry.params[f"{cls.KIND}s"] = ",".join(r.id for r in gone)
    return gone


class AmbiguousId(LookupError):
    """A prefix that names more than one record; the message lists them."""


def find(store: Store, cls: type[R], ident: str) -> R | None:
    """By exact id, or by a prefix that names exactly one record.

    The prefix is compared as literal text (never a SQL pattern), so `_` or `%` match only ids that hold them;
    an empty id names nothing, and a prefix shared by several records is refused with their ids.
    """
    kind = cls.KIND
    ident = ident.strip()
    if not ident or "\x00" in ident or any(0xD800 <= ord(c) <= 0xDFFF for c in ident):
        return None  # no id holds NUL or a byte that is not UTF-8 (SQLite could not even be asked)
    rows = store.query("SELECT * FROM managed WHERE kind = ? AND id = ?", (kind, ident))
    if rows:
        return _from_row(cls, rows[0])
    ids = [r["id"] for r in store.query("SELECT id FROM managed WHERE kind = ? ORDER BY started_at DESC", (kind,))]
    matches = [i for i in ids if i.startswith(ident)]
    if len(matches) > 1:
        raise AmbiguousId(f"{ident!r} names {len(matches)} {kind}s ({', '.join(matches[:5])}"
                          f"{', ...' if len(matches) > 5 else ''}): give more of the id")
    if not matches:
        return None
    return _from_row(cls, store.query("SELECT * FROM managed WHERE kind = ? AND id = ?", (kind, matches[0]))[0])


def get(store: Store, cls: type[R], ident: str, error: type[Exception]) -> R:
    """`find`, or `error` saying there is no such record (or that the prefix names several)."""
    try:
        rec = find(store, cls, ident)
    except AmbiguousId as exc:
        raise error(str(exc)) from None
    if rec is None:
        raise error(f"no {cls.KIND} {ident!r} (see `{cls.LISTED_BY}`)")
    return rec


def alive(pid: int | None, create_time: float | None) -> bool:
    if pid is None:
        return False
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child and has exited
    except ChildProcessError:
        pass
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 1.0
    except psutil.NoSuchProcess:
        return False


# What a managed process inherits from fleetdeck's environment: what engines, drivers and Python need.
# Anything else (cloud credentials, the proxy's keys, a shell's tokens) stays with fleetdeck; what a
# profile or job needs beyond this it names in its own `[env]`.
INHERITED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
                 "LD_LIBRARY_PATH", "LD_PRELOAD", "VIRTUAL_ENV", "CONDA_PREFIX", "SSL_CERT_FILE", "SSL_CERT_DIR",
                 "NO_PROXY", "no_proxy")
INHERITED_PREFIXES = ("LC_", "XDG_", "PYTHON", "CUDA_", "NVIDIA_", "NCCL_", "VLLM_", "HF_", "TRANSFORMERS_",
                      "TORCH", "TRITON_", "OMP_", "MKL_", "KMP_", "UNSLOTH_", "FLEETDECK_SIM", "LITELLM_LOCAL")
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The explicit environment of a managed process: the inherited allowlist, minus anything named like
    a secret, plus what the profile or job sets (which may name a key on purpose, e.g. VLLM_API_KEY)."""
    env = {k: v for k, v in os.environ.items()
           if (k in INHERITED_ENV or k.startswith(INHERITED_PREFIXES)) and not any(w in k.upper() for w in SECRET_WORDS)}
    return {**env, **extra}


def spawn(argv: list[str], env: dict[str, str], log_path: str) -> tuple[int, float | None]:
    """Start detached (own session), output appended to the log (0600); returns pid and create time."""
    with open(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
        os.fchmod(log.fileno(), 0o600)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=child_env(env), start_new_session=True)
    try:
        return proc.pid, psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:
        return proc.pid, None
