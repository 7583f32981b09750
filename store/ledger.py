"""The request ledger: rows queued by the proxy, written in batches by one thread, rolled up per minute.

The proxy's request path only appends to a queue. The writer thread wakes on the first queued row,
lets rows gather for `flush_every_s`, then writes them in batches of up to `batch_size`: inserts the raw rows and folds them into the per-minute rollups in one
transaction, and deletes raw rows past the retention. `close()` drains everything first, so a
graceful shutdown loses no row.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable

from store.db import Store
from store.schema import ROLLUP_TABLES

LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, float("inf"))
CONFIDENCE_BINS = 10
SLM_ERROR_REASONS = ("slm_timeout", "slm_error", "no_logprobs")


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
            conn.execute(
                f"INSERT OR REPLACE INTO {table} (bucket, task, route, {', '.join(_ROLL_COLUMNS)}, latency_hist,"
                f" confidence_hist) VALUES ({', '.join('?' * (len(_ROLL_COLUMNS) + 5))})",
                (bucket, task, route, *values, json.dumps(r.latency_hist or []), json.dumps(r.confidence_hist or [])),
            )


def write_rows(store: Store, rows: list[LedgerRow]) -> None:
    with store.transaction() as conn:
        conn.executemany(_INSERT, [tuple(asdict(r).values()) for r in rows])
        fold_rollups(conn, rows)


class LedgerWriter:
    """A queue and one thread that writes it in batches. Thread-safe `put`; `close` flushes."""

    def __init__(
        self,
        store: Store,
        batch_size: int = 1000,
        flush_every_s: float = 0.25,
        retention_days: float = 30.0,
        prune_every_s: float = 3600.0,
    ) -> None:
        self.store = store
        self.batch_size = batch_size
        self.flush_every_s = flush_every_s
        self.retention_s = retention_days * 86400.0
        self.prune_every_s = prune_every_s
        self._q: queue.SimpleQueue[LedgerRow | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._last_prune = 0.0
        self.written = 0
        self.last_error: str | None = None
        self._closed = False
        self._thread.start()

    def put(self, row: LedgerRow) -> None:
        self._q.put(row)

    def _run(self) -> None:
        while True:
            try:
                first = self._q.get(timeout=1.0)
            except queue.Empty:
                self._maybe_prune()
                continue
            # Let rows gather for a moment: one transaction per batch, not per request, and no
            # wake-up of this thread (and its GIL) for every row the proxy queues.
            if first is not None:
                time.sleep(self.flush_every_s)
            batch: list[LedgerRow] = [] if first is None else [first]
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
            if batch:
                self._write(batch)
            self._maybe_prune()
            if stop:
                return

    def _write(self, batch: list[LedgerRow]) -> None:
        for attempt in range(5):
            try:
                write_rows(self.store, batch)
                self.written += len(batch)
                self.last_error = None
                return
            except Exception as exc:  # a locked or full disk: retry, then keep the proxy serving
                self.last_error = f"ledger write failed: {exc}"
                time.sleep(0.2 * (attempt + 1))

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
        if self._closed:
            return
        self._closed = True
        self._q.put(None)
        self._thread.join(timeout)
