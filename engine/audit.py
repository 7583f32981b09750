"""The audit trail: every operator action that changes a node, from every entry point, with its outcome.

A record holds when (UTC), who (the local user; for an SSH session its source address, the key's
fingerprint where sshd exposes it, and for an agent request the remote dashboard's user@host), where
(node), from which entry point (cli, tui, agent), what (action, target, the parameters that matter) and
the outcome (done, refused with the reason, failed with the error). Records are chained: each carries
the SHA-256 of its predecessor's hash and its own content, so `verify` finds a changed or deleted
record; the store refuses UPDATE and DELETE on the table (triggers), except retention pruning of records
past the cut-off it first records. Secrets are never parameters: each action lists what it records.

Entry points `configure()` the trail once (source, store, read-only, syslog); the engine's mutating
functions run inside `audited()`, which refuses them when read-only (and records the refusal). Library
use without a configured trail records nothing.
"""

from __future__ import annotations

import contextvars
import getpass
import hashlib
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from store.db import Store

# Every action that changes a node, and the parameters each may record (nothing else is kept: no keys).
ACTIONS: dict[str, tuple[str, ...]] = {
    "server.start": ("profile", "model", "gpus", "port", "force", "server"),
    "server.stop": ("server",),
    "adapter.load": ("server", "adapter", "path"),
    "adapter.unload": ("server", "adapter"),
    "adapter.swap": ("server", "old", "adapter", "path"),
    "job.start": ("spec", "gpus", "force", "job"),
    "job.cancel": ("job",),
    "job.resume": ("job",),
    "adapter.import": ("path", "version"),
    "adapter.eval": ("server", "eval", "eval_sha256", "accuracy"),
    "adapter.promote": ("config", "task", "old", "new", "eval", "servers"),
    "adapter.rollback": ("config", "task", "old", "new", "servers"),
    "router.threshold": ("config", "task", "old", "new"),
    "model.merge": ("adapter", "base", "out"),
    "model.quantize": ("model", "method", "out"),
    "node.install": ("bundle", "version", "previous", "agent", "result"),
}
OUTCOMES = ("done", "refused", "failed")
DEFAULT_RETENTION_DAYS = 6 * 365  # HIPAA keeps documentation six years
GENESIS = "0" * 64


class ReadOnlyError(Exception):
    """A change was asked of a read-only fleetdeck; the message says so and how to lift it."""


@dataclass
class Trail:
    store_path: Path
    source: str  # cli | tui | agent
    node: str
    read_only: bool = False
    syslog_socket: Path | None = None
    written: int = 0
    _store: Store = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def store(self) -> Any:
        with self._lock:
            if self._store is None:
                from store.db import open_store

                self._store = open_store(self.store_path)
            return self._store


_trail: Trail | None = None
# Who a request is on behalf of (the agent sets it per request, in the thread that handles it).
_on_behalf: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("fleetdeck_on_behalf", default=None)


def configure(store_path: Path, source: str, *, read_only: bool = False, node: str | None = None,
              syslog_socket: Path | None = None) -> Trail:
    global _trail
    _trail = Trail(Path(store_path), source, node or socket.gethostname(), read_only, syslog_socket)
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


@contextmanager
def on_behalf_of(who: dict[str, str]) -> Iterator[None]:
    token = _on_behalf.set({k: str(v)[:200] for k, v in who.items() if v})
    try:
        yield
    finally:
        _on_behalf.reset(token)


def _key_fingerprint() -> str | None:
    """The SSH key's SHA256 fingerprint, when sshd exposes the session's auth (ExposeAuthInfo yes)."""
    import base64

    path = os.environ.get("SSH_USER_AUTH")
    if not path:
        return None
    try:
        for line in Path(path).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "publickey":
                digest = hashlib.sha256(base64.b64decode(parts[2])).digest()
                return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
    except (OSError, ValueError):
        return None
    return None


def identity() -> dict[str, str | None]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    ssh = os.environ.get("SSH_CONNECTION", "").split()
    return {"actor": user, "origin": f"{ssh[0]}:{ssh[1]}" if len(ssh) >= 2 else "local",
            "key_fingerprint": _key_fingerprint()}


@dataclass
class Entry:
    """What an action fills in while it runs (the target can become known only at the end)."""

    action: str
    target: str
    params: dict[str, Any]


def _clean(action: str, params: dict[str, Any]) -> dict[str, Any]:
    allowed = ACTIONS[action]
    return {k: (v if isinstance(v, (int, float, bool)) or v is None else str(v)) for k, v in params.items() if k in allowed}


