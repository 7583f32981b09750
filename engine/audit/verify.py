"""`audit verify`: walk the chain and say where it first breaks, and what is wrong there.

Checked, in order: each record follows the one before it; a keyed record's HMAC under this node's key
(a record written before the key existed: its SHA-256, and it is counted as unkeyed); no unkeyed record
after a keyed one, nor one dated after the key was made; records missing before the first one are
accounted for by the last `audit.prune` record (or, in a store pruned before keys, by audit_prune), and
no prune cut records younger than the retention; the last record is the one the checkpoint holds, and
no writer found otherwise before its append (the checkpoint's notes). A writer's intent stands for the
checkpoint when the store holds the record it names with that MAC (the writer was killed between its
commit and confirming); otherwise it is ignored (killed before its commit). The key, checkpoint and
intent are read only when they are fleetdeck's own (engine/audit/anchor.py). Reading holds the
checkpoint's lock shared, so a concurrent append is seen whole or not at all, and creates nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from engine.audit.anchor import Anchor, AnchorError, Checkpoint, Key
from engine.audit.chain import GENESIS, KEYED, keyed_hash, plain_hash

if TYPE_CHECKING:
    from store.db import Store

@dataclass
class Verdict:
    ok: bool
    records: int
    first_broken: int | None = None
    message: str = ""
    unkeyed: int = 0


SLACK_S = 1.0  # float rounding of a cut-off computed from the same clock reading


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


class _Broken(Exception):
    def __init__(self, seq: int | None, message: str) -> None:
        super().__init__(message)
        self.seq = seq


def check(store: Store, anchor: Anchor, retention_days: float, now: float) -> Verdict:
    try:
        key = anchor.key(create=False)
    except AnchorError as exc:
        return Verdict(False, 0, None, f"cannot check the records' MACs: {exc}")
    try:
        with anchor.locked(write=False):
            rows = store.query("SELECT * FROM audit ORDER BY seq")
            legacy_prunes = store.query("SELECT cutoff, at FROM audit_prune ORDER BY rowid")
            try:
                cp = anchor.checkpoint(key)
                pending = anchor.pending(key)
            except AnchorError as exc:
                return Verdict(False, len(rows), rows[-1]["seq"] if rows else None, str(exc))
    except AnchorError as exc:  # the lock: a writer stopped while holding it
        return Verdict(False, 0, None, f"cannot verify: {exc}")
    unkeyed = 0
    notes = []
    if pending is not None:
        held = next((r for r in reversed(rows) if r["seq"] == pending.seq), None)
        if held is not None and held["hash"] == pending.mac:
            cp = pending  # its writer committed it, then died before confirming: the intent is the checkpoint
            notes.append(f"record {pending.seq} anchored by its writer's intent (it stopped before confirming)")
        else:
            notes.append(f"a writer stopped while appending record {pending.seq}, which the store does not hold: "
                         "it was never committed, or it was removed since")
    try:
        unkeyed, last_prune = _walk(rows, key, anchor)
        _check_start(rows, last_prune, legacy_prunes, retention_days, now)
        _check_head(rows, cp, anchor)
    except _Broken as exc:
        return Verdict(False, len(rows), exc.seq, str(exc), unkeyed)
    if unkeyed:
        notes.append(f"{unkeyed} unkeyed (written before the audit key existed; checked by SHA-256 only)")
    if rows and rows[0]["prev_hash"] != _genesis():
        if last_prune is not None:
            cutoff = json.loads(last_prune["params"])["cutoff"]
            notes.append(f"records before {_day(cutoff)} pruned by retention (record {last_prune['seq']})")
        else:
            notes.append(f"records before {_day(max(p['cutoff'] for p in legacy_prunes))} pruned by retention")
    anchored = next((r for r in reversed(rows) if r["action"] == "audit.anchor" and r["outcome"] == "done"), None)
    if anchored is not None:  # an operator accepted the head; what it held then stays in the record
        p = json.loads(anchored["params"])
        notes.append(f"re-anchored at record {anchored['seq']} by {anchored['actor']} ({anchored['reason']}); the "
                     f"checkpoint then held {p.get('checkpoint')}, the store's last record was {p.get('head')}"
                     + (f", notes cleared: {p['notes']}" if p.get("notes") else ""))
    if cp is not None:
        notes.append(f"last record {cp.seq} anchored")
    return Verdict(True, len(rows), None, f"{len(rows)} record(s), chain intact" +
                   (f" ({'; '.join(notes)})" if notes else ""), unkeyed)


def _genesis() -> str:
    return GENESIS


def _walk(rows: list[dict[str, Any]], key: Key | None, anchor: Anchor) -> tuple[int, dict[str, Any] | None]:
    prev: str | None = None
    keyed_seen = 0
    unkeyed = 0
    last_prune = None
    for i, rec in enumerate(rows):
        seq = rec["seq"]
        _check_types(rec)
        if prev is not None and rec["prev_hash"] != prev:
            raise _Broken(seq, f"record {seq} does not follow record {rows[i - 1]['seq']}: a record between them "
                               "was removed, or one of them was changed")
        prev = rec["prev_hash"]
        mac = str(rec["hash"])
        if mac.startswith(KEYED + ":"):
            if key is None:
                raise _Broken(seq, f"record {seq} is keyed but the audit key {anchor.key_file} is missing: "
                                   "nothing can be checked without it")
            kid = mac.split(":")[1] if mac.count(":") >= 2 else "?"
            if kid != key.kid:
                later = next((r["seq"] for r in rows[i + 1:] if str(r["hash"]).startswith(f"{KEYED}:{key.kid}:")), None)
                if later is not None:  # the key changed under the trail: say where, and the likely why
                    raise _Broken(seq, f"record {seq} was written with another key (id {kid}), and from record "
                                       f"{later} on with {anchor.key_file} (key {key.kid}): the store was carried "
                                       "here without its key (verify with --key and --checkpoint of the original), "
                                       "or the key was replaced")
                raise _Broken(seq, f"record {seq} was written with another key (id {kid}; {anchor.key_file} "
                                   f"is key {key.kid}): the key was replaced, or the record forged")
            if keyed_hash(key, prev, rec) != mac:
                raise _Broken(seq, f"record {seq} was changed after it was written (its MAC does not match)")
            keyed_seen += 1
        else:
            if keyed_seen:
                raise _Broken(seq, f"record {seq} has no MAC but follows keyed records: forged, or rewritten "
                                   "without the key")
            if plain_hash(prev, rec) != mac:
                raise _Broken(seq, f"record {seq} was changed after it was written (its hash does not match)")
            if key is not None and rec["ts"] > key.created:
                raise _Broken(seq, f"record {seq} has no MAC but is dated {_day(rec['ts'])}, after the audit key was "
                                   f"made ({_day(key.created)}): written or rewritten without the key")
            unkeyed += 1
        if rec["action"] == "audit.prune":
            last_prune = rec
        prev = mac
    return unkeyed, last_prune


_TEXT = ("utc", "source", "node", "action", "target", "params", "outcome", "prev_hash", "hash")
_OPTIONAL_TEXT = ("actor", "origin", "key_fingerprint", "on_behalf_of", "reason")


def _check_types(rec: dict[str, Any]) -> None:
    """A value of a type fleetdeck never writes (sqlite3 takes a BLOB, a NULL or text anywhere once the
    table is rebuilt without its constraints) is named as such, before any check that would trip on it."""
    seq = rec.get("seq")
    wrong = [c for c in ("seq",) if not isinstance(rec.get(c), int) or isinstance(rec.get(c), bool)]
    wrong += [c for c in ("ts",) if not isinstance(rec.get(c), (int, float)) or isinstance(rec.get(c), bool)]
    wrong += [c for c in _TEXT if not isinstance(rec.get(c), str)]
    wrong += [c for c in _OPTIONAL_TEXT if rec.get(c) is not None and not isinstance(rec.get(c), str)]
    if wrong:
        shown_seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
        raise _Broken(shown_seq, f"record {shown_seq if shown_seq is not None else '?'} holds a value fleetdeck "
                                 f"never writes in {', '.join(wrong)} (a {type(rec.get(wrong[0])).__name__}): "
                                 "changed outside fleetdeck")


def _check_start(rows: list[dict[str, Any]], last_prune: dict[str, Any] | None, legacy: list[dict[str, Any]],
                 retention_days: float, now: float) -> None:
    """Records missing before the first one were pruned, by the retention and no further."""
    keep_s = retention_days * 86400
    for p in legacy:  # every cut-off ever written, by fleetdeck or by hand
        if p["cutoff"] > p["at"] - keep_s + SLACK_S or p["at"] > now + 86400:
            first = rows[0]["seq"] if rows else None
            raise _Broken(first, f"record {first} follows records cut by a prune dated {_day(p['at'])} that cut "
                                 f"records younger than the retention ({retention_days:g} days): its cut-off is "
                                 f"{_day(p['cutoff'])}")
    if last_prune is not None:
        params = json.loads(last_prune["params"])
        cutoff = float(params.get("cutoff", 0))
        if cutoff > last_prune["ts"] - keep_s + SLACK_S:
            raise _Broken(last_prune["seq"], f"record {last_prune['seq']} pruned records younger than the retention "
                                             f"({retention_days:g} days): its cut-off is {_day(cutoff)}")
    if not rows or rows[0]["prev_hash"] == _genesis():
        return
    first = rows[0]
    if last_prune is not None:
        kept = json.loads(last_prune["params"]).get("first_kept")
        expected = last_prune["seq"] if kept is None else kept
        if first["seq"] != expected:
            raise _Broken(first["seq"], f"record {first['seq']} follows records that are gone: the last prune "
                                        f"(record {last_prune['seq']}) kept every record from {expected} on")
        return
    if str(first["hash"]).count(":") >= 2 or not legacy:
        raise _Broken(first["seq"], f"record {first['seq']} follows records that are gone, and no prune record "
                                    "accounts for them")
    if first["ts"] < max(p["cutoff"] for p in legacy) - SLACK_S:
        raise _Broken(first["seq"], f"record {first['seq']} follows records that are gone, and is older than "
                                    "the prune's cut-off")


def _check_head(rows: list[dict[str, Any]], cp: Checkpoint | None, anchor: Anchor) -> None:
    """The last record is the one the checkpoint holds, and no writer found otherwise."""
    keyed = [r for r in rows if str(r["hash"]).startswith(KEYED + ":")]
    if cp is None:
        if keyed:
            last = rows[-1]["seq"]
            raise _Broken(last, f"the checkpoint {anchor.checkpoint_file} is missing: nothing shows record {last} "
                                "is the last one written (a deleted tail or a rolled-back store would not show)")
        return
    for note in cp.notes:
        seq, _, what = note.partition("|")
        raise _Broken(int(seq) if seq.isdigit() else None, f"record {seq}: {what} (found by a later writer; "
                                                           "the checkpoint keeps it)")
    by_seq = {r["seq"]: r for r in rows}
    head = rows[-1]["seq"] if rows else 0
    if cp.seq > head:
        raise _Broken(head + 1, f"record {head + 1} is missing, and every record after it up to {cp.seq} (the "
                                "checkpoint holds record {0}): the store was rolled back or its tail deleted"
                      .format(cp.seq))
    if cp.seq not in by_seq or by_seq[cp.seq]["hash"] != cp.mac:
        raise _Broken(cp.seq, f"record {cp.seq} is not the one the checkpoint holds: the store was rolled back "
                              "and written again, or rewritten")
    if cp.seq < head:
        raise _Broken(cp.seq + 1, f"record {cp.seq + 1} (and any after it up to {head}) was appended without "
                                  "updating the checkpoint: forged with the key, or by a writer that died "
                                  "before anchoring it")
