"""Opening the one SQLite file every feature writes to.

WAL mode (readers never block the proxy's writer), a busy timeout, file mode 0600 (the ledger is
operational data on regulated hosts), an application id that tells our file from someone else's,
and forward migrations recorded in ``schema_version``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import sqlite_utils

from store.paths import make_private
from store.schema import MIGRATIONS, SCHEMA_VERSION

APPLICATION_ID = 0x464C4454  # "FLDT"
BUSY_TIMEOUT_MS = 5000


class StoreError(Exception):
    """The store cannot be used; the message names the file, the problem and what to do."""


class Store:
    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn
        self.db = sqlite_utils.Database(conn)
        # One connection shared by worker threads; sqlite3 itself is not safe for concurrent use.
        self.lock = threading.RLock()

    def execute(self, sql: str, params: Any = ()) -> list[tuple]:
        with self.lock:
            return self.conn.execute(sql, params).fetchall()

    def query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        with self.lock:
            cur = self.conn.execute(sql, params)
            cols = [c[0] for c in cur.description or []]
            return [dict(zip(cols, row)) for row in cur.fetchall()]

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; the connection is in autocommit mode otherwise."""
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                # SQLite has already rolled back on some errors (SQLITE_FULL among them); a second
                # ROLLBACK would raise and hide the error that matters.
                if self.conn.in_transaction:
                    try:
                        self.conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise

    def insert(self, table: str, row: dict[str, Any], *, replace: bool = False) -> int | None:
        """One row by column name, in a write transaction of its own; lists and dicts are stored as JSON
        text. Its rowid. sqlite-utils writes it; the ledger's batches go
        through executemany instead (store/ledger.py), where per-row table introspection would cost."""
        with self.transaction():
            t = self.db.table(table)
            t.insert(row, replace=replace)
            return t.last_rowid

    def schema_version(self) -> int:
        return _schema_version(self.conn)

    def close(self) -> None:
        """Checkpoint the WAL into the database file (a closed store is one file), then close."""
        with self.lock:
            try:
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # another process holds it open; its close checkpoints
            self.conn.close()


def _schema_version(conn: sqlite3.Connection) -> int:
    try:
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    except sqlite3.OperationalError:
        return 0
    return int(row[0] or 0)


def _create_private(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)


def open_store(path: str | os.PathLike[str]) -> Store:
    """Open (creating and migrating if needed) the store at ``path``. Raises StoreError."""
    p = Path(path).expanduser()
    hint = "Use --store PATH or FLEETDECK_STORE to pick another file."
    if p.exists() and p.is_dir():
        raise StoreError(f"Store path {p} is a directory, not a file. {hint}")
    try:
        if not p.exists():
            _create_private(p)
        else:
            make_private(p)  # a store made by an older fleetdeck, or copied in, at 0644
    except OSError as exc:
        raise StoreError(f"Cannot create the store at {p}: {exc.strerror or exc}. {hint}") from exc
    if not os.access(p, os.R_OK | os.W_OK) or not os.access(p.parent, os.W_OK | os.X_OK):
        raise StoreError(f"The store {p} (or its folder) is not writable by this user. {hint}")
    try:
        conn = sqlite3.connect(
            p, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False, isolation_level=None
        )
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if p.stat().st_size == 0:
            # An empty file is ours to make a store of: mark it first, so that a file with SQLite's header
            # and no mark is always another program's.
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{p} is not a fleetdeck store (SQLite says: {exc}). {hint}") from exc
    if app_id != APPLICATION_ID:
        conn.close()
        raise StoreError(
            f"{p} is an SQLite database of another program, not a fleetdeck store; "
            f"fleetdeck leaves it untouched. {hint}"
        )
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        for side in ("-wal", "-shm"):
            make_private(Path(f"{p}{side}"))
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.OperationalError as exc:
        conn.close()
        raise StoreError(f"Cannot open the store {p}: {exc}. {hint}") from exc

    version = _schema_version(conn)
    if version > SCHEMA_VERSION:
        conn.close()
        raise StoreError(
            f"{p} was written by a newer fleetdeck (schema {version}; this one knows up to "
            f"{SCHEMA_VERSION}). Upgrade fleetdeck, or point --store at another file."
        )
    store = Store(p, conn)
    _migrate(store, version)
    return store


def _migrate(store: Store, current: int) -> None:
    conn = store.conn
    with store.lock:
        if current == 0:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, applied_at TEXT DEFAULT CURRENT_TIMESTAMP)"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            try:
                with store.transaction():
                    MIGRATIONS[version](store.db)
                    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            except sqlite3.OperationalError as exc:
                raise StoreError(f"Migrating {store.path} to schema {version} failed: {exc}") from exc
