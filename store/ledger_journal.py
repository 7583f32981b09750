"""The ledger's journal: one JSON line per recorded row, appended before the row is queued for the store.

A plain `os.write` per row survives SIGKILL (not a power cut). The journal is a live file and, beside it,
sealed parts (`<journal>.1`, `.2`, ...): each file is a *generation*, and every row held in memory knows the
generation its line is in. The live file is cut (truncated) once no row of it is still in memory; a live
file that cannot be cut that way (rows keep arriving under load, or it holds rows dropped from memory that
only it has) is sealed: renamed to the next part, a fresh live file opened, all under the writer's lock, so
a part never takes another line. A part is removed once no row of it is in memory, after its rows that only
it holds were stored (read back by id, like a start's replay). A kill at any point leaves each line in the
live file or in one part, and the next start replays both, each row once (by id). Reading a journal back
(`read_journal`) skips lines that are not rows: a torn line, or one whose values are not of the row's types.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
import threading
from dataclasses import asdict, dataclass, field, fields
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
    there by a run before `journal_dir` was set), then those the note beside the store names (a run before
    `journal_dir` was changed)."""
    out: list[Path] = []
    for path in (journal_path(store, journal_dir), journal_path(store), *noted_journals(store)):
        if path not in out:
            out.append(path)
    return out


def journal_note(store: Store) -> Path:
    """Beside the store: where its proxy's journal was, so a `journal_dir` changed between runs still has its
    rows read (before, they waited in the old folder for good)."""
    return Path(f"{store.path}-ledger.where")


def noted_journals(store: Store) -> list[Path]:
    """The journals the note names. Only a path that is this store's journal name (in whatever folder) counts:
    the note can point the start at nothing else."""
    try:
        data = json.loads(_read_regular(journal_note(store))[:65536])
    except (OSError, ValueError):
        return []
    found = []
    for item in data if isinstance(data, list) else []:
        if isinstance(item, str) and item.startswith("/") and "\x00" not in item:
            path = Path(item)
            if path in (journal_path(store, path.parent), journal_path(store)):
                found.append(path)
    return found


def write_journal_note(store: Store, journals: list[Path]) -> None:
    """Note where this run's journal is (and any earlier one still holding rows): written whole or not at all."""
    note = journal_note(store)
    tmp = note.with_name(note.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps([str(p) for p in journals]).encode("utf-8", "surrogateescape"))
        finally:
            os.close(fd)
        os.replace(tmp, note)
    except OSError as exc:
        log.warning("cannot note where the ledger journal is (%s): %s; a journal_dir changed before the next start "
                    "would have its rows read only once it is set back", note, exc)


def sealed_parts(journal: Path) -> list[Path]:
    """The sealed parts of a journal (`<journal>.N`), oldest first: rows a running writer set aside, or that a
    killed one left there. Only those names: nothing else in the folder is read."""
    pattern = re.compile(re.escape(journal.name) + r"\.([1-9][0-9]*)")
    try:
        names = os.listdir(journal.parent)
    except OSError:
        return []
    found = [(int(m.group(1)), name) for name in names if (m := pattern.fullmatch(name))]
    return [journal.parent / name for _, name in sorted(found)]


def journal_files(journal: Path) -> list[Path]:
    """Every file rows of this journal may wait in, oldest first: its sealed parts, then the live file."""
    return [*sealed_parts(journal), journal]


def part_number(part: Path) -> int:
    return int(part.name.rsplit(".", 1)[1])


def next_part(journal: Path, after: int = 0) -> tuple[Path, int]:
    """The name the next sealed part gets, past every part there (listed) and past `after`."""
    parts = sealed_parts(journal)
    n = max(after, part_number(parts[-1]) if parts else 0) + 1
    return journal.parent / f"{journal.name}.{n}", n


def journal_backlog(store: Store, now: float, min_age_s: float = 5.0, journal_dir: Path | None = None) -> int:
    """Rows in the proxy's journal that have waited over `min_age_s`: the proxy cannot write the store, or
    stopped before it did (they are written when a proxy next opens this store). 0 when all is well."""
    total = 0
    for path in [f for j in journal_paths(store, journal_dir) for f in journal_files(j)]:
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
    earlier: frozenset[str] = frozenset()  # ids whose line starts before `earlier_end` (an earlier run's)
    unreadable_earlier: int = 0  # of `unreadable`, the lines before `earlier_end`


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


