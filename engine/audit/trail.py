"""The audit trail: every operator action that changes a node, from every entry point, with its outcome.

A record holds when (UTC), who (the local user; for an SSH session its source address, the key's
fingerprint where sshd exposes it, and for an agent request the remote dashboard's user@host), where
(node), from which entry point (cli, tui, agent, proxy), what (action, target, the parameters that
matter) and the outcome (done, refused with the reason, failed with the error). Any text is stored,
escaped where SQLite or UTF-8 could not take it (engine/audit/text.py): a value never stops a record.

Records are chained: each carries an HMAC-SHA256, under a node-local key, of its predecessor's MAC and
its own content; a checkpoint outside the store holds the last record's number and MAC
(engine/audit/anchor.py; written as an intent before the commit and confirmed after, so a writer
killed between the two is no false alarm; `reanchor()` is the operator's audited way to accept the head
when the checkpoint was lost or a store moved). So `verify` finds a changed, removed, forged or recomputed record, a deleted
tail and a store rolled back to an older copy. Records written before the key existed keep their plain
SHA-256 chain and are verified that way, counted as unkeyed. The store refuses UPDATE and DELETE on the
table (triggers) except retention pruning, which is itself a chained record (`audit.prune`).

Fail closed: entry points `configure()` the trail once (source, store, read-only, key, syslog); the
engine's mutating functions run inside `audited()`, which refuses them when read-only (recorded) or
when their record could not be written (a rehearsal of the write that is rolled back: store, key and
checkpoint all checked first). Library use without a configured trail records nothing.
"""

from __future__ import annotations

import contextvars
import getpass
import hashlib
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from engine.audit import chain
from engine.audit.anchor import Anchor, AnchorError
from engine.audit.syslog import send_syslog
from engine.audit.text import shown, stored
from engine.audit.verify import Verdict, check
from engine.audit.who import identity
from store.db import open_store

if TYPE_CHECKING:
    import sqlite3

    from store.db import Store

# Every action that changes a node, and the parameters each may record (nothing else is kept: no keys).
ACTIONS: dict[str, tuple[str, ...]] = {
    "server.start": ("profile", "model", "gpus", "port", "force", "server"),
    "server.stop": ("server",),
    "adapter.load": ("server", "adapter", "path"),
    "adapter.unload": ("server", "adapter"),
    "adapter.swap": ("server", "old", "adapter", "path"),
    "job.start": ("spec", "gpus", "force", "job", "dataset_sha256"),
    "job.cancel": ("job",),
    "job.resume": ("job",),
    "adapter.import": ("path", "version"),
    "adapter.eval": ("server", "eval", "eval_sha256", "accuracy"),
    "adapter.promote": ("config", "task", "old", "new", "eval", "servers"),
    "adapter.rollback": ("config", "task", "old", "new", "servers"),
    "router.threshold": ("config", "task", "old", "new"),
    "router.reload": ("config", "changed", "via"),
    "model.merge": ("adapter", "base", "out"),
    "model.quantize": ("model", "method", "out"),
    "audit.prune": ("cutoff", "retention_days", "removed", "first_kept"),
    "process.kill": ("node", "pid", "gpu", "user", "command"),
    "server.prune": ("servers",),
    "job.prune": ("jobs",),
    "node.install": ("bundle", "version", "previous", "agent", "result"),
    "audit.anchor": ("checkpoint", "head", "notes"),
}
OUTCOMES = ("done", "refused", "failed")
DEFAULT_RETENTION_DAYS = 6 * 365  # HIPAA keeps documentation six years
READ_ONLY_REASON = "fleetdeck is read-only (--read-only or read_only = true)"
AUDIT_SCHEMA = 7  # the store schema version that made the audit tables (store/schema.py)
AUDIT_TABLES = ("audit", "audit_prune")


class ReadOnlyError(Exception):
    """A change was refused before it touched anything; the message says why (read-only: how to lift it)."""


class AuditUnavailable(ReadOnlyError):
    """A change was refused because its audit record could not be written (fail closed)."""


