"""The request ledger: rows queued by the proxy, written in batches by one thread, rolled up per minute.

The proxy's request path appends each row to a journal (one JSON line, a plain write: it survives
SIGKILL, not a power cut) beside the store or in `[proxy] journal_dir`, and to a queue. The writer thread
wakes on the first queued row, lets rows gather for `flush_every_s`, then writes them in batches: inserts
the raw rows and folds them into the per-minute rollups in one transaction, and drops the journal's
committed prefix.

No row is dropped silently. Every row recorded is counted in exactly one of: stored, journaled (its whole
line is in the journal), held in memory only, lost (`LedgerWriter.counts()`):
- every journal write is checked: a short write (a full disk takes part of a line) is cut back or fenced
  off with a newline, and the row counts as not journaled; an fsync that fails marks the journal as not
  durable for the rest of the run;
- when the store cannot be written (disk full, locked, I/O error) the rows stay pending, in memory and in
  the journal, retried every `retry_every_s` (the journal is fsynced then); the failure is logged once
  and counted;
- a row the store cannot take as given (text with a lone surrogate, an integer past 64 bits) is stored
  with the offending field made safe and `sanitized = 1`, never taking its batch with it;
- rows in the journal that never reached the store (the process was killed) are written when the next
  writer opens the same store, once each (by request id); a torn line is skipped and counted.
`close(timeout)` stores what it can within its bound, syncs the journal, counts what is in neither as lost
and returns a `LedgerClose` that says so.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterable

from store.db import BUSY_TIMEOUT_MS, Store
from store.ledger_row import SLM_ERROR_REASONS, LedgerRow, Reason
from store.schema import ROLLUP_TABLES

LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, float("inf"))
CONFIDENCE_BINS = 10
MAX_PENDING = 1_000_000  # rows held in memory while the store cannot be written; the journal keeps the rest
log = logging.getLogger("fleetdeck.ledger")


_COLUMNS = [f.name for f in fields(LedgerRow)]
_INSERT = f"INSERT OR REPLACE INTO requests ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"


def latency_bucket(ms: float) -> int:
    for i, edge in enumerate(LATENCY_BUCKETS_MS):
        if ms <= edge:
            return i
    return len(LATENCY_BUCKETS_MS) - 1


def confidence_bin(c: float) -> int:
    return min(CONFIDENCE_BINS - 1, max(0, int(c * CONFIDENCE_BINS)))


@dataclass
class _Roll:
    requests: int = 0
    escalated: int = 0
    esc_low_confidence: int = 0
    esc_slm_error: int = 0
    esc_forced: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    all_frontier_cost_usd: float = 0.0
    latency_ms_sum: float = 0.0
    latency_hist: list[int] | None = None
    confidence_hist: list[int] | None = None

    def add(self, row: LedgerRow) -> None:
        self.requests += 1
        if row.escalated:
            self.escalated += 1
            if row.reason == Reason.LOW_CONFIDENCE:
                self.esc_low_confidence += 1
            elif row.reason in SLM_ERROR_REASONS:
                self.esc_slm_error += 1
            elif row.forced:
                self.esc_forced += 1
        if row.status >= 400:
            self.errors += 1
        self.prompt_tokens += row.prompt_tokens or 0
        self.completion_tokens += row.completion_tokens or 0
        self.cost_usd += row.cost_usd
        self.all_frontier_cost_usd += row.all_frontier_cost_usd
        if row.latency_ms is not None:
            self.latency_ms_sum += row.latency_ms
            hist = self.latency_hist or [0] * len(LATENCY_BUCKETS_MS)
            hist[latency_bucket(row.latency_ms)] += 1
            self.latency_hist = hist
        if row.confidence is not None:
            chist = self.confidence_hist or [0] * CONFIDENCE_BINS
            chist[confidence_bin(row.confidence)] += 1
            self.confidence_hist = chist


def _merge_hist(a: list[int] | None, b_json: str, size: int) -> list[int]:
    b = json.loads(b_json) if b_json else []
    out = list(a or [0] * size)
    out += [0] * (size - len(out))
    for i, v in enumerate(b[:size]):
        out[i] += v
    return out


_ROLL_COLUMNS = ("requests", "escalated", "esc_low_confidence", "esc_slm_error", "esc_forced", "errors",
                 "prompt_tokens", "completion_tokens", "cost_usd", "all_frontier_cost_usd", "latency_ms_sum")


ROLLUP_FIELDS = ("bucket", "task", "route", *_ROLL_COLUMNS, "latency_hist", "confidence_hist")


def put_rollups(conn: Any, table: str, rows: Iterable[tuple[Any, ...]]) -> None:
    """Write whole rollup rows, in ROLLUP_FIELDS order (histograms as JSON), over what a bucket held."""
    conn.executemany(f"INSERT OR REPLACE INTO {table} ({', '.join(ROLLUP_FIELDS)}) "
                     f"VALUES ({', '.join('?' * len(ROLLUP_FIELDS))})", rows)


def fold_rollups(conn: Any, rows: Iterable[LedgerRow]) -> None:
    """Add rows to the minute, hour and day rollups (inside the caller's transaction)."""
    rows = list(rows)
    for width, table in ROLLUP_TABLES.items():
        rolls: dict[tuple[int, str, str], _Roll] = {}
        for row in rows:
            key = (int(row.ts // width) * width, row.task, row.route)
            rolls.setdefault(key, _Roll()).add(row)
        for (bucket, task, route), r in rolls.items():
            old = conn.execute(
                f"SELECT {', '.join(_ROLL_COLUMNS)}, latency_hist, confidence_hist FROM {table}"
                " WHERE bucket = ? AND task = ? AND route = ?",
                (bucket, task, route),
            ).fetchone()
            if old:
                for i, col in enumerate(_ROLL_COLUMNS):
                    setattr(r, col, getattr(r, col) + old[i])
                r.latency_hist = _merge_hist(r.latency_hist, old[-2], len(LATENCY_BUCKETS_MS))
                r.confidence_hist = _merge_hist(r.confidence_hist, old[-1], CONFIDENCE_BINS)
            values = [getattr(r, col) for col in _ROLL_COLUMNS]
            put_rollups(conn, table, [(bucket, task, route, *values, json.dumps(r.latency_hist or []),
                                       json.dumps(r.confidence_hist or []))])


def write_rows(store: Store, rows: list[LedgerRow]) -> None:
    with store.transaction() as conn:
        conn.executemany(_INSERT, [tuple(asdict(r).values()) for r in rows])
        fold_rollups(conn, rows)


def _safe(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        return None
    if isinstance(value, float) and value != value:
        return None
    return value


def sanitize(row: LedgerRow) -> LedgerRow:
    """The row with every field SQLite can store, and the flag that says it was changed."""
    changes = {f: _safe(getattr(row, f)) for f in _COLUMNS}
    return replace(row, **{**changes, "sanitized": True})


def _store_wide(exc: BaseException) -> bool:
    """A failure of the store itself (full, locked, I/O), not of one row's values."""
    return isinstance(exc, sqlite3.OperationalError) or isinstance(exc, OSError)


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


def _row_from_json(line: bytes) -> LedgerRow | None:
    try:
        data = json.loads(line)
        row = LedgerRow(**{k: v for k, v in data.items() if k in _COLUMNS})
    except (ValueError, TypeError, AttributeError, RecursionError):
        return None
    for name, (types, optional) in _FIELD_TYPES.items():
        value = getattr(row, name)
        if value is None and optional:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return None
    return row


@dataclass(frozen=True, slots=True)
class JournalContents:
    rows: list[LedgerRow]  # each id once, in journal order
    unreadable: int  # lines that are not a row: a torn line left by a short write or a crash mid-write
    torn_tail: bool  # the file does not end with a newline: an append must start a new line first


def read_journal(path: Path) -> JournalContents:
    """The rows of a journal file. Raises OSError when it cannot be read."""
    data = path.read_bytes()
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


@dataclass(frozen=True, slots=True)
class LedgerCounts:
    """Where every row this run recorded is. Always: recorded == stored + journaled + unjournaled + lost."""

    recorded: int  # rows this run recorded (every answered or refused request of a known task)
    stored: int  # in the store
    journaled: int  # not in the store yet; its whole line is in the journal (written at the next start)
    unjournaled: int  # not in the store yet and not in the journal: held in memory only
    lost: int  # in neither, as far as this run can tell: counted, logged and said at the stop
    pending: int  # rows held in memory while the store refuses them (earlier runs' included)
    replayed: int  # rows of an earlier run's journal this run stored
    earlier_held: int  # rows of an earlier run's journal still waiting for the store (they stay in the journal)
    unreadable: int  # lines of an earlier run's journal that were not rows (a torn line): skipped


@dataclass(frozen=True, slots=True)
class LedgerClose:
    """What `LedgerWriter.close` kept, for the proxy's stop line and log: only what is true."""

    counts: LedgerCounts
    journal: Path
    lost_because: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        c = self.counts
        text = (f"{c.stored} ledger row(s) stored this run, {c.journaled} held in the journal {self.journal} "
                f"for the next start, {c.lost} lost (of {c.recorded} recorded)")
        if c.lost:
            text += ": " + "; ".join(self.lost_because)
        if c.replayed:
            text += f"; {c.replayed} row(s) of an earlier run's journal stored"
        if c.earlier_held:
            text += f"; {c.earlier_held} row(s) of an earlier run still wait in the journal"
        for note in self.notes:
            text += f"; {note}"
        return text


@dataclass(slots=True)
class _Held:
    row: LedgerRow
    offset: int  # the journal's logical offset just past this row's line: a cut there or later removes it
    journaled: bool  # its whole line is in the journal file
    earlier: bool = False  # read from an earlier run's journal, not recorded by this run


MIN_CLOSE_ATTEMPT_S = 1.0  # the last store attempt at a stop gets this long even when the grace is spent


class LedgerWriter:
    """A journal, a queue and one thread that writes it in batches. Thread-safe `put`; `close` flushes.

    Every row this run recorded is counted in exactly one of: stored, journaled (its whole line is in the
    journal), unjournaled (memory only), lost; `counts()` reads them, `close()` settles the last two."""

    def __init__(
        self,
        store: Store,
        batch_size: int = 1000,
        flush_every_s: float = 0.25,
        retention_days: float = 30.0,
        prune_every_s: float = 3600.0,
        retry_every_s: float = 2.0,
        journal_dir: Path | None = None,
    ) -> None:
        self.store = store
        self.batch_size = batch_size
        self.flush_every_s = flush_every_s
        self.retention_s = retention_days * 86400.0
        self.prune_every_s = prune_every_s
        self.retry_every_s = retry_every_s
        self._q: queue.SimpleQueue[_Held | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._last_prune = 0.0
        self._pending: list[_Held] = []  # rows the store refused, oldest first
        self._inflight: list[_Held] = []  # rows the writer is trying to store right now
        # One lock for the journal's state and the counts: `put` (the event loop) and the writer thread.
        self._lock = threading.Lock()
        self.recorded = 0
        self.written = 0  # rows of this run stored
        self.sanitized = 0
        self.replayed = 0
        self.lost = 0
        self._journaled = 0
        self._unjournaled = 0
        self._earlier_held = 0
        self.unreadable = 0
        self.write_failures = 0
        self.journal_failures = 0
        self.last_error: str | None = None  # why the store does not take rows now
        self.prune_error: str | None = None
        self.journal_error: str | None = None
        self._lost_why: dict[str, int] = {}  # rows counted lost before the close, by why
        self._closed = False
        self._abandoned = False  # the close's bound passed while a store write ran: the writer stores no more
        self._report: LedgerClose | None = None
        # The journal: `_base` is the logical offset of the file's first byte, so offsets held by queued
        # rows stay valid when the committed prefix is cut off.
        self._journal = journal_path(store, journal_dir)
        self._others = journal_paths(store, journal_dir)[1:]
        self._base = 0
        self._end = 0
        self._committed = 0
        self._synced = 0  # logical offset up to which an fsync succeeded
        self._durable = True  # False once an fsync failed: what the journal holds may not be on disk
        self._torn = False  # the file ends in a partial line: the next append starts a new line
        self._pinned = False  # the journal holds rows this run will not store: never cut it
        self._append_failing = False
        self._append_error: str | None = None  # why the last row not journaled is not (a write or the open)
        self._fsync_error: str | None = None  # the first failed fsync: from then on the journal is not trusted
        self._fd: int | None = None
        if journal_dir is not None:
            try:
                # Made 0700 when missing; one that exists is the operator's (the proxy's start checked it).
                Path(journal_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                self._journal_failed(f"cannot make the journal folder {journal_dir}: {exc}")
        self._replay()
        for other in self._others:
            self._replay_other(other)
        self._thread.start()

    # -- the journal ----------------------------------------------------------------------------
    @property
    def journal(self) -> Path:
        return self._journal

    def _journal_failed(self, message: str) -> None:
        """Count and say a journal failure (once, then every 1000th: a full disk fails every row)."""
        self.journal_failures += 1
        self.journal_error = message
        if self.journal_failures == 1 or self.journal_failures % 1000 == 0:
            log.error("ledger journal %s: %s (rows not journaled are held in memory only)", self._journal, message)

    def _open_journal(self, torn: bool | None = None) -> None:
        """Open for appending. The file's own size is where this run starts (a journal kept, or one that could
        not be removed), so a cut-back never reaches into lines before it; with `torn` unknown, a kept file
        is taken to end mid-line (a newline first costs one blank line, which the replay skips)."""
        # O_NOFOLLOW: a link planted at the journal's name is refused, never written through.
        self._fd = os.open(self._journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        os.fchmod(self._fd, 0o600)
        size = os.fstat(self._fd).st_size
        self._base = self._committed = 0
        self._end = self._synced = size
        self._torn = (size > 0) if torn is None else torn

    def _replay(self) -> None:
        """Rows a killed writer journaled but never stored: write each once, then start a fresh journal."""
        try:
            found = read_journal(self._journal) if self._journal.exists() else JournalContents([], 0, False)
        except OSError as exc:
            # Unreadable now, maybe readable later: keep it whole (never cut it) and append after it.
            log.error("cannot read the ledger journal %s: %s; it is kept for the next start", self._journal, exc)
            self._pinned = True
            try:
                self._open_journal()
            except OSError as exc2:
                self._journal_failed(f"cannot open: {exc2}")
            return
        self._note_unreadable(self._journal, found.unreadable)
        missing = self._missing(found.rows)
        done = self._store_rows(missing) if missing else 0
        if done:
            self.replayed += done
            log.warning("ledger: %d row(s) from the journal of an earlier run written to the store", done)
        if done < len(missing):
            # The store still refuses: keep the journal as it is and hold the rest for retry.
            self._pending = [_Held(r, 0, True, earlier=True) for r in missing[done:]]
            self._earlier_held = len(self._pending)
            try:
                self._open_journal(found.torn_tail)
            except OSError as exc:
                self._pinned = True
                self._journal_failed(f"cannot open: {exc}")
            return
        try:
            if self._journal.exists() or self._journal.is_symlink():
                self._journal.unlink()
        except OSError as exc:
            # Its rows are all in the store now: appending after them is safe (a replay skips stored ids).
            log.warning("ledger journal %s replayed but not removed (%s); new rows are appended to it", self._journal, exc)
        try:
            self._open_journal()
        except OSError as exc:
            self._journal_failed(f"cannot open: {exc}")

    def _replay_other(self, path: Path) -> None:
        """A journal left where an earlier configuration put it: stored and removed, or left for next time."""
        try:
            if not path.exists():
                return
            found = read_journal(path)
        except OSError as exc:
            log.error("cannot read the ledger journal %s: %s; it is kept for the next start", path, exc)
            return
        self._note_unreadable(path, found.unreadable)
        missing = self._missing(found.rows)
        done = self._store_rows(missing) if missing else 0
        self.replayed += done
        if done:
            log.warning("ledger: %d row(s) from the journal %s of an earlier run written to the store", done, path)
        if done < len(missing):
            # The rest waits in that file (the ids stored now are skipped when it is read again).
            log.error("ledger: %d row(s) in the journal %s wait for the store; kept for the next start",
                      len(missing) - done, path)
            return
        try:
            path.unlink()
        except OSError:
            pass

    def _note_unreadable(self, path: Path, n: int) -> None:
        if n:
            self.unreadable += n
            log.warning("ledger journal %s: %d line(s) that are not a row skipped (a line torn by a full disk or "
                        "a crash mid-write: that row was counted lost when it was written)", path, n)

    def _missing(self, rows: list[LedgerRow]) -> list[LedgerRow]:
        """The rows whose id the store does not have yet: a journal is replayed once, whatever happened."""
        if not rows:
            return []
        ids = [r.id for r in rows]
        have: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            have |= {x["id"] for x in self.store.query(
                f"SELECT id FROM requests WHERE id IN ({', '.join('?' * len(chunk))})", chunk)}
        return [r for r in rows if r.id not in have]

    def _append_locked(self, row: LedgerRow) -> tuple[int, bool]:
        """Append the row's line; (its offset, whether the whole line is in the file). Every byte is checked:
        a short write (a full disk takes part of a line) is cut back, or, when even that fails, the next line
        starts on a new line so the torn one takes no neighbour with it."""
        if self._fd is None:
            self._append_error = self._append_error or self.journal_error or "no journal"
            return self._end, False
        data = (json.dumps(asdict(row), ensure_ascii=True, default=str) + "\n").encode("ascii")
        if self._torn:
            data = b"\n" + data
        done = 0
        try:
            while done < len(data):
                n = os.write(self._fd, data[done:])
                if n <= 0:
                    raise OSError(errno.EIO, "the journal took no bytes")
                done += n
        except OSError as exc:
            if done:
                try:
                    os.ftruncate(self._fd, self._end - self._base)
                except OSError:
                    self._end += done  # the torn bytes stay: skipped at replay
                    self._torn = True
            self._append_error = (f"write failed after {done} of {len(data)} bytes: {exc}" if done
                                  else f"write failed: {exc}")
            self._journal_failed(self._append_error)
            self._append_failing = True
            return self._end, False
        self._end += len(data)
        self._torn = False
        if self._append_failing:
            self._append_failing = False
            log.warning("ledger journal %s takes rows again", self._journal)
        return self._end, True

    def _cut_locked(self, offset: int) -> None:
        """Everything up to `offset` is in the store: drop it from the journal."""
        self._committed = max(self._committed, offset)
        if self._fd is None or self._pinned or self._committed < self._end:
            return  # rows past the committed prefix are still on their way
        try:
            os.ftruncate(self._fd, 0)
        except OSError as exc:
            self._journal_failed(f"truncate failed: {exc}")  # stored rows stay in it: the replay skips them
            return
        self._base = self._synced = self._end
        self._torn = False

    def _sync_journal(self) -> bool:
        """fsync what the journal took; False once any fsync failed (after a failed fsync the kernel may have
        dropped the pages, and a later fsync can say success: the journal is not trusted again this run)."""
        with self._lock:
            fd, end = self._fd, self._end
            if fd is None or end <= self._synced:
                return self._durable
        try:
            os.fsync(fd)
        except OSError as exc:
            with self._lock:
                first = self._durable
                self._durable = False
                self._journal_failed(f"fsync failed: {exc}")
                self._fsync_error = self._fsync_error or f"fsync failed: {exc}"
            if first:
                log.error("ledger journal %s: fsync failed (%s); rows held in it count as lost from now on",
                          self._journal, exc)
            return False
        with self._lock:
            self._synced = max(self._synced, end)
            return self._durable

    # -- the writer -----------------------------------------------------------------------------
    def put(self, row: LedgerRow) -> None:
        with self._lock:
            self.recorded += 1
            if self._closed:
                # Recorded after the stop's reckoning (a request cut by a forced exit): said, never silent.
                self._lose_locked(1, "recorded after the ledger closed")
                log.error("ledger row %s recorded after the ledger closed: lost", row.id)
                return
            offset, journaled = self._append_locked(row)
            if journaled:
                self._journaled += 1
            else:
                self._unjournaled += 1
            self._q.put(_Held(row, offset, journaled))

    @property
    def pending(self) -> int:
        """Rows held in memory until the store takes them (those being written right now included)."""
        with self._lock:
            return len(self._pending) + len(self._inflight)

    def counts(self) -> LedgerCounts:
        with self._lock:
            return LedgerCounts(self.recorded, self.written, self._journaled, self._unjournaled, self.lost,
                                len(self._pending) + len(self._inflight), self.replayed, self._earlier_held,
                                self.unreadable)

    def _run(self) -> None:
        while True:
            try:
                first = self._q.get(timeout=self.retry_every_s if self._pending else 1.0)
            except queue.Empty:
                if self._pending:
                    self._write([])
                self._maybe_prune()
                continue
            # Let rows gather for a moment: one transaction per batch, not per request, and no
            # wake-up of this thread (and its GIL) for every row the proxy queues.
            if first is not None:
                time.sleep(self.flush_every_s)
            batch: list[_Held] = [] if first is None else [first]
            stop = first is None
            while True:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    continue
                batch.append(item)
                if len(batch) >= self.batch_size:
                    self._write(batch)
                    batch = []
            if batch or self._pending:
                self._write(batch)
            self._maybe_prune()
            if stop:
                return

    def _write(self, batch: list[_Held]) -> bool:
        """Pending rows first, then the batch; True when all of them are in the store."""
        with self._lock:
            items = self._pending + batch
            if self._abandoned:  # the close has counted these rows already: they stay where it said
                self._pending = items
                return False
            self._pending, self._inflight = [], items
        if not items:
            return True
        done = self._store_rows([h.row for h in items])
        ok = done == len(items)
        with self._lock:
            self._inflight = []
            for h in items[:done]:
                self._settle_stored(h)
            if done:
                self._cut_locked(items[done - 1].offset)
            if not ok:
                self._pending = items[done:]
                if len(self._pending) > MAX_PENDING:
                    self._drop_locked(len(self._pending) - MAX_PENDING)
        if ok:
            if self.last_error is not None:
                log.warning("ledger writes work again: %d held row(s) stored", len(items))
            self.last_error = None
        else:
            self._sync_journal()  # the held rows live in the journal now: make it durable
        return ok

    def _settle_stored(self, h: _Held) -> None:
        if h.earlier:
            self.replayed += 1
            self._earlier_held -= 1
            return
        self.written += 1
        if h.journaled:
            self._journaled -= 1
        else:
            self._unjournaled -= 1

    def _drop_locked(self, n: int) -> None:
        """Past MAX_PENDING the oldest rows leave memory: a journaled one waits in the journal (which is then
        never cut this run, so the next start stores it); one that is not is lost, and counted."""
        dropped, self._pending = self._pending[:n], self._pending[n:]
        gone = 0
        for h in dropped:
            if h.journaled:
                self._pinned = True
            else:
                self._unjournaled -= 1
                gone += 1
        if gone:
            self._lose_locked(gone, f"dropped from memory past {MAX_PENDING} held rows, and not journaled")
        log.error("ledger: %d row(s) dropped from memory; %d of them are in the journal %s for the next start, "
                  "%d lost", n, n - gone, self._journal, gone)

    def _lose_locked(self, n: int, why: str) -> None:
        self.lost += n
        self._lost_why[why] = self._lost_why.get(why, 0) + n

    def _store_rows(self, rows: list[LedgerRow]) -> int:
        """Store the rows in order; how many of the first ones are in the store now (all, or up to a failure of
        the store itself). A row stored is never sent again: its rollups would be counted twice."""
        try:
            write_rows(self.store, rows)
            return len(rows)
        except Exception as exc:
            if _store_wide(exc):
                self._failed(exc, len(rows))
                return 0
        # One row's values: store the others as they are, and that one made safe.
        for i, row in enumerate(rows):
            try:
                write_rows(self.store, [row])
            except Exception as exc:
                if _store_wide(exc):
                    self._failed(exc, len(rows) - i)
                    return i
                try:
                    write_rows(self.store, [sanitize(row)])
                    self.sanitized += 1
                    log.warning("ledger row %s stored with unstorable fields made safe (%s)", row.id, type(exc).__name__)
                except Exception as exc2:
                    self._failed(exc2, len(rows) - i)
                    return i
        return len(rows)

    def _failed(self, exc: BaseException, n: int) -> None:
        self.write_failures += 1
        if self.last_error is None:
            log.error("ledger write failed (%s); %d row(s) held and retried every %g s", exc, n, self.retry_every_s)
        self.last_error = f"ledger write failed: {exc}"

    def _maybe_prune(self) -> None:
        now = time.time()
        if self._abandoned or now - self._last_prune < self.prune_every_s:
            return
        self._last_prune = now
        try:
            with self.store.transaction() as conn:
                conn.execute("DELETE FROM requests WHERE ts < ?", (now - self.retention_s,))
        except Exception as exc:
            # Apart from `last_error`: that one says why rows are not stored, and is logged when it starts.
            if self.prune_error is None:
                log.error("ledger pruning failed: %s", exc)
            self.prune_error = f"ledger pruning failed: {exc}"
        else:
            self.prune_error = None

    def close(self, timeout: float = 30.0) -> LedgerClose:
        """Store what is queued, retrying a failing store until `timeout` (a bound on the whole close, past one
        last attempt); then settle every row not stored: journaled (the journal synced to disk) or lost."""
        if self._report is not None:
            return self._report
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            self._closed = True
            self._q.put(None)
        self._thread.join(max(deadline - time.monotonic(), MIN_CLOSE_ATTEMPT_S))
        if self._thread.is_alive():
            # Its store write outlived the bound (a store locked by another process, a hung disk): stop it.
            log.error("ledger: the store write still runs at the stop's bound; interrupting it")
            with self._lock:
                self._abandoned = True
            try:
                self.store.conn.interrupt()
            except Exception:
                pass
            # The interrupt does not cut SQLite's wait for another process's lock; that wait has its own bound.
            self._thread.join(BUSY_TIMEOUT_MS / 1000 + MIN_CLOSE_ATTEMPT_S)
        if not self._thread.is_alive():
            while self._pending and time.monotonic() < deadline:
                time.sleep(max(0.0, min(self.retry_every_s, 0.5, deadline - time.monotonic())))
                if self._write([]):
                    break
        held_in_journal = self._journaled or self._earlier_held
        durable = self._sync_journal() if held_in_journal else self._durable
        notes: list[str] = []
        with self._lock:
            if self._inflight:
                notes.append(f"{len(self._inflight)} row(s) were still being written to the store when the stop ended "
                             "(a hung disk): they may be in the store too; the next start stores each at most once")
            why = [f"{n} {reason}" for reason, n in self._lost_why.items()]
            if self._unjournaled:
                why.append(f"{self._unjournaled} not stored ({self.last_error or 'the store write did not finish'}) "
                           f"and not journaled ({self._append_error or self.journal_error or 'no journal'})")
                self.lost += self._unjournaled
                self._unjournaled = 0
            if self._journaled and not durable:
                why.append(f"{self._journaled} not stored ({self.last_error or 'the store write did not finish'}) "
                           f"and the journal could not be synced to disk ({self._fsync_error}; what it still "
                           "holds is stored at the next start)")
                self.lost += self._journaled
                self._journaled = 0
            fd, self._fd = self._fd, None
            counts = LedgerCounts(self.recorded, self.written, self._journaled, self._unjournaled, self.lost,
                                  len(self._pending) + len(self._inflight), self.replayed, self._earlier_held,
                                  self.unreadable)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            if not held_in_journal and not self._pinned and self._journal.exists() and self._journal.stat().st_size == 0:
                self._journal.unlink()
        except OSError:
            pass
        self._report = LedgerClose(counts, self._journal, tuple(why), tuple(notes))
        level = logging.ERROR if counts.lost else logging.WARNING if counts.journaled or counts.earlier_held else logging.INFO
        log.log(level, "ledger at the stop: %s", self._report.summary())
        return self._report
