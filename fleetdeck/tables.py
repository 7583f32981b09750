"""The CLI's tables, laid out by rich (engine/io/tables.py): columns sized to their contents, numbers
right-aligned.

Piped output (scripts, `| grep`, CI logs) is never wrapped or cut: the width is the table's own. At a
terminal, rich fits the table to the window and folds cells rather than garbling them.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterable, Sequence

from rich.console import Console, RenderableType

from engine.io.tables import table

_PIPED_WIDTH = 10_000


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, right: Collection[str] = (),
                indent: int = 0) -> None:
    print_renderable(table(headers, rows, right=right, indent=indent))


def print_renderable(renderable: RenderableType) -> None:
    """Print to the current sys.stdout (tests capture it), without trailing blanks on each line."""
    out = sys.stdout
    tty = out.isatty()
    console = Console(file=out, highlight=False, width=None if tty else _PIPED_WIDTH, no_color=not tty,
                      force_terminal=tty)
    with console.capture() as cap:
        console.print(renderable)
    out.write("".join(line.rstrip() + "\n" for line in cap.get().splitlines()))
