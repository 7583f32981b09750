"""How one record joins the chain: its canonical form, its link to the one before it (an HMAC-SHA256
under the node's key; before the key existed, a plain SHA-256), and the append itself: keyed, chained
and anchored in one transaction under the checkpoint's lock (engine/audit/anchor.py), or rehearsed and
rolled back. The trail (trail.py) builds the records; verify.py walks the chain this writes.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Callable

from engine.audit.anchor import Anchor, AnchorError, Checkpoint, Key

if TYPE_CHECKING:
    import sqlite3

    from store.db import Store

GENESIS = "0" * 64
KEYED = "hmac1"  # a keyed record's `hash` is "hmac1:<key id>:<HMAC-SHA256 hex>"; an older one is 64 hex


def canonical(rec: dict[str, Any]) -> bytes:
    body = {k: v for k, v in rec.items() if k not in ("seq", "hash")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def plain_hash(prev: str, rec: dict[str, Any]) -> str:
    """An unkeyed record's hash (before the key existed): SHA-256 of its predecessor's and its content."""
    return hashlib.sha256(prev.encode() + canonical(rec)).hexdigest()


def keyed_hash(key: Key, prev: str, rec: dict[str, Any]) -> str:
    return f"{KEYED}:{key.kid}:" + key.mac(b"fleetdeck-audit-1\0" + prev.encode() + b"\0" + canonical(rec))


class _Rehearsal(Exception):
    """Raised inside a rehearsed write so its transaction rolls back."""


def head_of(conn: sqlite3.Connection) -> tuple[int, str] | None:
    row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    return (int(row[0]), str(row[1])) if row else None


def _notes_for(head: tuple[int, str] | None, cp: Checkpoint | None, anchor: Anchor) -> tuple[str, ...]:
    """What this writer finds wrong with the head before appending, as "SEQ|what" (SEQ: the first record
    in question); kept in the checkpoint from now on, so `verify` keeps saying it."""
    notes = cp.notes if cp is not None else ()
    if cp is None:
        if head is not None and head[1].startswith(KEYED + ":"):
            notes += (f"{head[0]}|the checkpoint was missing (deleted?) when record {head[0]} was the last one",)
    elif head is None:
        notes += (f"{cp.seq}|the store had no record where the checkpoint held record {cp.seq}",)
    elif head[0] < cp.seq:
        notes += (f"{head[0] + 1}|records {head[0] + 1} to {cp.seq} were gone (rolled back or deleted) "
                  f"before the next record was written",)
    elif head[0] > cp.seq:
        notes += (f"{cp.seq + 1}|records {cp.seq + 1} to {head[0]} were written without the checkpoint "
                  f"(forged with the key, or by a writer that died before anchoring them)",)
    elif head[1] != cp.mac:
        notes += (f"{head[0]}|record {head[0]} was not the one the checkpoint held (replaced)",)
    return notes[:20]  # the first problems found are the ones that matter; the rest follow from them


def write(store: Store, anchor: Anchor, make: Callable[[sqlite3.Connection], dict[str, Any]],
           rehearse: bool = False, create_key: bool = True, fresh: bool = False) -> dict[str, Any]:
    """Append the record `make` builds (it may first change the store in the same transaction), keyed,
    chained and anchored, under the checkpoint's lock; or, rehearsing, do all of it and roll it back.
    Two-phase (engine/audit/anchor.py): the next checkpoint is written durably as the intent before the
    commit (a full or read-only folder refuses the record), and confirmed after it; an intent a writer
    killed after its commit left is taken as the checkpoint, one killed before it is dropped.

    A read-only run (`create_key` False) makes nothing on the node but the record itself: with no key
    yet, its refusal is written the way records were before keys (SHA-256, no checkpoint), which verify
    accepts before the first keyed record and counts as unkeyed.

    `fresh` (`reanchor()`): the checkpoint is not read, and the next one carries no notes."""
    if not create_key and anchor.key(create=False, writing=True) is None:
        try:
            with store.transaction() as conn:
                rec = make(conn)
                head = head_of(conn)
                if head is not None and head[1].startswith(KEYED + ":"):
                    raise _KeyedMeanwhile  # another writer made the key since: write keyed, below
                rec["prev_hash"] = head[1] if head else GENESIS
                rec["hash"] = plain_hash(rec["prev_hash"], rec)
                rec["seq"] = _insert(conn, rec)
                if rehearse:
                    raise _Rehearsal
            return rec
        except _Rehearsal:
            return rec
        except _KeyedMeanwhile:
            for k in ("prev_hash", "hash", "seq"):
                rec.pop(k, None)
            if anchor.key(create=False, writing=True) is None:
                raise AnchorError(f"the audit key {anchor.key_file} is missing, and the trail is keyed") from None
    with anchor.locked(write=True):
        key = anchor.key(create=True)
        assert key is not None
        intended = False
        try:
            with store.transaction() as conn:
                rec = make(conn)
                head = head_of(conn)
                notes = () if fresh else _notes_for(head, anchored(conn, anchor, key), anchor)
                rec["prev_hash"] = head[1] if head else GENESIS
                rec["hash"] = keyed_hash(key, rec["prev_hash"], rec)
                rec["seq"] = _insert(conn, rec)
                nxt = Checkpoint(rec["seq"], rec["hash"], notes)
                if rehearse:  # the folder takes a checkpoint; the intent and the record are not kept
                    anchor.prepare(nxt, key).unlink(missing_ok=True)
                    raise _Rehearsal
                anchor.intend(nxt, key)
                intended = True
        except _Rehearsal:
            return rec
        except BaseException:
            if intended:  # the commit failed: the intent names a record the store does not hold
                try:
                    anchor.withdraw()
                except OSError:
                    pass  # an intent that matches no record is ignored anyway
            raise
        try:
            anchor.confirm()
        except OSError as exc:  # the intent stays, and matches the record: verify takes it as the checkpoint
            raise AnchorError(f"record {rec['seq']} was written but its checkpoint could not be updated: {exc}") from exc
    return rec


def anchored(conn: sqlite3.Connection, anchor: Anchor, key: Key | None) -> Checkpoint | None:
    """The checkpoint as the last writer left it: its intent when the store holds the record it names
    with that MAC (the writer died after its commit, before confirming), else the checkpoint itself."""
    cp = anchor.checkpoint(key, writing=True)
    pending = anchor.pending(key, writing=True)
    if pending is not None:
        row = conn.execute("SELECT hash FROM audit WHERE seq = ?", (pending.seq,)).fetchone()
        if row is not None and row[0] == pending.mac:
            return pending
    return cp


class _KeyedMeanwhile(Exception):
    pass


def _insert(conn: sqlite3.Connection, rec: dict[str, Any]) -> int:
    cols = [c for c in rec if c != "seq"]
    cur = conn.execute(f"INSERT INTO audit ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                       [rec[c] for c in cols])
    return int(cur.lastrowid or 0)
