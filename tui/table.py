"""The one table every screen uses, with the habits operators bring from k9s and nvitop.

- `j`/`k` move the cursor (every table, dialogs' included: `NavTable`).
- `/` opens the screen's filter bar: typing keeps the rows whose text holds it (any column, shown or
  not, case-insensitive); Enter keeps the filter and goes back to the table; Esc clears it.
- `o` sorts by the next column (ascending), `O` flips the direction; the header marks it ▲/▼.
- Columns carry a priority: when the table is narrower than every column's natural width, the
  columns of the highest priority number hide first (0 never hides), so 80 columns keep what matters.
- A long-id column (`give`) gives way before an essential column hides or is cut: it is cut in the
  middle (the id's unique tail stays) down to `give` cells, so the State beside it is never "cancell".

Rows are given whole (`set_rows`) and the table works out what to show; when neither the rows' keys
nor the visible columns changed it writes only the cells whose text changed (a rebuild loses the
cursor and costs a render of every cell).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence, TypeVar

from rich.cells import cell_len
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable
from textual.widgets.data_table import CursorType

Cell = str | Text  # what a DataTable cell holds here: plain text, or styled text
CellT = TypeVar("CellT")  # any table's cells: highlighted_key reads only the row key


def highlighted_key(table: DataTable[CellT]) -> str | None:
    """The row key under a table's cursor, or None for an empty table."""
    if table.row_count == 0:
        return None
    try:
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
    except Exception:  # the cursor sits past a row that was just removed
        return None


@dataclass(frozen=True)
class Col:
    key: str
    label: str
    priority: int = 0  # 0: always shown; the highest number hides first when the table is narrow
    flex: int | None = None  # a column that takes what is left: counted at this width when fitting
    give: int | None = None  # an id that may be cut in the middle (to this many cells, at least) to keep
    # the essential columns (priority <= ESSENTIAL) whole, rather than hide them or have them cut
    wrap: bool = False  # a flex column whose text wraps onto more lines (its row grows) instead of being cut


ESSENTIAL = 2  # priorities kept before a `give` column is cut: what the README promises at 80 columns


def plain(cell: Cell) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)


def cut_middle(cell: Cell, limit: int) -> Text:
    """The cell cut to `limit` cells with an ellipsis in the middle: an id's start and its unique tail
    ("ft-tickets…99065f (sim)") stay, the part every id shares goes. Styles are kept."""
    text = cell.copy() if isinstance(cell, Text) else Text(str(cell))
    s = text.plain
    tail = (limit - 1) // 2 + (limit - 1) % 2
    head = limit - 1 - tail
    while cell_len(s[:head]) + 1 + cell_len(s[len(s) - tail:]) > limit and (head or tail):
        head, tail = (head - 1, tail) if head >= tail else (head, tail - 1)
    return text[:head] + Text("…") + text[len(s) - tail:]


_LEAD = re.compile(r"^[^\w$.-]+")
_NUMBER = re.compile(r"-?\$?[\d,]*\.?\d+(?:e[-+]?\d+)?")


def sort_value(cell: Cell) -> tuple[int, float, str]:
    """Numbers (with units, commas, % or $) sort by value before text; empty and n/a sort last."""
    text = plain(cell).strip()
    if not text or text.lower() in ("n/a", "-", "?"):
        return (2, 0.0, "")
    m = _NUMBER.match(_LEAD.sub("", text))  # past a bar, a marker or an arrow: "█▍ 18.6/80" is 18.6
    if m:
        try:
            return (0, float(m.group().replace(",", "").replace("$", "")), text.lower())
        except ValueError:
            pass
    return (1, 0.0, text.lower())


class NavTable(DataTable[Cell]):
    """A DataTable with vi keys: what every table in fleetdeck is at least."""

    BINDINGS = [
        Binding("j", "cursor_down", "Down", show=False, id="table.down"),
        Binding("k", "cursor_up", "Up", show=False, id="table.up"),
    ]