def read_journal(path: Path, earlier_end: int = 0) -> JournalContents:
    """The rows of a journal file. Raises OSError when it cannot be read, or is not a regular file. Lines that
    start before byte `earlier_end` are an earlier run's: their ids and unreadable lines are told apart."""
    data = _read_regular(path)
    rows: dict[str, LedgerRow] = {}
    earlier: set[str] = set()
    unreadable = unreadable_earlier = 0
    at = 0
    for line in data.split(b"\n"):
        start, at = at, at + len(line) + 1
        if not line.strip():
            continue
        row = _row_from_json(line)
        if row is None:
            unreadable += 1
            unreadable_earlier += start < earlier_end
        elif row.id not in rows:  # a row journaled twice is one request: stored once
            rows[row.id] = row
            if start < earlier_end:
                earlier.add(row.id)
    return JournalContents(list(rows.values()), unreadable, bool(data) and not data.endswith(b"\n"),
                           frozenset(earlier), unreadable_earlier)


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
    """What replaying a journal file did."""

    stored: int  # rows written to the store now
    waiting: list[LedgerRow]  # rows not in the store that it still refuses
    unreadable: int  # lines that were not rows: skipped
    torn_tail: bool
    stored_earlier: int = 0  # of `stored`, rows whose line is before `earlier_end` (an earlier run's)
    unreadable_earlier: int = 0
    size: int = 0  # the file's size when read
    earlier: frozenset[str] = frozenset()  # ids of rows whose line is before `earlier_end`
    rows: int = 0  # rows read from it (in the store already or not)


def replay_journal(path: Path, store: Store, store_rows: Callable[[list[LedgerRow]], int], earlier_end: int = 0,
                   skip: frozenset[str] | set[str] = frozenset()) -> Replayed:
    """Store the rows of `path` the store does not have yet, nor `skip` names (`store_rows` returns how many of
    the first it stored). A missing file holds nothing; one that cannot be read raises OSError."""
    found = read_journal(path, earlier_end) if path.exists() or path.is_symlink() else JournalContents([], 0, False)
    missing = [r for r in missing_rows(store, found.rows) if r.id not in skip]
    done = store_rows(missing) if missing else 0
    stored_earlier = sum(1 for r in missing[:done] if r.id in found.earlier)
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    return Replayed(done, missing[done:], found.unreadable, found.torn_tail, stored_earlier, found.unreadable_earlier,
                    size, found.earlier, len(found.rows))


SEAL_BYTES = 8 * 1024 * 1024  # a live file this big that cannot be cut (rows keep arriving) is sealed
RETRY_S = 30.0  # a part that could not be read, or a seal or open that failed, is tried again after this long


@dataclass
class Sealed:
    """A sealed part of the journal: the rows of one generation, removed once none of them is in memory."""

    path: Path
    earlier_end: int = 0  # bytes at its start that an earlier run wrote (those rows are `earlier` ones)
    counted: bool = True  # the start read it: its earlier rows not stored are counted in `earlier_held`
    retry_at: float = 0.0  # time.monotonic() before which a failed read is not tried again
    said: bool = False  # its read-back failed and the log said so (once)


@dataclass
class _Gens:
    """Per generation: journaled rows still in memory, and whether its file holds rows only it has."""

    inmem: dict[int, int] = field(default_factory=dict)
    orphaned: set[int] = field(default_factory=set)


