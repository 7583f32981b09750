"""The ledger's journal: one JSON line per recorded row, appended before the row is queued for the store.

A plain `os.write` per row survives SIGKILL (not a power cut); the writer cuts the file once everything in
it is committed. Offsets are logical (`JournalFile.base` is the offset of the file's first byte), so a cut
never invalidates the offsets queued rows hold. Reading a journal back (`read_journal`) skips lines that are
not rows: a torn line, or one whose values are not of the row's types.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

from store.db import Store
from store.ledger_row import LedgerRow, unstorable

log = logging.getLogger("fleetdeck.ledger")

COLUMNS = [f.name for f in fields(LedgerRow)]


def journal_path(store: Store, journal_dir: Path | None = None) -> Path:
    """The journal of this store's proxy: beside the store, or in `journal_dir` (another filesystem, so a full
    store disk does not take the journal with it). There the name carries a digest of the store's path: two
    stores of the same name never share a journal (each would replay the other's rows)."""
    if journal_dir is None:
        return Path(f"{store.path}-ledger.jsonl")
    digest = hashlib.sha256(str(Path(store.path).resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return Path(journal_dir) / f"{Path(store.path).name}-{digest}-ledger.jsonl"


def journal_paths(store: Store, journal_dir: Path | None = None) -> list[Path]:
    """Where rows of this store may wait: the configured journal first, then the one beside the store (left
    there by a run before `journal_dir` was set)."""
    first = journal_path(store, journal_dir)
    beside = journal_path(store)
    return [first] if first == beside else [first, beside]


def journal_backlog(store: Store, now: float, min_age_s: float = 5.0, journal_dir: Path | None = None) -> int:
    """Rows in the proxy's journal that have waited over `min_age_s`: the proxy cannot write the store, or
    stopped before it did (they are written when a proxy next opens this store). 0 when all is well."""
    total = 0
    for path in journal_paths(store, journal_dir):
        try:
            st = path.stat()
            if st.st_size == 0 or now - st.st_mtime < min_age_s:
                continue
            with path.open("rb") as f:
                total += sum(1 for line in f if line.strip())
        except OSError:
            continue
    return total


_JSON_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "float": (int, float), "int": (int,), "bool": (bool, int)}
# Each field's JSON types, from its annotation: a line that parses but holds a string where the rollups add
# numbers is not a row (it would fail its batch on every retry and hold the ledger up).
_FIELD_TYPES = {f.name: (_JSON_TYPES[str(f.type).split(" | ")[0]], str(f.type).endswith("| None"))
                for f in fields(LedgerRow)}


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number a ledger row holds")


def _row_from_json(line: bytes) -> LedgerRow | None:
    try:
        # NaN and the infinities (which json.loads takes by default) are refused here, like a number past 64
        # bits or a time no date shows below: such a row could never be stored, and it would hold every row
        # queued after it on every retry.
        data = json.loads(line, parse_constant=_no_constant)
        row = LedgerRow(**{k: v for k, v in data.items() if k in COLUMNS})
    except (ValueError, TypeError, AttributeError, RecursionError):
        return None
    for name, (types, optional) in _FIELD_TYPES.items():
        value = getattr(row, name)
        if value is None and optional:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return None
    return None if unstorable(row) is not None else row


@dataclass(frozen=True, slots=True)
class JournalContents:
    rows: list[LedgerRow]  # each id once, in journal order
    unreadable: int  # lines that are not a row: a torn line left by a short write or a crash mid-write
    torn_tail: bool  # the file does not end with a newline: an append must start a new line first


def _read_regular(path: Path) -> bytes:
    """A journal's bytes, when it is a regular file at that very name. A FIFO (whose open or read would wait
    for a writer forever), a device (/dev/zero reads forever) or a symbolic link planted at the journal's name
    raises OSError instead, so the proxy's start names it and goes on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "a symbolic link: a journal is read only as the file itself") from exc
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, a device or a socket)")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_journal(path: Path) -> JournalContents:
    """The rows of a journal file. Raises OSError when it cannot be read, or is not a regular file."""
    data = _read_regular(path)
    rows: dict[str, LedgerRow] = {}
    unreadable = 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        row = _row_from_json(line)
        if row is None:
            unreadable += 1
        else:
            rows.setdefault(row.id, row)  # a row journaled twice is one request: stored once
    return JournalContents(list(rows.values()), unreadable, bool(data) and not data.endswith(b"\n"))


def missing_rows(store: Store, rows: list[LedgerRow]) -> list[LedgerRow]:
    """The rows whose id the store does not have yet: a journal is replayed once, whatever happened."""
    if not rows:
        return []
    ids = [r.id for r in rows]
    have: set[str] = set()
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        have |= {x["id"] for x in store.query(
            f"SELECT id FROM requests WHERE id IN ({', '.join('?' * len(chunk))})", chunk)}
    return [r for r in rows if r.id not in have]


@dataclass(frozen=True, slots=True)
class Replayed:
    """What replaying an earlier run's journal did."""

    stored: int  # rows written to the store now
    waiting: list[LedgerRow]  # rows not in the store that it still refuses
    unreadable: int  # lines that were not rows: skipped
    torn_tail: bool


def replay_journal(path: Path, store: Store, store_rows: Callable[[list[LedgerRow]], int]) -> Replayed:
    """Store the rows of `path` the store does not have yet (`store_rows` returns how many of the first it
    stored). A missing file holds nothing; one that cannot be read raises OSError."""
    found = read_journal(path) if path.exists() or path.is_symlink() else JournalContents([], 0, False)
    missing = missing_rows(store, found.rows)
    done = store_rows(missing) if missing else 0
    return Replayed(done, missing[done:], found.unreadable, found.torn_tail)


class JournalFile:
    """The append side of this run's journal. Every method but `sync` runs under the writer's lock (`lock`,
    which also guards the writer's counts); `sync` takes it itself, around but not during the fsync."""

    def __init__(self, path: Path, lock: threading.Lock) -> None:
        self.path = path
        self._lock = lock
        self.fd: int | None = None
        self.base = 0  # the logical offset of the file's first byte
        self.end = 0
        self.committed = 0
        self.synced = 0  # logical offset up to which an fsync succeeded
        self.durable = True  # False once an fsync failed: what the journal holds may not be on disk
        self.torn = False  # the file ends in a partial line: the next append starts a new line
        self.pinned = False  # the journal holds rows this run will not store: never cut it
        self.stale = False  # a cut failed: the journal still holds rows that are in the store
        self.failures = 0
        self.error: str | None = None  # the last failure
        self.append_failing = False
        self.append_error: str | None = None  # why the last row not journaled is not (a write or the open)
        self.fsync_error: str | None = None  # the first failed fsync: from then on the journal is not trusted

    def failed(self, message: str) -> None:
        """Count and say a journal failure (once, then every 1000th: a full disk fails every row)."""
        self.failures += 1
        self.error = message
        if self.failures == 1 or self.failures % 1000 == 0:
            log.error("ledger journal %s: %s (rows not journaled are held in memory only)", self.path, message)

    def open(self, torn: bool | None = None) -> None:
        """Open for appending. The file's own size is where this run starts (a journal kept, or one that could
        not be removed), so a cut-back never reaches into lines before it; with `torn` unknown, a kept file
        is taken to end mid-line (a newline first costs one blank line, which the replay skips)."""
        # O_NOFOLLOW: a link planted at the journal's name is refused, never written through. O_NONBLOCK: a
        # FIFO there is refused (ENXIO) rather than waited on; it changes nothing for a regular file.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, f"{self.path} is not a regular file")
        self.fd = fd
        os.fchmod(self.fd, 0o600)
        size = os.fstat(self.fd).st_size
        self.base = self.committed = 0
        self.end = self.synced = size
        self.torn = (size > 0) if torn is None else torn

    def open_or_fail(self, torn: bool | None = None, *, pin: bool = False) -> None:
        try:
            self.open(torn)
        except OSError as exc:
            self.pinned = self.pinned or pin
            self.failed(f"cannot open: {exc}")

    def append(self, row: LedgerRow) -> tuple[int, bool]:
        """Append the row's line; (its offset, whether the whole line is in the file). Every byte is checked:
        a short write (a full disk takes part of a line) is cut back, or, when even that fails, the next line
        starts on a new line so the torn one takes no neighbour with it."""
        if self.fd is None:
            self.append_error = self.append_error or self.error or "no journal"
            return self.end, False
        data = (json.dumps(asdict(row), ensure_ascii=True, default=str) + "\n").encode("ascii")
        if self.torn:
            data = b"\n" + data
        done = 0
        try:
            while done < len(data):
                n = os.write(self.fd, data[done:])
                if n <= 0:
                    raise OSError(errno.EIO, "the journal took no bytes")
                done += n
        except OSError as exc:
            if done:
                try:
                    os.ftruncate(self.fd, self.end - self.base)
                except OSError:
                    self.end += done  # the torn bytes stay: skipped at replay
                    self.torn = True
            self.append_error = (f"write failed after {done} of {len(data)} bytes: {exc}" if done
                                 else f"write failed: {exc}")
            self.failed(self.append_error)
            self.append_failing = True
            return self.end, False
        self.end += len(data)
        self.torn = False
        if self.append_failing:
            self.append_failing = False
            log.warning("ledger journal %s takes rows again", self.path)
        return self.end, True

    def cut(self, offset: int) -> None:
        """Everything up to `offset` is in the store: drop it from the journal."""
        self.committed = max(self.committed, offset)
        if self.fd is None or self.pinned or self.committed < self.end:
            return  # rows past the committed prefix are still on their way
        try:
            os.ftruncate(self.fd, 0)
        except OSError as exc:
            self.failed(f"truncate failed: {exc}")  # stored rows stay in it: the replay skips them
            self.stale = True
            return
        self.base = self.synced = self.end
        self.torn = False
        self.stale = False

    def sync(self) -> bool:
        """fsync what the journal took; False once any fsync failed (after a failed fsync the kernel may have
        dropped the pages, and a later fsync can say success: the journal is not trusted again this run)."""
        with self._lock:
            fd, end = self.fd, self.end
            if fd is None or end <= self.synced:
                return self.durable
        try:
            os.fsync(fd)
        except OSError as exc:
            with self._lock:
                first = self.durable
                self.durable = False
                self.failed(f"fsync failed: {exc}")
                self.fsync_error = self.fsync_error or f"fsync failed: {exc}"
            if first:
                log.error("ledger journal %s: fsync failed (%s); rows held in it count as lost from now on",
                          self.path, exc)
            return False
        with self._lock:
            self.synced = max(self.synced, end)
            return self.durable

    def close(self) -> None:
        """Close the file (under the lock; the caller has settled what it holds)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