@dataclass
class Trail:
    store_path: Path
    source: str  # cli | tui | agent | proxy | demo
    node: str
    read_only: bool = False
    syslog_socket: Path | None = None
    key_file: Path | None = None
    written: int = 0
    _store: Store | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def store(self) -> Any:
        with self._lock:
            if self._store is None:
                # Read-only: a refusal's record is its only write. It goes into the audit table of the schema the
                # store has (7 made it): no migration rides along with it.
                self._store = (open_store(self.store_path, migrate=False, oldest=AUDIT_SCHEMA, needs=AUDIT_TABLES)
                               if self.read_only else open_store(self.store_path))
            return self._store

    @property
    def anchor(self) -> Anchor:
        return Anchor.of(self.store_path, self.key_file)


_trail: Trail | None = None
# Who a request is on behalf of (the agent sets it per request, in the thread that handles it).
_on_behalf: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("fleetdeck_on_behalf", default=None)
# Records written in this context (the agent's request thread, a CLI command): lets a caller tell whether
# the engine already recorded an action before recording a refusal of its own.
_written_here: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("fleetdeck_audit_written", default=None)


def configure(store_path: Path, source: str, *, read_only: bool = False, node: str | None = None,
              syslog_socket: Path | None = None, key_file: Path | None = None) -> Trail:
    global _trail
    _trail = Trail(Path(store_path), source, node or socket.gethostname(), read_only, syslog_socket, key_file)
    return _trail


@contextmanager
def session(store_path: Path, source: str, **kw: Any) -> Iterator[Trail]:
    """The trail for one entry point's run; the previous one (usually none) comes back after it."""
    global _trail
    before = _trail
    trail = configure(store_path, source, **kw)
    try:
        yield trail
    finally:
        if trail._store is not None:
            trail._store.close()
        _trail = before


def current() -> Trail | None:
    return _trail


def is_read_only() -> bool:
    return bool(_trail and _trail.read_only)


def anchor_for(store_path: Path, key_file: Path | None = None) -> Anchor:
    """The key and checkpoint of a store: the configured trail's key file unless one is named."""
    trail = _trail
    return Anchor.of(store_path, key_file or (trail.key_file if trail is not None else None))


@contextmanager
def on_behalf_of(who: dict[str, str]) -> Iterator[None]:
    token = _on_behalf.set({k: v if isinstance(v, str) else str(v) for k, v in who.items() if v})
    try:
        yield
    finally:
        _on_behalf.reset(token)


@contextmanager
def counting() -> Iterator[list[int]]:
    """Count the records written in this context (one-element list); nested use starts its own count."""
    box = [0]
    token = _written_here.set(box)
    try:
        yield box
    finally:
        _written_here.reset(token)


@dataclass
class Entry:
    """What an action fills in while it runs (the target can become known only at the end)."""

    action: str
    target: str
    params: dict[str, Any]


def _clean(action: str, params: dict[str, Any]) -> dict[str, Any]:
    allowed = ACTIONS[action]
    return {k: (v if isinstance(v, (int, float, bool)) or v is None else stored(v))
            for k, v in params.items() if k in allowed}


def _opt(value: Any) -> str | None:
    return None if value is None else stored(value)


def _build(action: str, target: str, outcome: str, reason: str | None, source: str, node: str | None,
           params: dict[str, Any] | None, who: dict[str, Any] | None, ts: float | None) -> dict[str, Any]:
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}")
    who = {**identity(), **(who or {})}
    now = time.time() if ts is None else ts
    return {
        "ts": round(now, 6), "utc": datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "actor": _opt(who.get("actor")), "origin": _opt(who.get("origin")),
        "key_fingerprint": _opt(who.get("key_fingerprint")), "on_behalf_of": _opt(who.get("on_behalf_of")),
        "source": stored(source), "node": stored(node or socket.gethostname()),
        "action": action, "target": stored(target), "params": json.dumps(_clean(action, params or {}), sort_keys=True),
        "outcome": outcome, "reason": _opt(reason or None),
    }


