"""What every full screen shares: header (title, host, clock), the status line, the footer of keys."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer, Header, Static


class StatusLine(Static):
    """Node and GPU counts, store state, and the SIMULATED badge when the fleet is simulated."""


class DeckScreen(Screen[None]):
    def compose(self) -> ComposeResult:
        options = getattr(self.app, "options", None)
        yield Header(show_clock=getattr(options, "show_clock", True))
        yield StatusLine(getattr(self.app, "status_text", ""), id="status", markup=True)
        yield from self.compose_body()
        yield Footer()

    def compose_body(self) -> ComposeResult:
        yield from ()
