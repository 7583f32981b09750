"""Borderless rich tables of plain-text cells, for the CLI and the screens that show the same view.

Cells are Text, never markup: a GPU index "[0]" or a Slurm node list "gpu[1-4]" is shown as written.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

from rich.console import RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, right: Collection[str] = (),
          indent: int = 0) -> RenderableType:
    """A table without borders; cells are plain text (a GPU index "[0]" is not rich markup)."""
    t = Table(box=None, pad_edge=False, show_edge=False, padding=(0, 2, 0, 0), header_style="bold")
    for h in headers:
        t.add_column(h, justify="right" if h in right else "left", no_wrap=False, overflow="fold")
    for row in rows:
        t.add_row(*(c if isinstance(c, Text) else Text(str(c)) for c in row))
    return Padding(t, (0, 0, 0, indent)) if indent else t
