"""Opening the one SQLite file every feature writes to.

WAL mode (readers never block the proxy's writer), a busy timeout, file mode 0600 (the ledger is
operational data on regulated hosts), an application id that tells our file from someone else's,
and forward migrations recorded in ``schema_version``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
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
        self._held: tuple[int, int] | None = None  # this file's key in `_held` while the connection is open
        self.read_only = False  # opened with open_store(read_only=True): nothing of the file is changed

    def execute(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
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
                if not self.read_only:  # a checkpoint writes the database file
                    self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # another process holds it open; its close checkpoints
            self.conn.close()
            key, self._held = self._held, None
            if key is not None:
                _release(key)


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


SQLITE_MAGIC = b"SQLite format 3\x00"
SQLITE_CORRUPT, SQLITE_NOTADB = 11, 26  # primary result codes; extended codes keep them in the low byte

# Files this process holds open through SQLite, by (device, inode), with how many Stores hold each.
# Closing *any* descriptor of a file drops every POSIX lock this process has on it, SQLite's included;
# so a file held here is never opened with plain open() again (SQLite itself shares one descriptor).
_held: dict[tuple[int, int], int] = {}
_held_lock = threading.Lock()


def is_corrupt(exc: BaseException) -> bool:
    """SQLite found a damaged page (or a header that is no database's) while reading or writing."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and code is not None and code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB)


def corrupt_message(path: str | os.PathLike[str], exc: BaseException) -> str:
    """One line: which file, what SQLite said, what to do."""
    p = Path(path).expanduser()
    return (f"the store {p} is damaged (SQLite: {exc}). Restore it from a backup, "
            f"or recover what is readable: sqlite3 {p} .recover | sqlite3 {p}.recovered, then use --store {p}.recovered")


class StoreCorrupt(StoreError):
    """The store's file is damaged; the message says how to restore or recover it."""

    def __init__(self, path: str | os.PathLike[str], exc: BaseException) -> None:
        super().__init__(corrupt_message(path, exc))


def _release(key: tuple[int, int]) -> None:
    with _held_lock:
        if _held.get(key, 0) <= 1:
            _held.pop(key, None)
        else:
            _held[key] -= 1


def _claim(p: Path, hint: str) -> tuple[int, int]:
    """Count ``p`` as held by this process (before SQLite opens it, so that from then on no thread here
    reads it with plain open()) after checking, if no Store here holds it yet, its header: empty, or
    SQLite's magic with fleetdeck's application id. Raises StoreError, claiming nothing, for a file that is
    not an SQLite database or is another program's; SQLite never opens such a file."""
    with _held_lock:  # the check, the read and the claim together: no thread opens it through SQLite meanwhile
        try:
            st = p.stat()
        except OSError as exc:
            raise StoreError(f"Cannot read the store {p}: {exc.strerror or exc}. {hint}") from exc
        key = (st.st_dev, st.st_ino)
        if key not in _held and st.st_size > 0:
            try:
                with open(p, "rb") as f:
                    header = f.read(100)
            except OSError as exc:
                raise StoreError(f"Cannot read the store {p}: {exc.strerror or exc}. {hint}") from exc
            if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
                raise StoreError(f"{p} is not a fleetdeck store (not an SQLite database); fleetdeck leaves it untouched. {hint}")
            if int.from_bytes(header[68:72], "big") != APPLICATION_ID:  # set in the file before it goes WAL
                raise StoreError(f"{p} is an SQLite database of another program, not a fleetdeck store; "
                                 f"fleetdeck leaves it untouched. {hint}")
        _held[key] = _held.get(key, 0) + 1
        return key


def _check_ours(conn: sqlite3.Connection, p: Path, hint: str) -> None:
    """Raises StoreError unless the file carries fleetdeck's application_id."""
    if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
        raise StoreError(f"{p} is an SQLite database of another program, not a fleetdeck store; "
                         f"fleetdeck leaves it untouched. {hint}")


def _identify(p: Path, hint: str) -> int:
    """The schema version of an existing store, read through a read-only connection (which changes nothing
    in the file: not its bytes, its mode or its journal mode). Raises StoreCorrupt for a damaged one."""
    # The same read-only connection `open_store(read_only=True)` uses: a plain `mode=ro` one would leave a
    # -wal and -shm beside a store it then refuses (root's, after root ran fleetdeck on a user's store).
    ro = _connect_read_only(p, hint)
    try:
        _check_ours(ro, p, hint)
        return _schema_version(ro)
    except sqlite3.DatabaseError as exc:
        if is_corrupt(exc):
            raise StoreCorrupt(p, exc) from exc
        raise StoreError(f"Cannot open the store {p}: {exc}. {hint}") from exc
    finally:
        ro.close()


def open_store(path: str | os.PathLike[str], *, read_only: bool = False, oldest: int | None = None,
               needs: tuple[str, ...] | None = None, migrate: bool = True) -> Store:
    """Open (creating and migrating if needed) the store at ``path``. Raises StoreError.

    An existing file is identified first (`_claim`, `_identify`): nothing about a file this fleetdeck
    cannot use as its store (its mode, journal mode, schema) is changed before it is refused.

    `read_only`: for commands that only read (`audit verify`, `report`, a `--read-only` listing): the file
    must exist and is changed in nothing (no mode, journal mode, migration or WAL checkpoint), so a copy kept
    as evidence verifies unchanged, and one on read-only media can be read at all. A schema older than this
    fleetdeck's is refused then (it is migrated by the first command that writes) unless `oldest` admits it,
    and `needs` names the only tables the reader needs whole (`audit verify`: the audit's; default: all). A
    table or column of its schema missing is StoreDamaged.

    `migrate=False`: written, but not migrated (a read-only run's refusal records go into the audit table of the
    schema the store has): a store older than `oldest` is StoreOlder, its shape is checked for its own version
    (`needs`). A store that does not exist yet is still made, at this schema."""
    p = Path(path).expanduser()
    hint = "Use --store PATH or FLEETDECK_STORE to pick another file."
    if p.exists() and p.is_dir():
        raise StoreError(f"Store path {p} is a directory, not a file. {hint}")
    if read_only:
        return _open_read_only(p, hint, SCHEMA_VERSION if oldest is None else oldest, needs)
    try:
        if not p.exists():
            _create_private(p)
    except FileExistsError:
        pass  # another fleetdeck made it between our look and our create: it is identified below like any file
    except OSError as exc:
        raise StoreError(f"Cannot create the store at {p}: {exc.strerror or exc}. {hint}") from exc
    if not os.access(p, os.R_OK | os.W_OK) or not os.access(p.parent, os.W_OK | os.X_OK):
        raise StoreError(f"The store {p} (or its folder) is not writable by this user. {hint}")
    key = _claim(p, hint)
    try:
        store = _open_claimed(p, hint, None if migrate else (SCHEMA_VERSION if oldest is None else oldest, needs))
    except BaseException:
        _release(key)
        raise
    store._held = key
    return store


def _open_read_only(p: Path, hint: str, oldest: int, needs: tuple[str, ...] | None) -> Store:
    if not p.exists():
        raise StoreError(f"no store at {p} (check --store or FLEETDECK_STORE; commands that start work create it)")
    key = _claim(p, hint)
    try:
        if p.stat().st_size == 0:
            raise StoreError(f"{p} is an empty file, not a fleetdeck store yet (a command that writes makes it one). {hint}")
        conn = _connect_read_only(p, hint)
        try:
            _check_ours(conn, p, hint)
            version = _schema_version(conn)
            _refuse_newer(p, version)
            if version < oldest:
                raise StoreOlder(_older(p, version))
            _check_shape(conn, p, version, needs)
        except BaseException as exc:
            _close_and_name(conn, p, exc, "read", hint)
            raise
    except BaseException:
        _release(key)
        raise
    store = Store(p, conn)
    store.read_only = True
    store._held = key
    return store


def _connect_read_only(p: Path, hint: str) -> sqlite3.Connection:
    """A connection that cannot change the file. A store some process has open (its -wal is there) is read
    through its WAL, `mode=ro`, which sees every commit; one no process has open is read `immutable`: then
    SQLite makes no -wal or -shm beside it (a read-only `mode=ro` open would, and leave them: owned by root
    after root verified a user's store, they lock that user out of it) and it reads on read-only media."""
    wal = Path(f"{p}-wal").exists()
    # A rollback journal beside it: a process writes it in another journal mode (a copy, an older tool);
    # `mode=ro` then takes SQLite's locks (and makes no -wal or -shm for a store not in WAL mode).
    in_use = wal or Path(f"{p}-journal").exists()
    uri = f"{p.resolve().as_uri()}?mode=ro" + ("" if in_use else "&immutable=1")
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False,
                               isolation_level=None)
        conn.execute("PRAGMA query_only = ON")
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # opens the file now: errors surface here
    except sqlite3.DatabaseError as exc:
        if is_corrupt(exc):
            raise StoreCorrupt(p, exc) from exc
        raise StoreError(f"Cannot read the store {p}: {exc}"
                         + (" (its -wal file is there but cannot be read with it: copy the store with its -wal and "
                            "-shm files, or open it where it can be written)" if wal else "") + f". {hint}") from exc
    return conn


