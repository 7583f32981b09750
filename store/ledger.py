"""The request ledger: rows queued by the proxy, written in batches by one thread, rolled up per minute.

The proxy's request path appends each row to a journal file beside the store (one JSON line, a plain
write: it survives SIGKILL, not a power cut) and to a queue. The writer thread wakes on the first
queued row, lets rows gather for `flush_every_s`, then writes them in batches: inserts the raw rows and
folds them into the per-minute rollups in one transaction, and drops the journal's committed prefix.

No row is dropped silently:
- when the store cannot be written (disk full, locked, I/O error) the rows stay pending, in memory and in
  the journal, and are retried every `retry_every_s`; the failure is logged once and counted;
- a row the store cannot take as given (text with a lone surrogate, an integer past 64 bits) is stored
  with the offending field made safe and `sanitized = 1`, never taking its batch with it;
- rows in the journal that never reached the store (the process was killed) are written when the next
  writer opens the same store, once each (by request id).
`close()` drains everything it can first.
"""

from __future__ import annotations

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

from store.db import Store
from store.schema import ROLLUP_TABLES

LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, float("inf"))
CONFIDENCE_BINS = 10
SLM_ERROR_REASONS = ("slm_timeout", "slm_first_token_timeout", "slm_total_timeout", "slm_error", "no_logprobs")
MAX_PENDING = 1_000_000  # rows held in memory while the store cannot be written; the journal keeps the rest
log = logging.getLogger("fleetdeck.ledger")


@dataclass(slots=True)
class LedgerRow:
    id: str
    ts: float
    task: str
    route: str  # slm | frontier | none
    escalated: bool
    reason: str
    status: int
    forced: bool = False
    error: str | None = None
    confidence: float | None = None
    slm_model: str | None = None
    frontier_model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    slm_prompt_tokens: int | None = None
    slm_completion_tokens: int | None = None
    frontier_prompt_tokens: int | None = None
    frontier_completion_tokens: int | None = None
    slm_latency_ms: float | None = None
    frontier_latency_ms: float | None = None
    latency_ms: float | None = None
    cost_usd: float = 0.0
    all_frontier_cost_usd: float = 0.0
    stream: bool = False
    prompt_text: str | None = None
    completion_text: str | None = None
    sanitized: bool = False  # a field could not be stored as given and was made safe
    slm_ttft_ms: float | None = None  # streamed: the small model's first token, ms after it was asked
    decision_window: str | None = None  # streamed: first_token | first_N_tokens | whole_answer
    slm_bound: str | None = None  # the small model's bound that fired: first_token | total


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
            if row.reason == "low_confidence":
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


def journal_path(store: Store) -> Path:
    return Path(f"{store.path}-ledger.jsonl")


