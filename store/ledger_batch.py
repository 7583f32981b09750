"""Writing a batch of ledger rows: the raw rows and their rollups in one transaction, and a row the store
cannot take as given made safe (`sanitize`) so it never takes its batch with it."""

from __future__ import annotations

import sqlite3
from dataclasses import astuple, replace
from typing import Any

from store.db import Store
from store.ledger_journal import COLUMNS
from store.ledger_row import LedgerRow
from store.rollup import fold_rollups

_INSERT = f"INSERT OR REPLACE INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def write_rows(store: Store, rows: list[LedgerRow]) -> None:
    with store.transaction() as conn:
        conn.executemany(_INSERT, [astuple(r) for r in rows])
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
    changes = {f: _safe(getattr(row, f)) for f in COLUMNS}
    return replace(row, **{**changes, "sanitized": True})


def store_wide(exc: BaseException) -> bool:
    """A failure of the store itself (full, locked, I/O), not of one row's values."""
    return isinstance(exc, sqlite3.OperationalError) or isinstance(exc, OSError)