# What each schema version's tables hold, made once per process from the migrations themselves (in memory).
_shapes: dict[int, dict[str, set[str]]] = {}
_shapes_lock = threading.Lock()


def _shape_of(version: int) -> dict[str, set[str]]:
    with _shapes_lock:
        if version not in _shapes:
            mem = sqlite3.connect(":memory:", isolation_level=None)
            try:
                db = sqlite_utils.Database(mem)
                for v in range(1, version + 1):
                    MIGRATIONS[v](db)
                _shapes[version] = _tables(mem)
            finally:
                mem.close()
        return _shapes[version]


def _tables(conn: sqlite3.Connection) -> dict[str, set[str]]:
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                        "AND name NOT LIKE 'sqlite_%'").fetchall()]
    return {n: {r[1] for r in conn.execute("SELECT * FROM pragma_table_info(?)", (n,)).fetchall()} for n in names}


def _older(p: Path, version: int) -> str:
    return (f"{p} has schema {version}, older than this fleetdeck's {SCHEMA_VERSION}: a command that only reads, and "
            "any read-only run, does not migrate it. Run one that writes on it first, without --read-only (or read it "
            "with the fleetdeck that wrote it).")


class StoreOlder(StoreError):
    """A read-only open met a store of an older schema than the caller reads (it is migrated by a writer)."""