def journal_backlog(store: Store, now: float, min_age_s: float = 5.0) -> int:
    """Rows in the proxy's journal that have waited over `min_age_s`: the proxy cannot write the store, or
    stopped before it did (they are written when a proxy next opens this store). 0 when all is well."""
    path = journal_path(store)
    try:
        st = path.stat()
        if st.st_size == 0 or now - st.st_mtime < min_age_s:
            return 0
        with path.open("rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def _row_from_json(line: str) -> LedgerRow | None:
    try:
        data = json.loads(line)
        return LedgerRow(**{k: v for k, v in data.items() if k in _COLUMNS})
    except (ValueError, TypeError):
        return None


class LedgerWriter:
    """A journal, a queue and one thread that writes it in batches. Thread-safe `put`; `close` flushes."""

    def __init__(
        self,
        store: Store,
        batch_size: int = 1000,
        flush_every_s: float = 0.25,
        retention_days: float = 30.0,
        prune_every_s: float = 3600.0,
        retry_every_s: float = 2.0,
    ) -> None:
        self.store = store
        self.batch_size = batch_size
        self.flush_every_s = flush_every_s
        self.retention_s = retention_days * 86400.0
        self.prune_every_s = prune_every_s
        self.retry_every_s = retry_every_s
        self._q: queue.SimpleQueue[tuple[LedgerRow, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._last_prune = 0.0
        self._pending: list[tuple[LedgerRow, int]] = []  # rows the store refused, oldest first
        self.written = 0
        self.sanitized = 0
        self.replayed = 0
        self.lost = 0  # only past MAX_PENDING in memory; those rows are still in the journal
        self.write_failures = 0
        self.journal_failures = 0
        self.last_error: str | None = None
        self._closed = False
        # The journal: `_base` is the logical offset of the file's first byte, so offsets held by queued
        # rows stay valid when the committed prefix is cut off.
        self._journal_lock = threading.Lock()
        self._journal = journal_path(store)
        self._base = 0
        self._end = 0
        self._committed = 0
        self._fd: int | None = None
        self._replay()
        self._thread.start()

    # -- the journal ----------------------------------------------------------------------------
    def _open_journal(self) -> None:
        self._fd = os.open(self._journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._base = self._end = self._committed = 0
        os.fchmod(self._fd, 0o600)

    def _replay(self) -> None:
        """Rows a killed writer journaled but never stored: write each once, then start a fresh journal."""
        try:
            text = self._journal.read_text(encoding="utf-8", errors="surrogateescape") if self._journal.exists() else ""
        except OSError as exc:
            log.error("cannot read the ledger journal %s: %s", self._journal, exc)
            text = ""
        rows = [r for r in map(_row_from_json, text.splitlines()) if r is not None]
        if rows:
            ids = [r.id for r in rows]
            have: set[str] = set()
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                have |= {x["id"] for x in self.store.query(
                    f"SELECT id FROM requests WHERE id IN ({', '.join('?' * len(chunk))})", chunk)}
            missing = [r for r in rows if r.id not in have]
            if missing and self._store_rows(missing):
                self.replayed = len(missing)
                log.warning("ledger: %d row(s) from the journal of an earlier run written to the store", len(missing))
            elif missing:
                # The store still refuses: keep the journal as it is and hold the rows for retry.
                self._pending = [(r, 0) for r in missing]
                self._fd = os.open(self._journal, os.O_WRONLY | os.O_APPEND, 0o600)
                self._end = self._journal.stat().st_size
                self._base = self._committed = 0
                return
        try:
            if self._journal.exists():
                self._journal.unlink()
            self._open_journal()
        except OSError as exc:
            self.journal_failures += 1
            log.error("cannot open the ledger journal %s: %s (rows are written without it)", self._journal, exc)

    def _journal_append(self, row: LedgerRow) -> int:
        line = (json.dumps(asdict(row), ensure_ascii=True, default=str) + "\n").encode("ascii")
        with self._journal_lock:
            if self._fd is not None:
                try:
                    os.write(self._fd, line)
                except OSError as exc:
                    self.journal_failures += 1
                    if self.journal_failures == 1 or self.journal_failures % 1000 == 0:
                        log.error("ledger journal write failed (%s); rows are held in memory", exc)
                    return self._end
            self._end += len(line)
            return self._end

    def _cut_journal(self, offset: int) -> None:
        """Everything up to `offset` is in the store: drop it from the journal."""
        with self._journal_lock:
            self._committed = max(self._committed, offset)
            if self._fd is None or self._committed < self._end:
                return  # rows past the committed prefix are still on their way
            try:
                os.ftruncate(self._fd, 0)
                self._base = self._end
            except OSError as exc:
                self.journal_failures += 1
                log.error("ledger journal truncate failed: %s", exc)

    # -- the writer -----------------------------------------------------------------------------
    def put(self, row: LedgerRow) -> None:
        self._q.put((row, self._journal_append(row)))

    @property
    def pending(self) -> int:
        return len(self._pending)

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
            batch: list[tuple[LedgerRow, int]] = [] if first is None else [first]
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

    def _write(self, batch: list[tuple[LedgerRow, int]]) -> bool:
        """Pending rows first, then the batch; True when all of them are in the store."""
        items = self._pending + batch
        if not items:
            return True
        if self._store_rows([r for r, _ in items]):
            self._pending = []
            self.written += len(items)
            if self.last_error is not None:
                log.warning("ledger writes work again: %d held row(s) stored", len(items))
            self.last_error = None
            self._cut_journal(items[-1][1])
            return True
        self._pending = items
        if len(self._pending) > MAX_PENDING:
            drop = len(self._pending) - MAX_PENDING
            self.lost += drop
            log.error("ledger: %d row(s) dropped from memory (still in the journal %s)", drop, self._journal)
            self._pending = self._pending[drop:]
        return False

    def _store_rows(self, rows: list[LedgerRow]) -> bool:
        try:
            write_rows(self.store, rows)
            return True
        except Exception as exc:
            if _store_wide(exc):
                return self._failed(exc, len(rows))
        # One row's values: store the others as they are, and that one made safe.
        good: list[LedgerRow] = []
        for row in rows:
            try:
                write_rows(self.store, [row])
                good.append(row)
            except Exception as exc:
                if _store_wide(exc):
                    return self._failed(exc, len(rows))
                try:
                    write_rows(self.store, [sanitize(row)])
                    self.sanitized += 1
                    log.warning("ledger row %s stored with unstorable fields made safe (%s)", row.id, type(exc).__name__)
                except Exception as exc2:
                    return self._failed(exc2, len(rows))
        return True

    def _failed(self, exc: BaseException, n: int) -> bool:
        self.write_failures += 1
        if self.last_error is None:
            log.error("ledger write failed (%s); %d row(s) held and retried every %g s", exc, n, self.retry_every_s)
        self.last_error = f"ledger write failed: {exc}"
        return False

    def _maybe_prune(self) -> None:
        now = time.time()
        if now - self._last_prune < self.prune_every_s:
            return
        self._last_prune = now
        try:
            with self.store.transaction() as conn:
                conn.execute("DELETE FROM requests WHERE ts < ?", (now - self.retention_s,))
        except Exception as exc:
            self.last_error = f"ledger pruning failed: {exc}"

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued (retrying a failing store until `timeout`); what remains stays journaled."""
        if self._closed:
            return
        self._closed = True
        self._q.put(None)
        self._thread.join(timeout)
        deadline = time.time() + timeout
        while self._pending and time.time() < deadline:
            if self._write([]):
                break
            time.sleep(min(self.retry_every_s, 0.5))
        if self._pending:
            log.error("ledger: %d row(s) not stored at shutdown; they stay in %s and are written on the next start",
                      len(self._pending), self._journal)
        with self._journal_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            try:
                if not self._pending and self._journal.exists() and self._journal.stat().st_size == 0:
                    self._journal.unlink()
            except OSError:
                pass
