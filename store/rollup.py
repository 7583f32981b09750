"""The rollups: the one definition of what a rollup row counts, and the fold that adds ledger rows into them.

`Counts` names every scalar a rollup row adds up (one field per column; the SQL type follows the field's
annotation) and `Rollup` adds the two histograms. The tables' columns (`rollup_columns_sql`, used by the
schema's migration), the fold's read-modify-write (`fold_rollups`) and the analytics' SELECT lists
(`COUNT_NAMES`) are derived from these dataclasses, and every row is read by column name: a count added here
is added everywhere at once (with a migration that adds its column: see `since`).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping

from store.ledger_row import SLM_ERROR_REASONS, LedgerRow, Reason

# seconds per bucket -> table
ROLLUP_TABLES = {60: "rollup_minute", 3600: "rollup_hour", 86400: "rollup_day"}
LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, float("inf"))
CONFIDENCE_BINS = 10
KEY_NAMES = ("bucket", "task", "route")


def latency_bucket(ms: float) -> int:
    for i, edge in enumerate(LATENCY_BUCKETS_MS):
        if ms <= edge:
            return i
    return len(LATENCY_BUCKETS_MS) - 1


def confidence_bin(c: float) -> int:
    return min(CONFIDENCE_BINS - 1, max(0, int(c * CONFIDENCE_BINS)))


# A column added after the rollup tables were made (schema version 2) carries `metadata={"since": N}`: the
# version-2 migration leaves it out and migration N adds it (`rollup_column_sql`), so a released migration
# never changes what it creates.
ROLLUP_TABLES_VERSION = 2


@dataclass(slots=True)
class Counts:
    """The scalars a rollup row sums over its bucket x task x route: one field per column."""

    requests: int = 0
    escalated: int = 0
    esc_low_confidence: int = 0  # escalated because the small model was not confident enough
    esc_slm_error: int = 0  # escalated because the small model failed (SLM_ERROR_REASONS)
    esc_forced: int = 0  # escalated because the client asked for the frontier
    errors: int = 0  # answered with status >= 400
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0  # frontier spend
    all_frontier_cost_usd: float = 0.0  # what the same requests would have cost on the frontier
    latency_ms_sum: float = 0.0
    # Of cost_usd, what was estimated from the prompt (the frontier's usage never came: `cost_estimated` rows).
    cost_estimated_usd: float = field(default=0.0, metadata={"since": 11})

    def add_counts(self, other: Mapping[str, Any]) -> None:
        """Add another row's counts, read by column name (a stored rollup row or an aggregate)."""
        for name in COUNT_NAMES:
            setattr(self, name, getattr(self, name) + (other[name] or 0))


COUNT_NAMES = tuple(f.name for f in fields(Counts))
HIST_SIZES = {"latency_hist": len(LATENCY_BUCKETS_MS), "confidence_hist": CONFIDENCE_BINS}


def _merge_hist(into: list[int], more: Iterable[int], size: int) -> list[int]:
    out = list(into) + [0] * max(0, size - len(into))
    for i, v in enumerate(list(more)[:size]):
        out[i] += v
    return out


@dataclass(slots=True)
class Rollup(Counts):
    """One rollup row's values: the counts and the histograms ([] until the bucket has a value for it)."""

    latency_hist: list[int] = field(default_factory=list)  # counts per LATENCY_BUCKETS_MS
    confidence_hist: list[int] = field(default_factory=list)  # counts per tenth of confidence

    def add(self, row: LedgerRow) -> None:
        """Fold one ledger row in."""
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
        if row.cost_estimated:
            self.cost_estimated_usd += row.cost_usd
        self.all_frontier_cost_usd += row.all_frontier_cost_usd
        if row.latency_ms is not None:
            self.latency_ms_sum += row.latency_ms
            if not self.latency_hist:
                self.latency_hist = [0] * len(LATENCY_BUCKETS_MS)
            self.latency_hist[latency_bucket(row.latency_ms)] += 1
        if row.confidence is not None:
            if not self.confidence_hist:
                self.confidence_hist = [0] * CONFIDENCE_BINS
            self.confidence_hist[confidence_bin(row.confidence)] += 1

    def add_stored(self, stored: Mapping[str, Any]) -> None:
        """Add what a stored rollup row already holds (histograms as JSON text), read by name."""
        self.add_counts(stored)
        for name, size in HIST_SIZES.items():
            text = stored[name]
            if text and (more := json.loads(text)):
                setattr(self, name, _merge_hist(getattr(self, name), more, size))

    def to_row(self, bucket: int, task: str, route: str) -> tuple[Any, ...]:
        """The row in ROLLUP_FIELDS order, histograms as JSON text."""
        return (bucket, task, route, *(getattr(self, n) for n in COUNT_NAMES),
                *(json.dumps(getattr(self, n)) for n in HIST_SIZES))


ROLLUP_FIELDS = (*KEY_NAMES, *COUNT_NAMES, *HIST_SIZES)
_SQL_TYPES = {"int": "INTEGER NOT NULL DEFAULT 0", "float": "REAL NOT NULL DEFAULT 0",
              "list[int]": "TEXT NOT NULL DEFAULT '[]'"}


def rollup_column_sql(name: str) -> str:
    """`name TYPE NOT NULL DEFAULT ...` of one value column, from its field's annotation."""
    spec = next(f for f in fields(Rollup) if f.name == name)
    return f"{name} {_SQL_TYPES[str(spec.type)]}"


def rollup_columns_sql(version: int) -> list[str]:
    """The value columns a rollup table has at schema `version`, in table order."""
    return [rollup_column_sql(f.name) for f in fields(Rollup)
            if f.metadata.get("since", ROLLUP_TABLES_VERSION) <= version]


def put_rollups(conn: sqlite3.Connection, table: str, rows: Iterable[tuple[Any, ...]]) -> None:
    """Write whole rollup rows, in ROLLUP_FIELDS order (histograms as JSON; `Rollup.to_row`), over what a
    bucket held."""
    conn.executemany(f"INSERT OR REPLACE INTO {table} ({', '.join(ROLLUP_FIELDS)}) "
                     f"VALUES ({', '.join('?' * len(ROLLUP_FIELDS))})", rows)


def _one(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> dict[str, Any] | None:
    cur = conn.execute(sql, params)
    row = cur.fetchone()
    return None if row is None else dict(zip((c[0] for c in cur.description), row))


_VALUE_NAMES = (*COUNT_NAMES, *HIST_SIZES)


def fold_rollups(conn: sqlite3.Connection, rows: Iterable[LedgerRow]) -> None:
    """Add rows to the minute, hour and day rollups (inside the caller's transaction)."""
    rows = list(rows)
    for width, table in ROLLUP_TABLES.items():
        rolls: dict[tuple[int, str, str], Rollup] = {}
        for row in rows:
            key = (int(row.ts // width) * width, row.task, row.route)
            rolls.setdefault(key, Rollup()).add(row)
        for (bucket, task, route), roll in rolls.items():
            old = _one(conn, f"SELECT {', '.join(_VALUE_NAMES)} FROM {table}"
                             " WHERE bucket = ? AND task = ? AND route = ?", (bucket, task, route))
            if old is not None:
                roll.add_stored(old)
            put_rollups(conn, table, [roll.to_row(bucket, task, route)])