def _canonical(rec: dict[str, Any]) -> bytes:
    body = {k: v for k, v in rec.items() if k not in ("seq", "hash")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _chain(prev: str, rec: dict[str, Any]) -> str:
    return hashlib.sha256(prev.encode() + _canonical(rec)).hexdigest()


def append(store: Store, action: str, target: str, outcome: str, reason: str | None = None, *, source: str = "cli",
           node: str | None = None, params: dict[str, Any] | None = None, who: dict[str, Any] | None = None,
           ts: float | None = None) -> dict[str, Any]:
    """Write one record, chained to the last one, in one transaction (concurrent writers serialise)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}")
    who = {**identity(), **(who or {})}
    now = time.time() if ts is None else ts
    rec: dict[str, Any] = {
        "ts": round(now, 6), "utc": datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "actor": who.get("actor"), "origin": who.get("origin"), "key_fingerprint": who.get("key_fingerprint"),
        "on_behalf_of": who.get("on_behalf_of"), "source": source, "node": node or socket.gethostname(),
        "action": action, "target": target, "params": json.dumps(_clean(action, params or {}), sort_keys=True),
        "outcome": outcome, "reason": (reason or None) and str(reason)[:1000],
    }
    with store.transaction() as conn:
        row = conn.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        rec["prev_hash"] = row[0] if row else GENESIS
        rec["hash"] = _chain(rec["prev_hash"], rec)
        cols = list(rec)
        cur = conn.execute(f"INSERT INTO audit ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                           [rec[c] for c in cols])
        rec["seq"] = cur.lastrowid
    return rec


def record(action: str, target: str, outcome: str, reason: str | None = None, **params: Any) -> dict[str, Any] | None:
    """Record through the configured trail (nothing without one)."""
    trail = _trail
    if trail is None:
        return None
    behalf = _on_behalf.get() or {}
    try:
        rec = append(trail.store(), action, target, outcome, reason, source=behalf.get("source", trail.source),
                     node=trail.node, params=params, who=behalf)
    except Exception as exc:  # the action has happened (or been refused); say loudly that its record has not
        import sys

        print(f"fleetdeck: audit record of {action} {target} ({outcome}) not written: {exc}", file=sys.stderr)
        return None
    trail.written += 1
    if trail.syslog_socket is not None:
        send_syslog(rec, trail.syslog_socket)
    return rec


def refuse_if_read_only(action: str, target: str, **params: Any) -> None:
    """For a change handed to another node (its agent audits what it does): refused here when read-only."""
    if is_read_only():
        reason = "fleetdeck is read-only (--read-only or read_only = true)"
        record(action, target, "refused", reason, **params)
        raise ReadOnlyError(f"{action} {target}: refused, {reason}")


@contextmanager
def audited(action: str, target: str, refusals: tuple[type[BaseException], ...] = (), **params: Any) -> Iterator[Entry]:
    """Run a change: refused up front when read-only; recorded with its outcome when it ends."""
    entry = Entry(action, target, dict(params))
    if is_read_only():
        reason = "fleetdeck is read-only (--read-only or read_only = true)"
        record(action, target, "refused", reason, **entry.params)
        raise ReadOnlyError(f"{action} {target}: refused, {reason}")
    try:
        yield entry
    except refusals as exc:
        record(action, entry.target, "refused", str(exc), **entry.params)
        raise
    except BaseException as exc:
        record(action, entry.target, "failed", f"{type(exc).__name__}: {exc}", **entry.params)
        raise
    record(action, entry.target, "done", None, **entry.params)


# -- reading, verifying, retention --------------------------------------------------------------------
def query(store: Store, since: float | None = None, node: str | None = None, action: str | None = None,
          limit: int = 10_000) -> list[dict[str, Any]]:
    sql, args = "SELECT * FROM audit WHERE 1=1", []
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


@dataclass
class Verdict:
    ok: bool
    records: int
    first_broken: int | None = None
    message: str = ""


def verify(store: Store) -> Verdict:
    rows = store.query("SELECT * FROM audit ORDER BY seq")
    pruned = store.execute("SELECT MAX(cutoff) FROM audit_prune")[0][0]
    prev = None
    for i, row in enumerate(rows):
        rec = dict(row)
        if i == 0:
            # Records before the first one were pruned by retention (or there were none).
            if rec["prev_hash"] != GENESIS and pruned is None:
                return Verdict(False, len(rows), rec["seq"], f"record {rec['seq']} follows a record that is gone")
            prev = rec["prev_hash"]
        if rec["prev_hash"] != prev:
            return Verdict(False, len(rows), rec["seq"],
                           f"record {rec['seq']} does not follow record {rows[i - 1]['seq']}: one was changed or removed")
        if _chain(prev, rec) != rec["hash"]:
            return Verdict(False, len(rows), rec["seq"], f"record {rec['seq']} was changed after it was written")
        prev = rec["hash"]
    note = f" (records before {datetime.fromtimestamp(pruned, timezone.utc):%Y-%m-%d} pruned by retention)" if pruned else ""
    return Verdict(True, len(rows), None, f"{len(rows)} record(s), chain intact{note}")


def prune(store: Store, retention_days: float = DEFAULT_RETENTION_DAYS, now: float | None = None) -> int:
    cutoff = (time.time() if now is None else now) - retention_days * 86400
    with store.transaction() as conn:
        if not conn.execute("SELECT 1 FROM audit WHERE ts < ? LIMIT 1", (cutoff,)).fetchone():
            return 0
        conn.execute("INSERT INTO audit_prune (cutoff, at) VALUES (?, ?)", (cutoff, time.time()))
        return conn.execute("DELETE FROM audit WHERE ts < ?", (cutoff,)).rowcount


# -- the system log (RFC 5424) ----------------------------------------------------------------------
def syslog_line(rec: dict[str, Any]) -> bytes:
    """<PRI>1 TIMESTAMP HOST APP PROCID MSGID [SD] MSG; facility authpriv (10), severity notice (5), or
    warning (4) for a refusal or failure."""
    severity = 5 if rec["outcome"] == "done" else 4
    pri = 10 * 8 + severity

    def sd(value: Any) -> str:
        return str(value if value is not None else "-").replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")

    params = " ".join(f'{k}="{sd(rec.get(k))}"' for k in ("actor", "origin", "source", "node", "target", "outcome", "seq"))
    msg = f"{rec['action']} {rec['target']} {rec['outcome']}" + (f": {rec['reason']}" if rec.get("reason") else "")
    head = f"<{pri}>1 {rec['utc']} {socket.gethostname()} fleetdeck {os.getpid()} {rec['action']}"
    return f"{head} [fleetdeck@32473 {params}] {msg}".encode("utf-8", "replace")


def send_syslog(rec: dict[str, Any], path: Path) -> None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(str(path))
            s.send(syslog_line(rec))
    except OSError:
        pass  # the record is in the store; a missing syslog daemon does not stop the action