class DeckTable(NavTable):
    BINDINGS = [
        Binding("slash", "filter", "Filter", key_display="/", id="table.filter"),
        Binding("o", "sort", "Sort", id="table.sort"),
        Binding("O", "sort_reverse", "Reverse sort", show=False, id="table.sort_reverse"),
        Binding("escape", "clear_filter", "Clear filter", show=False, id="table.clear_filter"),
    ]

    def __init__(self, columns: Sequence[Col], *, id: str | None = None, cursor_type: CursorType = "row",
                 **kwargs: Any) -> None:
        super().__init__(id=id, cursor_type=cursor_type, **kwargs)
        self.spec: tuple[Col, ...] = tuple(columns)
        self.rows_given: list[tuple[str, list[Cell]]] = []
        self.groups: dict[str, str] = {}  # row key -> group (its first row heads it and stays on top)
        self.filter_text = ""
        self.sort_col: str | None = None
        self.sort_reverse = False
        self._shown: tuple[str, ...] = ()
        self._shown_keys: list[str] = []
        self._texts: dict[tuple[str, str], str] = {}
        self._mark: tuple[str | None, bool] = (None, False)
        self._flex: dict[str, int] = {}

    # -- what the screens call ----------------------------------------------------------------
    def set_rows(self, rows: Iterable[tuple[str, Sequence[Cell]]], groups: dict[str, str] | None = None) -> None:
        """All rows, cells in the order of the column spec; the table filters, sorts and fits them."""
        self.rows_given = [(k, list(cells)) for k, cells in rows]
        self.groups = dict(groups or {})
        self.refresh_view()

    def selected_key(self) -> str | None:
        return highlighted_key(self)

    @property
    def shown_columns(self) -> tuple[str, ...]:
        return self._shown

    def cells_of(self, key: str) -> dict[str, Cell]:
        """Every column's cell of a row (hidden columns included), by column key."""
        for k, cells in self.rows_given:
            if k == key:
                return dict(zip((c.key for c in self.spec), cells))
        raise KeyError(key)

    def hidden_by_filter(self) -> str | None:
        """When the filter hides every row, says so: the table is not empty, its filter is (it read "No
        servers yet. Press s" in the demo, under a filter matching none of five servers). None otherwise."""
        if not self.filter_text or not self.rows_given or self._shown_keys:
            return None
        return f"the filter /{self.filter_text} hides all {len(self.rows_given)} (Esc clears it)"

    # -- filter and sort ------------------------------------------------------------------------
    class Filtered(Message):
        """The filter changed: a screen's detail of the row under the cursor follows (there may be none)."""

    def set_filter(self, text: str) -> None:
        if text != self.filter_text:
            self.filter_text = text
            self.refresh_view()
            self.post_message(self.Filtered())

    def action_filter(self) -> None:
        opener = getattr(self.screen, "open_filter", None)
        if opener is not None:
            opener(self)

    def action_clear_filter(self) -> None:
        bar = getattr(self.screen, "filter_bar", None)
        if bar is not None:
            bar.close(clear=True)
        else:
            self.set_filter("")

    def action_sort(self) -> None:
        keys = list(self._shown) or [c.key for c in self.spec]
        if self.sort_col not in keys:
            self.sort_col = keys[0]
        else:
            i = keys.index(self.sort_col) + 1
            self.sort_col = keys[i] if i < len(keys) else None  # past the last column: back to the given order
        self.sort_reverse = False
        self.refresh_view()

    def action_sort_reverse(self) -> None:
        if self.sort_col is None:
            self.sort_col = (list(self._shown) or [c.key for c in self.spec])[0]
        else:
            self.sort_reverse = not self.sort_reverse
        self.refresh_view()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "clear_filter" and not self.filter_text:
            return False  # Esc goes on to the screen (back, close) when there is no filter to clear
        if action == "filter" and getattr(self.screen, "filter_bar", None) is None:
            return False
        return True

    def _matches(self, cells: list[Cell]) -> bool:
        needle = self.filter_text.lower()
        return any(needle in plain(c).lower() for c in cells)

    def visible_rows(self) -> list[tuple[str, list[Cell]]]:
        rows = self.rows_given
        # Groups in their given order, each led by its first row.
        order: list[str] = []
        members: dict[str, list[tuple[str, list[Cell]]]] = {}
        for key, cells in rows:
            g = self.groups.get(key, key)
            if g not in members:
                order.append(g)
                members[g] = []
            members[g].append((key, cells))
        idx = [c.key for c in self.spec].index(self.sort_col) if self.sort_col in [c.key for c in self.spec] else None
        out: list[tuple[str, list[Cell]]] = []
        for g in order:
            group = members[g]
            head, rest = (group[0], group[1:]) if len(group) > 1 or g != group[0][0] else (None, group)
            if head is not None and self.filter_text:
                if not self._matches(head[1]):
                    rest = [r for r in rest if self._matches(r[1])]
                    if not rest:
                        continue
            elif self.filter_text:
                rest = [r for r in rest if self._matches(r[1])]
            if idx is not None:
                rest = sorted(rest, key=lambda r: sort_value(r[1][idx]), reverse=self.sort_reverse)
            out.extend(([head] if head is not None else []) + rest)
        if idx is not None and not self.groups:
            out.sort(key=lambda r: sort_value(r[1][idx]), reverse=self.sort_reverse)
        return out

    # -- fitting the width ------------------------------------------------------------------------
    def _natural_width(self, i: int, col: Col, rows: list[tuple[str, list[Cell]]]) -> int:
        if col.flex is not None:
            return max(col.flex, cell_len(col.label) + 2) + 2 * self.cell_padding
        w = cell_len(col.label) + (2 if col.key == self.sort_col else 0)  # the sort mark's room
        for _, cells in rows:
            if i < len(cells):
                w = max(w, cell_len(plain(cells[i])))
        return w + 2 * self.cell_padding

    def fit_columns(self, rows: list[tuple[str, list[Cell]]]) -> tuple[str, ...]:
        width = self.size.width or (self.app.size.width if self.is_attached else 0)
        if width <= 0:
            return tuple(c.key for c in self.spec)
        avail = width - 2  # the vertical scrollbar
        widths = {c.key: self._natural_width(i, c, rows) for i, c in enumerate(self.spec)}
        shown = [c for c in self.spec]

        def slack() -> int:  # what the shown `give` columns can yield
            return sum(max(0, widths[c.key] - c.give - 2 * self.cell_padding) for c in shown if c.give is not None)

        for col in sorted((c for c in self.spec if c.priority > 0), key=lambda c: -c.priority):
            total = sum(widths[c.key] for c in shown)
            if total <= avail or (col.priority <= ESSENTIAL and total - slack() <= avail):
                break
            shown.remove(col)
        return tuple(c.key for c in shown)

    def _give_widths(self, shown: tuple[str, ...]) -> dict[str, int]:
        """What each shown `give` column may take when the shown columns are wider than the table."""
        width = self.size.width or (self.app.size.width if self.is_attached else 0)
        give = [c for c in self.spec if c.key in shown and c.give is not None]
        if width <= 0 or not give:
            return {}
        rows = self.rows_given
        widths = {c.key: self._natural_width(i, c, rows) for i, c in enumerate(self.spec) if c.key in shown}
        excess = sum(widths.values()) - (width - 2)
        out: dict[str, int] = {}
        for c in give:  # the excess is taken from the first `give` column, then the next
            content = widths[c.key] - 2 * self.cell_padding
            cut = min(max(0, excess), max(0, content - (c.give or 0)))
            excess -= cut
            if cut:
                out[c.key] = content - cut
        return out

    def on_resize(self, event: events.Resize) -> None:
        self.refresh_view()

    # -- showing ------------------------------------------------------------------------------------
    def _label(self, col: Col) -> Text:
        label = Text(col.label)
        if col.key == self.sort_col:
            label.append(" ▼" if self.sort_reverse else " ▲", style="bold")
        return label

    def _flex_widths(self, shown: tuple[str, ...]) -> dict[str, int]:
        """What each shown flex column may take: the table's width less the other shown columns."""
        width = self.size.width or (self.app.size.width if self.is_attached else 0)
        flex = [c for c in self.spec if c.key in shown and c.flex is not None]
        if width <= 0 or not flex:
            return {}
        rows = self.rows_given
        fixed = sum(self._natural_width(i, c, rows) for i, c in enumerate(self.spec)
                    if c.key in shown and c.flex is None)
        room = (width - 2 - fixed) // len(flex) - 2 * self.cell_padding
        return {c.key: max(c.flex or 0, room) for c in flex}

    def refresh_view(self) -> None:
        rows = self.visible_rows()
        shown = self.fit_columns(self.rows_given)
        flex = {**self._flex_widths(shown), **self._give_widths(shown)}
        index = {c.key: i for i, c in enumerate(self.spec)}
        middle = {c.key for c in self.spec if c.give is not None}

        wraps = {c.key for c in self.spec if c.wrap}

        def fit(col: str, cell: Cell) -> Cell:
            limit = flex.get(col)
            if limit is None or cell_len(plain(cell)) <= limit:
                return cell
            if col in wraps:  # the whole text, on as many lines as it takes
                return cell if isinstance(cell, Text) else Text(str(cell))
            if col in middle and limit > 2:
                return cut_middle(cell, limit)
            text = cell.copy() if isinstance(cell, Text) else Text(str(cell))
            text.truncate(limit, overflow="ellipsis")
            return text

        keys = [k for k, _ in rows]
        mark = (self.sort_col, self.sort_reverse)
        rebuilt = False
        selected = None
        # A cut column's room changed: the columns are made again too (a column keeps the widest width
        # it ever had through a rows-only clear, so a cut that grows would leave it too wide).
        if shown != self._shown or mark != self._mark or flex != self._flex:
            selected, rebuilt = self.selected_key(), True
            self.clear(columns=True)
            self._shown, self._mark = shown, mark
            for col in self.spec:
                if col.key in shown:  # a wrapping column is as wide as its room: its text wraps there
                    self.add_column(self._label(col), key=col.key, width=flex.get(col.key) if col.wrap else None)
            self._shown_keys = []
        if keys != self._shown_keys or flex != self._flex:  # a flex column's room changed: cut its cells again
            self._flex = flex
            selected = selected if rebuilt else self.selected_key()
            self.clear()
            self._texts.clear()
            for key, cells in rows:
                # A wrapping column's row is as tall as its text (None: the table measures it).
                self.add_row(*(fit(c, cells[index[c]]) for c in shown), key=key, height=None if wraps else 1)
                for c in shown:
                    self._texts[(key, c)] = plain(cells[index[c]])
            self._shown_keys = keys
            if selected in keys:
                self.move_cursor(row=keys.index(selected))
            return
        for key, cells in rows:
            for c in shown:
                cell = cells[index[c]]
                text = plain(cell)
                if self._texts.get((key, c)) != text:  # the same text with another style waits for a rebuild
                    # The column widens for a longer text ("ready" -> "cancelled"): without it the new
                    # text was cut to the old width ("stopp", "crash", "cancell").
                    self.update_cell(key, c, fit(c, cell), update_width=True)
                    self._texts[(key, c)] = text