class StoreDamaged(StoreError):
    """A table or column the store's schema version has is missing (`table` names it)."""

    def __init__(self, message: str, table: str) -> None:
        super().__init__(message)
        self.table = table


def _check_shape(conn: sqlite3.Connection, p: Path, version: int, needs: tuple[str, ...] | None = None) -> None:
    """Every table and column the store's schema version has is there. A store changed outside fleetdeck (a
    table dropped, a column dropped with sqlite3) is refused with one line naming what is missing, rather
    than failing each command that meets it with SQLite's "no such table" (the proxy held its rows for ever)."""
    if version <= 0:
        return
    have = _tables(conn)
    for table, columns in _shape_of(version).items():
        if needs is not None and table not in needs:
            continue
        if table not in have:
            raise StoreDamaged(f"the store {p} has no table {table}, which its schema (version {version}) has: it "
                               "was changed outside fleetdeck. Restore it from a backup, or point --store at another "
                               "file.", table)
        missing = sorted(columns - have[table])
        if missing:
            raise StoreDamaged(f"the store {p} has no column {', '.join(missing)} in its table {table}, which its "
                               f"schema (version {version}) has: it was changed outside fleetdeck. Restore it from a "
                               "backup, or point --store at another file.", table)


def _refuse_newer(p: Path, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise StoreError(f"{p} was written by a newer fleetdeck (schema {version}; this one knows up to "
                         f"{SCHEMA_VERSION}). Upgrade fleetdeck, or point --store at another file.")


def _open_claimed(p: Path, hint: str, unmigrated: tuple[int, tuple[str, ...] | None] | None = None) -> Store:
    # An empty file is ours to make a store of (we just created it, or a crash came before its first write).
    version = _identify(p, hint) if p.stat().st_size > 0 else 0
    _refuse_newer(p, version)
    if unmigrated is not None and 0 < version < unmigrated[0]:
        raise StoreOlder(_older(p, version))  # before anything of the file changes
    make_private(p)  # ours: a store made by an older fleetdeck, or copied in, at 0644
    try:
        conn = sqlite3.connect(p, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"Cannot open the store {p}: {exc}. {hint}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if version == 0:
            # Mark it first, so that a file with SQLite's header and no mark is always another program's.
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        _wal(conn)
        for side in ("-wal", "-shm"):
            make_private(Path(f"{p}{side}"))
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        version = _schema_version(conn)  # again: another process may have migrated it since
        _refuse_newer(p, version)
        store = Store(p, conn)
        if unmigrated is not None and version > 0:  # kept at its own schema (a new, empty one is made whole)
            oldest, needs = unmigrated
            if version < oldest:
                raise StoreOlder(_older(p, version))
            _check_shape(conn, p, version, needs)
            return store
        _migrate(store, version)
        _check_shape(conn, p, SCHEMA_VERSION)
    except BaseException as exc:
        _close_and_name(conn, p, exc, "open", hint)
        raise
    return store


def _close_and_name(conn: sqlite3.Connection, p: Path, exc: BaseException, verb: str, hint: str) -> None:
    """A store that failed to open: its connection closed, and SQLite's error raised as the store's (damaged,
    or unreadable, naming the file); any other exception is left to the caller's `raise`."""
    conn.close()
    if isinstance(exc, sqlite3.DatabaseError):
        if is_corrupt(exc):
            raise StoreCorrupt(p, exc) from exc
        raise StoreError(f"Cannot {verb} the store {p}: {exc}. {hint}") from exc


def _wal(conn: sqlite3.Connection) -> None:
    """Put the store in WAL mode. Two fleetdecks opening one new store at once (a dashboard and its proxy on a
    fresh install) can meet here: SQLite answers the mode change with "database is locked" at once, without
    waiting on busy_timeout, when it would deadlock the other opener; so it is retried within that bound."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


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
                    # Read again under the write lock: another process that opened the same new store at the
                    # same moment may have applied this step while we waited for the lock.
                    if _schema_version(conn) >= version:
                        continue
                    MIGRATIONS[version](store.db)
                    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            except sqlite3.DatabaseError as exc:
                if is_corrupt(exc):
                    raise StoreCorrupt(store.path, exc) from exc
                raise StoreError(f"Migrating {store.path} to schema {version} failed: {exc}") from exc
