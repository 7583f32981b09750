"""Reading the end of a log file, for servers, jobs and the agent alike (a log can be large, or gone)."""

from __future__ import annotations

from pathlib import Path


def tail(path: str | Path, lines: int = 40, max_bytes: int = 64 * 1024) -> str:
    """The last `lines` lines of the file's last `max_bytes`; a file that cannot be read says so instead."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(data.splitlines()[-lines:])
