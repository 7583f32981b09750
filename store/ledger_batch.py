"""Writing a batch of ledger rows: the raw rows and their rollups in one transaction, and a row the store
cannot take as given made safe (`sanitize`) so it never takes its batch with it."""

from __future__ import annotations

import sqlite3
from dataclasses import astuple, fields, replace
from typing import Any

from store.db import Store
from store.ledger_journal import COLUMNS
from store.ledger_row import LedgerRow, unstorable, unstorable_number
from store.rollup import fold_rollups

_INSERT = f"INSERT OR REPLACE INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def write_rows(store: Store, rows: list[LedgerRow]) -> None:
    with store.transaction() as conn:
        conn.executemany(_INSERT, [astuple(r) for r in rows])
        fold_rollups(conn, rows)


def _safe(name: str, value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if unstorable_number(name, value) is not None:  # NaN, an infinity, past 64 bits: unknown, not a number
        return None
    return value


# The fields a row cannot be without (no default, or a non-optional number): a value there that cannot be
# stored is not made safe (no value would be true); the row is then unstorable (`UnstorableRow`).
_REQUIRED = frozenset(f.name for f in fields(LedgerRow) if not str(f.type).endswith("| None"))


class UnstorableRow(ValueError):
    """A row that cannot be stored even with its fields made safe (a required number that is not one)."""


def sanitize(row: LedgerRow) -> LedgerRow:
    """The row with every field SQLite can store, and the flag that says it was changed. Raises UnstorableRow
    when a field the row cannot be without holds a value that cannot be stored."""
    changes = {f: _safe(f, getattr(row, f)) for f in COLUMNS}
    bad = [f for f in _REQUIRED if changes[f] is None and getattr(row, f) is not None]
    if bad:
        raise UnstorableRow(f"{', '.join(sorted(bad))}: {unstorable(row) or 'not storable'}")
    return replace(row, **{**changes, "sanitized": True})


def store_wide(exc: BaseException) -> bool:
    """A failure of the store itself (full, locked, I/O), not of one row's values."""
    return isinstance(exc, sqlite3.OperationalError) or isinstance(exc, OSError)
