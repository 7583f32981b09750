"""The Audit screen: who changed what on this node, newest first, with the chain's verdict.

The same filters as `fleetdeck audit` (since, node, action); `v` verifies the chain again.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable, Input, Label, Static

from engine.audit.text import shown
from tui.screens.base import PolledScreen, while_attached
from tui.screens.logs import LogScreen
from tui.table import Col, DeckTable

if TYPE_CHECKING:
    from engine.audit.verify import Verdict
    from fleet.config import AuditSettings
    from store.db import Store

SINCE = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400, "all": None}


def load_audit(store: Store, since: str, node: str, action: str, now: float,
               settings: AuditSettings | None = None) -> tuple[list[dict[str, Any]], Verdict]:
    """The rows and the verdict; `settings`: the fleet config's [audit] (retention, key file)."""
    from engine.audit import trail as audit

    span = SINCE.get(since.strip() or "all", None)
    rows = audit.query(store, since=None if span is None else now - span, node=node.strip() or None,
                       action=action.strip() or None, limit=500)
    retention = settings.retention_days if settings is not None else None
    key_file = settings.key_file if settings is not None else None
    return rows, audit.verify(store, audit.anchor_for(store.path, key_file), retention)


# Column, label, priority (the highest hides first when narrow); Outcome takes what is left.
COLUMNS = (Col("when", "When (UTC)"), Col("node", "Node", 2), Col("source", "From", 4), Col("who", "Who", 3),
           Col("action", "Action"), Col("target", "Target"), Col("outcome", "Outcome", flex=12))


class AuditScreen(PolledScreen):
    FOCUS = "#audit-table"
    BINDINGS = [
        Binding("v", "verify", "Verify", id="audit.verify"),
        Binding("f", "edit_filters", "Since/node/action", id="audit.filters"),
        # From a filter field: back to the table (the field keeps its text; Enter applies it).
        Binding("escape", "leave_filters", "Back to the table", show=False, id="audit.leave"),
    ]

    def __init__(self, refresh_s: float = 5.0) -> None:
        super().__init__(refresh_s)
        self.rows: list[dict[str, Any]] = []
        self.verdict: Verdict | None = None
        self.by_key: dict[str, dict[str, Any]] = {}  # row key -> its record, for Enter

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="audit-filters"):
            yield Label("f ", classes="fit-label")
            yield Input(placeholder="since 1h/24h/7d/all", id="audit-since", compact=True)
            yield Input(placeholder="node", id="audit-node", compact=True)
            yield Input(placeholder="action: server, job.start", id="audit-action", compact=True)
        yield Static("", id="audit-verdict")
        yield DeckTable(COLUMNS, id="audit-table")

    def no_store(self) -> None:
        self.query_one("#audit-verdict", Static).update("No store: the audit trail lives in the store (see --store).")

    def load(self, store: Store) -> None:
        self._load(store, *(self.query_one(f"#audit-{k}", Input).value for k in ("since", "node", "action")))

    @work(thread=True, exclusive=True, group="audit")
    def _load(self, store: Store, since: str, node: str, action: str) -> None:
        try:
            rows, verdict = load_audit(store, since, node, action, time.time(), self.app.options.config.audit)
            error: str | None = None
        except Exception as exc:  # a locked store: say so, try again next tick
            rows, verdict, error = [], None, f"audit trail unavailable: {exc}"
        self.app.call_from_thread(while_attached(self, self._show), rows, verdict, error)

    def _show(self, rows: list[dict[str, Any]], verdict: Verdict | None, error: str | None) -> None:
        self.loaded()
        self.rows, self.verdict = rows, verdict
        status = self.query_one("#audit-verdict", Static)
        if error:
            status.update(Text(error, style="red"))
        elif verdict is not None:
            said = shown(verdict.message)
            # verify's own words already say "chain intact": it read "chain intact: 20 record(s), chain intact".
            head = "" if verdict.ok and "chain intact" in said else "chain intact: " if verdict.ok else "CHAIN BROKEN: "
            status.update(Text(head + said, style="green" if verdict.ok else "bold red"))
        table = self.query_one("#audit-table", DeckTable)
        # Values sqlite3 can plant (NULL, a BLOB, a repeated seq; `verify` names them) are shown as text,
        # with row keys made unique, so such a store is listed rather than stopping the screen.
        rows = [{k: (v if isinstance(v, str) or v is None else str(v)) for k, v in r.items()} for r in rows]
        keys: list[str] = []
        for r in rows:
            key = str(r["seq"])
            while key in keys:
                key += "'"
            keys.append(key)
        self.by_key = dict(zip(keys, rows))
        if keys == [k for k, _ in table.rows_given]:
            return
        out = []
        with self.app.batch_update():
            for r, key in zip(rows, keys):
                who = r["actor"] or "?"
                if r["on_behalf_of"]:
                    who = f"{r['on_behalf_of']} via {who}"
                outcome = (r["outcome"] or "?") + (f": {r['reason']}" if r["reason"] else "")
                style = "" if r["outcome"] == "done" else ("yellow" if r["outcome"] == "refused" else "red")
                # Text, not markup, and escaped: a value is shown as written, never styled or split.
                cells = [Text(shown(c)) for c in ((r["utc"] or "?")[:19].replace("T", " "), r["node"], r["source"], who,
                                                  r["action"], r["target"])]
                out.append((key, [*cells, Text(shown(outcome), style=style)]))
            table.set_rows(out)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter on a record: the whole of it. At 80 columns its outcome and reason are cut ("refused:
        No…"), and who, from where and with what parameters are hidden; values escaped as in the table."""
        r = self.by_key.get(str(event.row_key.value))
        if r is None:
            return
        fields = ("seq", "utc", "node", "source", "actor", "origin", "key_fingerprint", "on_behalf_of", "action",
                  "target", "params", "outcome", "reason")
        text = "\n".join(f"{f:<16}{shown(str(r[f]))}" for f in fields if r.get(f) not in (None, ""))
        self.app.push_screen(LogScreen(f"audit record {shown(str(r['seq']))}", "", read=lambda: text))

    @on(Input.Submitted)
    def _filter(self) -> None:
        since = self.query_one("#audit-since", Input)
        if since.value.strip() and since.value.strip() not in SINCE:  # said, not silently read as "all"
            self.notify(f"since takes {', '.join(SINCE)}; got {since.value.strip()!r}", severity="warning")
            since.focus()
            return
        self.reload()
        self.query_one("#audit-table").focus()

    def action_edit_filters(self) -> None:
        self.query_one("#audit-since", Input).focus()

    def action_leave_filters(self) -> None:
        self.query_one("#audit-table").focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "leave_filters":
            return isinstance(self.focused, Input)  # Esc elsewhere: the table's own (clear its / filter)
        return super().check_action(action, parameters)

    def action_verify(self) -> None:
        self.reload()
