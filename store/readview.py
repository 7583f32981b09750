"""The store as a long-lived read-only run sees it: the read-only dashboard and a read-only node agent.

`open_store(read_only=True)` changes nothing of the file, but reads it as it was when opened: with no process
holding the store open (no `-wal` beside it) it is opened `immutable`, so that no `-wal`/`-shm` is made, and
SQLite then never looks at the file again. That suits a command that reads once (`audit verify`, a listing);
a dashboard left open for hours would go on showing the hour it started, and a page rewritten under it (a
proxy's checkpoint) could read as damaged. A `ReadView` notices when the file changes (its inode, size or
mtime, a `-wal` or `-journal` appearing or going) and opens it again the same read-only way before its next
query. While a `-wal` is there, it reads through it (`mode=ro`), which SQLite keeps current itself.

A store that does not exist yet is an empty view of this fleetdeck's schema, in memory (`absent`): every
screen and listing reads "nothing recorded" from it, and nothing is created on disk; once a run that
writes makes the file, the view reads it. An older schema or a foreign file is refused, as any read-only
open refuses it (StoreError): a read-only run migrates nothing.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import sqlite_utils

from store.db import APPLICATION_ID, Store, StoreError, open_store
from store.schema import MIGRATIONS, SCHEMA_VERSION


@dataclass(frozen=True)
class _Seen:
    """What a ReadView knew of the file when it (re)opened it."""

    inode: int | None  # None: no file there
    size: int
    mtime_ns: int
    wal: bool
    journal: bool


def _seen(p: Path) -> _Seen:
    try:
        st = p.stat()
    except OSError:
        return _Seen(None, 0, 0, False, False)
    return _Seen(st.st_ino, st.st_size, st.st_mtime_ns, Path(f"{p}-wal").exists(), Path(f"{p}-journal").exists())


def _empty(path: Path) -> Store:
    """This fleetdeck's schema, empty, in memory, refusing writes: what a store not made yet holds."""
    conn = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
    db = sqlite_utils.Database(conn)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT DEFAULT CURRENT_TIMESTAMP)")
    for version in range(1, SCHEMA_VERSION + 1):
        MIGRATIONS[version](db)
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
    conn.execute("PRAGMA query_only = ON")
    store = Store(path, conn)
    store.read_only = True
    return store


class ReadView(Store):
    """A read-only store that follows its file (see the module's text). Reads go through `execute` and
    `query`, which look at the file first; a write is refused by SQLite (the connection is query-only)."""

    def __init__(self, path: Path, inner: Store | None, seen: _Seen) -> None:
        self._inner = inner if inner is not None else _empty(path)
        super().__init__(path, self._inner.conn)
        self.read_only = True
        self.absent = inner is None  # no store on disk yet: an empty view
        self._seen = seen

    @property
    def through_wal(self) -> bool:
        """Read through the -wal of a process that has the store open (SQLite keeps such a reader current)."""
        return not self.absent and (self._seen.wal or self._seen.journal)

    def _follow(self) -> None:
        now = _seen(self.path)
        if now == self._seen:
            return
        before, self._seen = self._seen, now
        if self.through_wal and now.wal and now.inode == before.inode:
            return  # the file's own changes: SQLite reads them through the WAL
        if now.inode is None:
            return  # moved or deleted: what was read stays shown, until a store is there again
        try:
            fresh = open_store(self.path, read_only=True)
        except StoreError:
            # Being made (empty, no schema yet), or replaced by something that is not a store: the view keeps what
            # it had and tries again at the file's next change.
            return
        old, self._inner = self._inner, fresh
        self.conn, self.db, self.absent = fresh.conn, fresh.db, False
        old.close()

    def execute(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            self._follow()
            return super().execute(sql, params)

    def query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        with self.lock:
            self._follow()
            return super().query(sql, params)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        raise StoreError(f"the store {self.path} is open read-only here: nothing is written to it")
        yield self.conn  # pragma: no cover (a generator, for contextmanager)

    def close(self) -> None:
        with self.lock:
            self._inner.close()


def open_read_view(path: str | os.PathLike[str]) -> ReadView:
    """The store at `path` for a long-lived read-only run: nothing of it is created, migrated or changed. Raises
    StoreError for a file that cannot be read as this fleetdeck's store (older schema, newer, damaged, foreign)."""
    p = Path(path).expanduser()
    seen = _seen(p)  # before the open: a change made while it opens is seen at the first query
    if seen.inode is None:
        return ReadView(p, None, seen)
    return ReadView(p, open_store(p, read_only=True), seen)
