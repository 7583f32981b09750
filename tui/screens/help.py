"""`?`: every key the operator can press on the screen below, and what it does."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

from tui.table import Col, DeckTable


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close", id="help.close")]

    def __init__(self, rows: list[tuple[str, str, str]]) -> None:
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        with Vertical(id="help"):
            yield Static("[b]Keys[/b]  (Esc closes; : or ctrl+p lists every action of the screen)", id="help-title")
            # The action wraps within the width: the dialog fits 80 columns without a sideways scroll, and a
            # long one is read whole (it was cut: "Kill the process under the process table's cursor (…").
            table = DeckTable((Col("key", "Key"), Col("action", "Action", flex=20, wrap=True), Col("where", "Where")),
                              id="help-table", show_cursor=False)
            table.set_rows([(str(i), [key, desc, scope]) for i, (key, desc, scope) in enumerate(self.rows)])
            yield table

    # A plain, synchronous close in place of Textual's async action_dismiss(result): this dialog has no result.
    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)
