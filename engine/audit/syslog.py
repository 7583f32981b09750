"""The audit trail's copy in the site's system log (RFC 5424), sent as each record is written."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from engine.audit.text import shown


def syslog_line(rec: dict[str, Any]) -> bytes:
    """<PRI>1 TIMESTAMP HOST APP PROCID MSGID [SD] MSG; facility authpriv (10), severity notice (5), or
    warning (4) for a refusal or failure. The record's MAC is in it, so the site's log anchors the chain
    too; control characters are escaped, so a value cannot end the line and forge another."""
    severity = 5 if rec["outcome"] == "done" else 4
    pri = 10 * 8 + severity

    def sd(value: Any) -> str:
        return shown("-" if value is None else value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")

    keys = ("actor", "origin", "source", "node", "target", "outcome", "seq", "hash")
    params = " ".join(f'{"mac" if k == "hash" else k}="{sd(rec.get(k))}"' for k in keys)
    msg = shown(f"{rec['action']} {rec['target']} {rec['outcome']}" + (f": {rec['reason']}" if rec.get("reason") else ""))
    head = f"<{pri}>1 {rec['utc']} {socket.gethostname()} fleetdeck {os.getpid()} {rec['action']}"
    return f"{head} [fleetdeck@32473 {params}] {msg}".encode("utf-8", "backslashreplace")


def send_syslog(rec: dict[str, Any], path: Path) -> None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(str(path))
            s.send(syslog_line(rec))
    except OSError:
        pass  # the record is in the store; a missing syslog daemon does not stop the action