def append(store: Store, action: str, target: str, outcome: str, reason: str | None = None, *, source: str = "cli",
           node: str | None = None, params: dict[str, Any] | None = None, who: dict[str, Any] | None = None,
           ts: float | None = None, anchor: Anchor | None = None, rehearse: bool = False,
           create_key: bool = True) -> dict[str, Any]:
    """Write one record, keyed, chained to the last one and anchored, in one transaction (concurrent
    writers serialise on the checkpoint's lock and SQLite's). Raises when it cannot be written."""
    rec = _build(action, target, outcome, reason, source, node, params, who, ts)
    return chain.write(store, anchor or anchor_for(store.path), lambda conn: rec, rehearse, create_key)


def _unrecorded(action: str, target: str, outcome: str, exc: BaseException) -> None:
    print(f"fleetdeck: audit record of {shown(action)} {shown(target)} ({outcome}) not written: {shown(exc)}",
          file=sys.stderr)


def record(action: str, target: str, outcome: str, reason: str | None = None, **params: Any) -> dict[str, Any] | None:
    """Record through the configured trail (nothing without one). A record that cannot be written is
    said loudly on stderr (and None returned): the callers that act check first with `check_writable()`."""
    trail = _trail
    if trail is None:
        return None
    behalf = _on_behalf.get() or {}
    try:
        rec = append(trail.store(), action, target, outcome, reason, source=behalf.get("source", trail.source),
                     node=trail.node, params=params, who=behalf, anchor=trail.anchor, create_key=not trail.read_only)
    except Exception as exc:  # the action has been refused (or, in a race, happened); its record has not
        _unrecorded(action, target, outcome, exc)
        return None
    trail.written += 1
    box = _written_here.get()
    if box is not None:
        box[0] += 1
    if trail.syslog_socket is not None:
        send_syslog(rec, trail.syslog_socket)
    return rec


def check_writable(action: str, target: str, **params: Any) -> None:
    """Fail closed: rehearse writing this action's record (store, lock, key, checkpoint; rolled back) and
    refuse the action, raising AuditUnavailable, if it cannot be written. Nothing without a trail."""
    trail = _trail
    if trail is None:
        return
    behalf = _on_behalf.get() or {}
    try:
        append(trail.store(), action, target, "done", None, source=behalf.get("source", trail.source), node=trail.node,
               params=params, who=behalf, anchor=trail.anchor, rehearse=True)
    except Exception as exc:
        reason = f"its audit record cannot be written ({type(exc).__name__}: {exc})"
        record(action, target, "refused", reason, **params)  # most likely fails too, and says so
        raise AuditUnavailable(f"{action} {target}: refused, {reason}") from exc


def refuse_if_read_only(action: str, target: str, **params: Any) -> None:
    """For a change handed to another node (its agent audits what it does): refused here when read-only."""
    if is_read_only():
        record(action, target, "refused", READ_ONLY_REASON, **params)
        raise ReadOnlyError(f"{action} {target}: refused, {READ_ONLY_REASON}")


def begin(action: str, target: str, **params: Any) -> Entry:
    """Before a change: refused (recorded) when read-only, refused when its record could not be written."""
    refuse_if_read_only(action, target, **params)
    check_writable(action, target, **params)
    return Entry(action, target, dict(params))


def finish(entry: Entry, outcome: str, reason: str | None = None) -> dict[str, Any] | None:
    return record(entry.action, entry.target, outcome, reason, **entry.params)


@contextmanager
def audited(action: str, target: str, refusals: tuple[type[BaseException], ...] = (), **params: Any) -> Iterator[Entry]:
    """Run a change: refused up front when read-only or when its record could not be written; recorded
    with its outcome when it ends."""
    entry = begin(action, target, **params)
    try:
        yield entry
    except refusals as exc:
        finish(entry, "refused", str(exc))
        raise
    except BaseException as exc:
        finish(entry, "failed", f"{type(exc).__name__}: {exc}")
        raise
    finish(entry, "done")


# -- reading, verifying, retention --------------------------------------------------------------------
def query(store: Store, since: float | None = None, node: str | None = None, action: str | None = None,
          limit: int = 10_000) -> list[dict[str, Any]]:
    sql, args = "SELECT * FROM audit WHERE 1=1", list[object]()
    if since is not None:
        sql += " AND ts >= ?"
        args.append(since)
    if node:
        sql += " AND node = ?"
        args.append(node)
    if action:
        sql += " AND (action = ? OR action LIKE ? ESCAPE '\\')"
        args += [action, action.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + ".%"]
    sql += " ORDER BY seq DESC LIMIT ?"
    args.append(limit)
    return store.query(sql, args)


