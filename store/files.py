"""Files people name (configs, datasets, eval sets): opened only when they are regular files.

A path an operator types can be a pipe (`/dev/stdin`, a FIFO left in a folder), a device (`/dev/zero`), or a
folder. Reading a pipe blocks until something writes it (the CLI or a dashboard worker hangs for ever), and a
device may never end (the read takes the host's memory). So the file is opened without blocking, and checked
as the open file itself, not by its path first: the path cannot be swapped between the check and the read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO


class NotAFileError(OSError):
    """The path is not a regular file that can be read; the message is one line naming it."""


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading in binary, or NotAFileError saying why not (missing, a folder, a pipe...)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise NotAFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe, socket or device)"
        raise NotAFileError(f"cannot read {path}: it is {kind}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: Path, limit: int | None = None) -> bytes:
    """The whole of a regular file; with `limit`, NotAFileError when it holds more bytes than that."""
    with open_regular(path) as fh:
        data = fh.read() if limit is None else fh.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise NotAFileError(f"cannot read {path}: over {limit // (1024 * 1024) or limit} "
                            f"{'MiB' if limit >= 1024 * 1024 else 'bytes'}, more than such a file holds")
    return data
