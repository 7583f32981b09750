"""The tail of a server's or job's log, on this host or read through a node's agent."""

from __future__ import annotations

from tui.screens.base import while_attached

from typing import Callable

from rich.markup import escape
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


class LogScreen(ModalScreen[None]):
    """The tail of a server's or job's log, read in a worker (a log can sit on a slow disk)."""

    BINDINGS = [Binding("escape,q,l", "dismiss", "Close", id="logs.close")]

    def __init__(self, title: str, log_path: str, read: Callable[[], str] | None = None) -> None:
        super().__init__()
        self.title_text, self.log_path = title, log_path
        self.read = read  # how to get the text (a node's agent, for a remote server or job)

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="log-view"):
            # Text, not markup: a path or an id with "[" in it is shown as written.
            yield Static(f"[b]{escape(self.title_text)}[/b] {escape(self.log_path)} (Esc closes)")
            yield Static("reading…", id="log-text")

    def on_mount(self) -> None:
        self._read()

    @work(thread=True, exclusive=True, group="log")
    def _read(self) -> None:
        from engine.io.logs import tail

        try:
            text = self.read() if self.read is not None else tail(self.log_path, 200)
        except Exception as exc:  # a node that dropped, a log that went away
            text = f"cannot read the log: {exc}"
        self.app.call_from_thread(while_attached(self, self._show), text)

    def _show(self, text: str) -> None:
        self.query_one("#log-text", Static).update(Text(text))
        # Anchored, not scrolled once: the end moves as the text wraps again when the scrollbar takes its
        # two columns, and a single scroll_end stopped short of it (a crashed server's log opened with its
        # traceback below the fold). Scrolling up lets go of the anchor.
        self.query_one("#log-view").anchor()

    # A plain, synchronous close in place of Textual's async action_dismiss(result): this dialog has no result.
    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)
