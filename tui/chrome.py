"""The lines every full screen has around its body, sized for 80x24 first.

- `ScreenBar`: the seven screens' keys (the current one marked) and the global keys, on one line,
  so the footer below it holds only the keys of the screen and never runs out of room at 80 columns.
- `FlashLine`: the latest message (what toasts said), between the body and the bar: it takes a line
  of its own while it lasts instead of covering what the screen shows.
- `FilterBar`: the `/` filter of the screen's tables (k9s): typing filters, Enter keeps the filter and
  goes back to the table, Esc clears it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.errors import MarkupError
from rich.text import Text
from textual.binding import Binding
from textual.widgets import Input, Static

if TYPE_CHECKING:
    from textual.dom import DOMNode

    from tui.table import DeckTable

SCREENS = (("1", "fleet", "Fleet"), ("2", "fit", "Fit"), ("3", "servers", "Servers"), ("4", "jobs", "Jobs"),
           ("5", "router", "Router"), ("6", "cost", "Cost"), ("7", "audit", "Audit"))
GLOBAL_KEYS = (("?", "keys"), (":", "actions"), ("q", "quit"))
SEVERITY_STYLE = {"information": "bold", "warning": "bold yellow", "error": "bold red"}


def screen_bar_text(current: str | None, width: int) -> Text:
    """`1 Fleet 2 Fit ...` then `? keys : actions q quit` as far as the width allows (the global keys
    shorten to the key alone before any screen's name is cut)."""
    bar = Text()
    for key, mode, label in SCREENS:
        bar.append(f" {key}", style="bold")
        bar.append(f" {label} ", style="reverse" if mode == current else "")
    long = Text.assemble(*(x for k, word in GLOBAL_KEYS for x in ((f" {k}", "bold"), f" {word}")))
    short = Text.assemble(*((f" {k}", "bold") for k, _ in GLOBAL_KEYS))
    for tail in (long, short):
        if bar.cell_len + tail.cell_len + 1 <= width:
            pad = width - bar.cell_len - tail.cell_len
            return bar + Text(" " * pad) + tail
    return bar


class ScreenBar(Static):
    def __init__(self, current: str | None, **kwargs: Any) -> None:
        super().__init__("", **kwargs)
        self.current = current

    def on_resize(self) -> None:
        self.update(screen_bar_text(self.current, self.size.width))

    def on_mount(self) -> None:
        self.update(screen_bar_text(self.current, self.size.width or self.app.size.width))


def flash_text(message: str, title: str, severity: str, markup: bool) -> Text:
    try:
        body = Text.from_markup(message) if markup else Text(message)
    except MarkupError:  # a message that merely holds brackets
        body = Text(message)
    out = Text(f"{title}: " if title else "", style=SEVERITY_STYLE.get(severity, "bold"))
    out.append_text(body)
    if severity != "information":
        out.stylize(SEVERITY_STYLE[severity].replace("bold ", ""), len(title) + 2 if title else 0)
    return out


class FlashLine(Static):
    """Hidden until there is a message; shows the newest one (and how many more are live)."""

    def show(self, flashes: list[Text]) -> None:
        if not flashes:
            self.display = False
            return
        text = flashes[-1].copy()
        if len(flashes) > 1:
            text.append(f"  (+{len(flashes) - 1} more)", style="dim")
        self.update(text)
        self.display = True


class FilterBar(Input):
    """The `/` filter of one of the screen's tables."""

    BINDINGS = [Binding("escape", "close", "Clear filter", id="filter.clear")]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(placeholder="filter: type to keep matching rows · Enter keeps it · Esc clears",
                         compact=True, **kwargs)
        self.target: DeckTable | None = None

    def open(self, table: DeckTable) -> None:
        self.target = table
        self.value = table.filter_text
        self._show(True)
        self.focus()

    def _show(self, shown: bool) -> None:
        """The bar lives in a row with its `/` mark (the screen's #filter-row): that row shows or hides."""
        parent = self.parent
        holder: DOMNode = parent if parent is not None and parent.id == "filter-row" else self
        holder.display = shown

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        if self.target is not None:
            self.target.set_filter(event.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.close(clear=False)

    def action_close(self) -> None:
        self.close(clear=True)

    def close(self, clear: bool) -> None:
        target = self.target
        if clear:
            self.value = ""
            if target is not None:
                target.set_filter("")
        self._show(bool(target is not None and target.filter_text))  # a kept filter stays in sight
        if target is not None:
            target.focus()
