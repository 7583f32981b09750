"""`fleetdeck audit`: who changed what on this node, and whether the record is intact."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from fleetdeck.tables import print_table


AUDIT_SCHEMA = 7  # the store schema version that made the audit tables (store/schema.py)
AUDIT_TABLES = ("audit", "audit_prune")


def register(sub: Any) -> None:
    p = sub.add_parser("audit", parents=[sub.common], help="the audit trail of operator actions; `audit verify` checks it",
                       description="Operator actions recorded on this node (newest first). `fleetdeck audit verify` "
                                   "checks the hash chain and names the first record that was changed or removed.")
    p.add_argument("what", nargs="?", choices=("verify", "anchor"),
                   help="verify the chain instead of listing; or `anchor --reason WHY`: accept the last record as "
                        "the checkpoint's after a known cause (a store moved, a checkpoint lost), itself recorded")
    p.add_argument("--reason", metavar="WHY", help="why `audit anchor` is needed (recorded)")
    p.add_argument("--since", type=since, metavar="WHEN", help="7d, 12h, 30m, or a date/time (2026-11-01, 2026-11-01T08:00)")
    p.add_argument("--node", help="only this node's records")
    p.add_argument("--action", help="one action (server.start) or a family (server)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--key", metavar="FILE", help="verify with this audit key (default: [audit] key_file, or the "
                                                  "XDG state folder's fleetdeck/audit/audit.key)")
    p.add_argument("--checkpoint", metavar="FILE", help="verify against this checkpoint (a copy of the store "
                                                        "verified elsewhere: the checkpoint of the original)")
    p.set_defaults(handler=run)


def since(text: str) -> float:
    units = {"d": 86400, "h": 3600, "m": 60}
    if text[-1:] in units and text[:-1].isdigit():
        return time.time() - int(text[:-1]) * units[text[-1]]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 7d, 12h, 30m or a date such as 2026-11-01, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from engine.audit import trail as audit
    from engine.audit.anchor import AnchorError, Anchor
    from engine.audit.text import shown
    from fleet.config import load_fleet_config
    from fleetdeck.cmdutil import store_of, store_path_of

    from store.db import StoreDamaged, open_store

    store_path = store_path_of(args)
    # A listing of a store this user cannot write (read-only media, a copy handed over): read, not pruned.
    unwritable = args.what is None and store_path.exists() and not (
        os.access(store_path, os.W_OK) and os.access(store_path.parent, os.W_OK | os.X_OK))
    if unwritable and not audit.is_read_only():
        print(f"fleetdeck: records past the retention not pruned: {shown(store_path)} is not writable here",
              file=sys.stderr)
    if args.what == "verify" or (args.what is None and (audit.is_read_only() or unwritable)):
        # Only reading: the store is opened so that nothing of it changes (a copy kept as evidence verifies
        # unchanged, one on read-only media verifies at all). The audit table is there since schema 7.
        try:
            store = open_store(store_path, read_only=True, oldest=AUDIT_SCHEMA, needs=AUDIT_TABLES)
        except StoreDamaged as exc:
            if args.what != "verify":
                raise
            # The trail's own table dropped or rebuilt without a column: that is what verify is for.
            return _verdict(args, False, 0, None, 0, str(exc))
    else:
        store = store_of(args, create=False)  # reading the trail never creates one (that would verify as intact)
    settings = load_fleet_config(args.config).audit
    anchor = Anchor.of(store_path, Path(args.key) if args.key else settings.key_file,
                       Path(args.checkpoint) if args.checkpoint else None)
    if args.what == "anchor":
        return _anchor(store, anchor, args.reason)
    if not audit.is_read_only() and not unwritable and args.what != "verify":
        try:  # only past the retention, and as a record of its own; if that cannot be written, nothing goes
            audit.prune(store, settings.retention_days, anchor=anchor)
        except (AnchorError, OSError, sqlite3.Error) as exc:
            print(f"fleetdeck: records past the retention not pruned: {shown(exc)}", file=sys.stderr)
    if args.what == "verify":
        verdict = audit.verify(store, anchor, settings.retention_days)
        return _verdict(args, verdict.ok, verdict.records, verdict.first_broken, verdict.unkeyed, verdict.message)
    rows = audit.query(store, since=args.since, node=args.node, action=args.action)
    if args.json:  # JSON escapes every control character itself
        for r in rows:
            r["params"] = _params(r["params"])
        # A value of a type fleetdeck never writes (a BLOB planted with sqlite3) is shown as its repr;
        # `audit verify` names the record.
        print(json.dumps(rows, indent=2, default=repr))
        return 0
    if not rows:
        print("no audit records" + (" match" if args.since or args.node or args.action else " yet"), file=sys.stderr)
        return 0
    table = []
    for r in rows:
        r = {k: (v if isinstance(v, str) or v is None else str(v)) for k, v in r.items()}  # planted types, as text
        who = (r["actor"] or "?") + (f"@{r['origin']}" if r["origin"] not in (None, "local") else "")
        if r["on_behalf_of"]:
            who += f" for {r['on_behalf_of']}"
        # Each cell escaped: an operator value with ESC sequences or a newline neither colours the
        # auditor's terminal nor forges a line.
        table.append([shown(c) for c in (f"{(r['utc'] or '?')[:19]}Z", r["node"], r["source"], who, r["action"],
                                         r["target"], (r["outcome"] or "?") + (f": {r['reason']}" if r["reason"] else ""))])
    print_table(["when (UTC)", "node", "from", "who", "action", "target", "outcome"], table)
    return 0


def _verdict(args: argparse.Namespace, ok: bool, records: int, first_broken: int | None, unkeyed: int,
             message: str) -> int:
    from engine.audit.text import shown

    if args.json:
        print(json.dumps({"ok": ok, "records": records, "first_broken": first_broken, "unkeyed": unkeyed,
                          "message": message}))
    else:
        print(("intact: " if ok else "BROKEN: ") + shown(message))
    return 0 if ok else 1


def _anchor(store: Any, anchor: Any, reason: str | None) -> int:
    from engine.audit import trail as audit
    from engine.audit.anchor import AnchorError
    from engine.audit.text import shown

    if not reason or not reason.strip():
        print("fleetdeck: audit anchor needs --reason WHY (it is recorded with who ran it)", file=sys.stderr)
        return 2
    try:
        rec = audit.reanchor(store, reason, anchor)
    except (AnchorError, OSError, sqlite3.Error) as exc:
        print(f"fleetdeck: not re-anchored: {shown(exc)}", file=sys.stderr)
        return 2
    params = json.loads(rec["params"])
    print(f"re-anchored at record {rec['seq']} (the checkpoint held {shown(params['checkpoint'])}; the store's "
          f"last record was {params['head']})")
    return 0


def _params(text: Any) -> Any:
    """A record's parameters as JSON; text that is not JSON (changed outside fleetdeck) as it is."""
    try:
        return json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return text
