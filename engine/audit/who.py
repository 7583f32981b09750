"""Who an action is recorded as: the local user, an SSH session's source address, and the key's fingerprint
where sshd exposes it."""

from __future__ import annotations

import base64
import getpass
import hashlib
import os
from pathlib import Path


def _key_fingerprint() -> str | None:
    """The SSH key's SHA256 fingerprint, when sshd exposes the session's auth (ExposeAuthInfo yes)."""
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
