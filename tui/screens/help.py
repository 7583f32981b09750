"""`?`: every key the operator can press on the screen below, and what it does."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from tui.table import NavTable


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close", id="help.close")]

    def __init__(self, rows: list[tuple[str, str, str]]) -> None:
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Static("[b]Keys[/b]  (Esc closes; : or ctrl+p lists every action of the screen)", id="help-title")
            table: DataTable[str] = NavTable(id="help-table", cursor_type="row", show_cursor=False)
            table.add_columns("Key", "Action", "Where")
            for key, desc, scope in self.rows:
                table.add_row(key, desc, scope)
            yield table

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)