class JournalFile:
    """The append side of this run's journal. Every method but `sync` and `finish_seal` runs under the writer's
    lock (`lock`, which also guards the writer's counts); those take it themselves, around but not during the
    fsync."""

    def __init__(self, path: Path, lock: threading.Lock) -> None:
        self.path = path
        self._lock = lock
        self.fd: int | None = None
        self.end = 0  # bytes in the live file
        self.synced = 0  # bytes of the live file an fsync covered
        self.gen = 0  # the live file's generation
        self.earlier_end = 0  # bytes at the live file's start that an earlier run wrote
        self.earlier_counted = True  # the start read those: its rows not stored are counted in `earlier_held`
        self.sealed: dict[int, Sealed] = {}
        self._gens = _Gens()
        self.durable = True  # False once an fsync failed: what the journal holds may not be on disk
        self.torn = False  # the file ends in a partial line: the next append starts a new line
        self.stale = False  # a cut failed, or the file could not be opened: it may hold rows that are in the store
        self.failures = 0
        self.error: str | None = None  # the last failure
        self.append_failing = False
        self.append_error: str | None = None  # why the last row not journaled is not (a write or the open)
        self.fsync_error: str | None = None  # the first failed fsync: from then on the journal is not trusted
        self.retry_at = 0.0  # a failed seal or open is tried again from then (time.monotonic())
        self.last_part = -1  # the number of the last part sealed (-1: not listed yet)

    # -- generations ---------------------------------------------------------------------------------
    def held(self, gen: int, n: int = 1) -> None:
        """`n` journaled rows of generation `gen` are in memory (queued or held for the store)."""
        self._gens.inmem[gen] = self._gens.inmem.get(gen, 0) + n

    def settle(self, gen: int) -> None:
        """A journaled row of `gen` left memory: stored, or given up."""
        left = self._gens.inmem.get(gen, 0) - 1
        if left > 0:
            self._gens.inmem[gen] = left
        else:
            self._gens.inmem.pop(gen, None)

    def orphan(self, gen: int) -> None:
        """A journaled row of `gen` left memory unstored (past MAX_PENDING): only its file has it now."""
        self.settle(gen)
        self._gens.orphaned.add(gen)

    def orphan_file(self, gen: int) -> None:
        """The file of `gen` holds rows nothing in memory holds (one the start could not read)."""
        self._gens.orphaned.add(gen)

    def in_memory(self, gen: int) -> int:
        return self._gens.inmem.get(gen, 0)

    def is_orphaned(self, gen: int) -> bool:
        return gen in self._gens.orphaned

    @property
    def pinned(self) -> bool:
        """The live file holds rows nothing in memory holds: it is not cut, it is sealed and read back."""
        return self.gen in self._gens.orphaned

    def forget(self, gen: int) -> None:
        self._gens.orphaned.discard(gen)
        self._gens.inmem.pop(gen, None)
        self.sealed.pop(gen, None)

    def new_gen(self) -> int:
        """A generation for a file found at the start (a part, or the live file set aside)."""
        gen = self.gen
        self.gen += 1
        return gen

    # -- the live file -------------------------------------------------------------------------------
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
        self.end = self.synced = size
        self.torn = (size > 0) if torn is None else torn

    def open_or_fail(self, torn: bool | None = None) -> bool:
        try:
            self.open(torn)
        except OSError as exc:
            self.failed(f"cannot open: {exc}")
            return False
        return True

    def append(self, row: LedgerRow) -> tuple[int, bool]:
        """Append the row's line; (its generation, whether the whole line is in the file). Every byte is
        checked: a short write (a full disk takes part of a line) is cut back, or, when even that fails, the
        next line starts on a new line so the torn one takes no neighbour with it."""
        if self.fd is None:
            self.append_error = self.append_error or self.error or "no journal"
            return self.gen, False
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
                    os.ftruncate(self.fd, self.end)
                except OSError:
                    self.end += done  # the torn bytes stay: skipped at replay
                    self.torn = True
            self.append_error = (f"write failed after {done} of {len(data)} bytes: {exc}" if done
                                 else f"write failed: {exc}")
            self.failed(self.append_error)
            self.append_failing = True
            return self.gen, False
        self.end += len(data)
        self.torn = False
        self.held(self.gen)
        if self.append_failing:
            self.append_failing = False
            log.warning("ledger journal %s takes rows again", self.path)
        return self.gen, True

    def cut(self) -> None:
        """Truncate the live file when no row of it is in memory and none waits only in it: all it holds is
        in the store (or was given up, and said so)."""
        if self.fd is None or self.pinned or self.in_memory(self.gen) or self.end == 0:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError as exc:
            self.failed(f"truncate failed: {exc}")  # stored rows stay in it: the replay skips them
            self.stale = True
            return
        self.end = self.synced = self.earlier_end = 0
        self.earlier_counted = True
        self.torn = False
        self.stale = False

    def wants_seal(self, now: float) -> bool:
        """The live file cannot be cut and should be set aside: it holds rows only it has, or it has grown
        past SEAL_BYTES while rows of it were always in memory (steady traffic never leaves it empty)."""
        if self.fd is None or now < self.retry_at:
            return False
        return self.pinned or self.stale or self.end >= SEAL_BYTES

    def seal(self, now: float) -> int | None:
        """Rename the live file to the next sealed part and open a fresh live file (under the lock: no line
        is written between the two). Returns the part's descriptor, for `finish_seal` to fsync and close
        outside the lock; None when the rename failed (the live file stays as it is)."""
        if self.fd is None:
            return None
        if self.last_part < 0:
            self.last_part = next_part(self.path)[1] - 1  # listed once; then counted, not listed under the lock
        part, self.last_part = self.path.parent / f"{self.path.name}.{self.last_part + 1}", self.last_part + 1
        try:
            os.rename(self.path, part)
        except OSError as exc:
            self.failed(f"cannot seal the journal as {part.name}: {exc}")
            self.retry_at = now + RETRY_S
            return None
        fd, gen = self.fd, self.gen
        self.sealed[gen] = Sealed(part, self.earlier_end, self.earlier_counted)
        if self.stale:  # a cut that failed left stored rows in it: they go with the part, read back by id
            self._gens.orphaned.add(gen)
        self.fd, self.gen, self.earlier_end, self.earlier_counted = None, gen + 1, 0, True
        self.stale = False
        if not self.open_or_fail(torn=False):
            self.retry_at = now + RETRY_S
        return fd

    def lost_its_name(self) -> bool:
        """The live file no longer has its name (an operator removed it, or put another file there): rows
        written to it would be in no file once it is closed, and the next start would never see them."""
        if self.fd is None:
            return False
        try:
            mine = os.fstat(self.fd)
            named = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return mine.st_nlink == 0 or (mine.st_dev, mine.st_ino) != (named.st_dev, named.st_ino)

    def rescue(self, now: float) -> tuple[int, Path] | None:
        """The live file lost its name: its rows become a part (copied from the open file by `finish_rescue`,
        outside the lock) and a fresh live file is opened at the name. Returns (the old descriptor, the part)."""
        if self.fd is None:
            return None
        if self.last_part < 0:
            self.last_part = next_part(self.path)[1] - 1
        self.last_part += 1
        part = self.path.parent / f"{self.path.name}.{self.last_part}"
        fd, gen = self.fd, self.gen
        self.sealed[gen] = Sealed(part, self.earlier_end, self.earlier_counted)
        if self.stale:
            self._gens.orphaned.add(gen)
        self.fd, self.gen, self.earlier_end, self.earlier_counted = None, gen + 1, 0, True
        self.stale = False
        log.error("ledger journal %s was removed or replaced while the proxy ran: its rows are copied to %s and "
                  "a new journal is started", self.path, part.name)
        if not self.open_or_fail(torn=False):
            self.retry_at = now + RETRY_S
        return fd, part

    def finish_rescue(self, fd: int, part: Path) -> bool:
        """Copy the nameless file's bytes (read through /proc/self/fd: the descriptor was opened for writing) to
        its part and fsync it; False when that failed (its rows are then in no file: said, and counted so)."""
        try:
            src = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                dst = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                try:
                    while chunk := os.read(src, 1 << 20):
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(dst, view):]
                    os.fsync(dst)
                finally:
                    os.close(dst)
            finally:
                os.close(src)
        except OSError as exc:
            why = (f"the journal was removed while the proxy ran and its rows could not be copied to {part.name} "
                   f"({exc.strerror or exc})")
            log.error("ledger journal %s: %s; rows held in it count as lost from now on", self.path, why)
            with self._lock:
                self.durable = False
                self.failed(why)
                self.fsync_error = self.fsync_error or why
            return False
        finally:
            os.close(fd)
        return True

    def finish_seal(self, fd: int) -> None:
        """fsync a sealed part (the rows of it still in memory count as journaled) and close it."""
        try:
            os.fsync(fd)
        except OSError as exc:
            with self._lock:
                self._fsync_failed(exc)
        finally:
            os.close(fd)

    def reopen(self, now: float) -> None:
        """A live file that could not be opened (a full disk's inode table, a folder made unwritable) is tried
        again now and then: rows are journaled again once it opens."""
        if self.fd is None and now >= self.retry_at:
            if self.open_or_fail():
                log.warning("ledger journal %s opened: rows are journaled again", self.path)
            else:
                self.retry_at = now + RETRY_S

    def _fsync_failed(self, exc: OSError) -> None:
        first = self.durable
        self.durable = False
        self.failed(f"fsync failed: {exc}")
        self.fsync_error = self.fsync_error or f"fsync failed: {exc}"
        if first:
            log.error("ledger journal %s: fsync failed (%s); rows held in it count as lost from now on",
                      self.path, exc)

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
                self._fsync_failed(exc)
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