def prune(store: Store, retention_days: float = DEFAULT_RETENTION_DAYS, now: float | None = None,
          anchor: Anchor | None = None) -> int:
    """Remove the records older than the retention, as one transaction with the `audit.prune` record
    that says so (cut-off, retention, how many, the first record kept); nothing without that record."""
    at = time.time() if now is None else now
    cutoff = at - retention_days * 86400
    if not store.execute("SELECT 1 FROM audit WHERE ts < ? LIMIT 1", (cutoff,)):
        return 0  # nothing to prune: touch nothing (no key is made by listing)
    trail = _trail
    removed = [0]

    def make(conn: sqlite3.Connection) -> dict[str, Any]:
        kept = conn.execute("SELECT MIN(seq) FROM audit WHERE ts >= ?", (cutoff,)).fetchone()[0]
        where, args = ("seq < ?", (kept,)) if kept is not None else ("1=1", ())
        if not conn.execute(f"SELECT 1 FROM audit WHERE {where} LIMIT 1", args).fetchone():
            raise _NothingToPrune
        conn.execute("INSERT INTO audit_prune (cutoff, at) VALUES (?, ?)", (cutoff, at))  # lets the trigger pass
        removed[0] = conn.execute(f"DELETE FROM audit WHERE {where}", args).rowcount
        params = {"cutoff": cutoff, "retention_days": retention_days, "removed": removed[0], "first_kept": kept}
        return _build("audit.prune", "audit", "done", None, trail.source if trail else "cli",
                      trail.node if trail else None, params, None, at)

    try:
        chain.write(store, anchor or anchor_for(store.path), make)
    except _NothingToPrune:
        return 0
    return removed[0]


class _NothingToPrune(Exception):
    pass


def reanchor(store: Store, why: str, anchor: Anchor | None = None) -> dict[str, Any]:
    """`fleetdeck audit anchor`: accept the store's last record as the checkpoint's, after a cause the
    operator knows (a store moved, a checkpoint lost with its disk or corrupted): an `audit.anchor`
    record, keyed and chained like any other, says who, why, what the checkpoint held (or why it could
    not be read), the head it found and the notes it clears. Verify then goes by the new checkpoint and
    names the last re-anchoring. Only a writer with the key and the checkpoint's folder can do it: a
    record made with another key is reported by verify. Refused (recorded) when read-only."""
    anchor = anchor or anchor_for(store.path)
    trail = _trail
    behalf = _on_behalf.get() or {}
    source = behalf.get("source", trail.source if trail else "cli")
    if is_read_only():
        record("audit.anchor", "audit", "refused", READ_ONLY_REASON)
        raise ReadOnlyError(f"audit.anchor audit: refused, {READ_ONLY_REASON}")

    def make(conn: sqlite3.Connection) -> dict[str, Any]:
        head = chain.head_of(conn)
        try:
            cp = chain.anchored(conn, anchor, anchor.key(create=False, writing=True))
            held = "none" if cp is None else f"record {cp.seq}"
            notes = "; ".join(cp.notes) if cp is not None else ""
        except AnchorError as exc:
            held, notes = f"unreadable: {exc}", ""
        params = {"checkpoint": held, "head": head[0] if head else None, "notes": notes}
        return _build("audit.anchor", "audit", "done", why, source, trail.node if trail else None, params, behalf,
                      None)

    rec = chain.write(store, anchor, make, fresh=True)
    if trail is not None:
        trail.written += 1
        if trail.syslog_socket is not None:
            send_syslog(rec, trail.syslog_socket)
    return rec


def verify(store: Store, anchor: Anchor | None = None, retention_days: float | None = None,
           now: float | None = None) -> Verdict:
    """Check the chain, its keyed MACs, pruning against the retention, and the head against the checkpoint.
    The first problem found is named, with its record."""
    return check(store, anchor or anchor_for(store.path),
                 DEFAULT_RETENTION_DAYS if retention_days is None else retention_days,
                 time.time() if now is None else now)


