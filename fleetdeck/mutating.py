"""CLI commands that change a node: read-only refuses them before they touch anything, so does an audit
trail that cannot take their record, and a command that gives up before the engine acted (no such
server, an incompatible adapter) still leaves a record."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, TextIO

Handler = Callable[[argparse.Namespace], int]


def mutating(action: str, target: Callable[[argparse.Namespace], str],
             when: Callable[[argparse.Namespace], bool] = lambda a: True) -> Callable[[Handler], Handler]:
    def wrap(fn: Handler) -> Handler:
        # The spec rides on the handler itself (a plain function has no such attribute to declare);
        # run() below reads it back with getattr.
        fn.audit = (action, target, when)  # type: ignore[attr-defined]
        return fn

    return wrap


class _Tee:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.lines: list[str] = []

    def write(self, text: str) -> int:
        self.lines += [line for line in text.splitlines() if line.strip()]
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.out, name)


def run(handler: Handler, args: argparse.Namespace) -> int:
    from engine.audit import trail as audit

    spec = getattr(handler, "audit", None)
    if spec is None or not spec[2](args):
        return handler(args)
    action, target_of, _ = spec
    target = str(target_of(args))
    audit.refuse_if_read_only(action, target)
    # Fail closed: a command whose record could not be written does nothing (AuditUnavailable, exit 2).
    audit.check_writable(action, target)
    tee = _Tee(sys.stderr)
    sys.stderr = tee
    try:
        with audit.counting() as written:
            rc = handler(args)
    finally:
        sys.stderr = tee.out
    if rc != 0 and audit.current() is not None and written[0] == 0:
        reason = tee.lines[-1].split(": ", 1)[-1] if tee.lines else f"exit {rc}"
        audit.record(action, target, "refused", reason)
    return rc
