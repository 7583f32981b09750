"""The adapters panel of one server (the Servers screen's `a`): the adapters on the server's node, with
compatibility for this server and integrity, those loaded in it; load, unload, swap. The same through a
node's agent as on this host: `ops` is the server's node (engine/nodes)."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.css.query import NoMatches
from textual.widgets import DataTable, Static

from tui.screens.base import DeckModal, on_yes, while_attached
from tui.screens.confirm import ConfirmScreen
from tui.table import NavTable, highlighted_key


class AdaptersScreen(DeckModal):
    MUTATING = frozenset({"load", "unload", "swap"})
    AUTO_FOCUS = "#adapters-disk"
    """Adapters on the server's node (with compatibility for this server) and loaded in it; load, unload,
    swap. The same through a node's agent as on this host: `ops` is the server's node."""

    BINDINGS = [
        Binding("escape", "close", "Close", id="adapters.close"),
        Binding("enter", "load", "Load", id="adapters.load", priority=True),
        Binding("u", "unload", "Unload", id="adapters.unload"),
        Binding("w", "swap", "Swap", id="adapters.swap"),
    ]

    def __init__(self, rec: Any, ops: Any, sid: str) -> None:
        super().__init__()
        self.rec, self.ops, self.sid = rec, ops, sid
        self.disk: list[Any] = []
        self.loaded_names: list[str] = []
        self.last_message = ""
        self.integrity: dict[str, str | None] = {}
        self.accuracy: dict[str, float] = {}

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="adapters-panel"):
            yield Static(f"[b]Adapters for {self.rec.id}[/b] ({self.rec.served_name})  Enter load · u unload · "
                         "w swap loaded→highlighted · Esc close")
            disk: DataTable[Any] = NavTable(id="adapters-disk", cursor_type="row")
            # Compatible second: at 80 columns a long base model pushed it, the answer to "can it load here",
            # off the panel's right edge.
            disk.add_columns("On disk", "Compatible", "Rank", "Alpha", "Base model", "MiB", "Version", "Eval")
            yield disk
            loaded: DataTable[Any] = NavTable(id="adapters-loaded", cursor_type="row")
            loaded.add_columns("Loaded in server")
            yield loaded
            yield Static("", id="adapters-message")

    def on_mount(self) -> None:
        self.refresh_lists()

    @work(thread=True, exclusive=True, group="adapters")
    def refresh_lists(self) -> None:
        # Hashing every version's files and asking the server belong off the UI thread (and, for a node
        # over SSH, on that node: its agent answers with the same listing).
        try:
            listing = self.ops.adapters(self.sid)
        except Exception as exc:
            from engine.nodes.ops import AdapterListing

            listing = AdapterListing([], problems=[f"cannot list adapters: {exc}"])
        self.app.call_from_thread(while_attached(self, self._show), listing)

    def _problems(self, adapter: Any) -> list[str]:
        from engine.adapters import registry as adapters

        lora = self.rec.spec.get("lora", {})
        problems = adapters.compatibility_problems(adapter, self.rec.spec.get("model", ""), lora.get("enable", False),
                                                   lora.get("max_lora_rank", 16))
        changed = self.integrity.get(adapter.name)
        return problems + ([changed] if changed else [])

    def _show(self, listing: Any) -> None:
        try:
            disk = self.query_one("#adapters-disk", DataTable)
            table = self.query_one("#adapters-loaded", DataTable)
            message = self.query_one("#adapters-message", Static)
        except NoMatches:  # the panel is closing (still attached, its children going): the listing is dropped
            return
        self.disk, self.loaded_names = listing.adapters, listing.loaded
        self.integrity, self.accuracy = listing.integrity, listing.accuracy
        disk.clear()
        for a in self.disk:
            issues = self._problems(a)
            version = ("-" if a.version is None else
                       Text("MODIFIED", style="bold red") if self.integrity.get(a.name) else Text("intact", style="green"))
            acc = self.accuracy.get(a.name)
            disk.add_row(a.name, Text("yes", style="green") if not issues else Text("no", style="red"), str(a.rank),
                         str(a.alpha or "n/a"), str(a.base_model or "n/a"), f"{a.size_bytes / 1024**2:.1f}", version,
                         f"{acc * 100:.1f}%" if acc is not None else "-", key=a.name)
        table.clear()
        for name in self.loaded_names:
            table.add_row(name, key=name)
        # Text, not markup: "set [lora] enable = true" lost its "[lora]" and read "set  enable = true".
        message.update(Text("\n".join([self.last_message, *listing.problems]).strip()))

    def _highlighted(self, table_id: str) -> str | None:
        return highlighted_key(self.query_one(table_id, DataTable))

    def _adapter(self) -> Any:
        name = self._highlighted("#adapters-disk")
        return next((a for a in self.disk if a.name == name), None)

    def _read_only(self) -> bool:
        if getattr(self.app.options.config, "read_only", False):
            self._say("Read-only mode: adapters are not loaded or unloaded.")
            return True
        return False

    def action_load(self) -> None:
        adapter = self._adapter()
        if adapter is None or self._read_only():
            return
        issues = self._problems(adapter)
        if issues:
            self._refuse("adapter.load", adapter, "Not loading " + adapter.name + ": " + "; ".join(issues))
            return
        self._do("load", adapter.name)

    def action_unload(self) -> None:
        name = self._highlighted("#adapters-loaded")
        if name is None or self._read_only():
            return
        self.app.push_screen(ConfirmScreen(f"Unload {name} from {self.rec.id}? Requests naming it will fail."),
                             on_yes(lambda: self._do("unload", name)))

    def action_swap(self) -> None:
        old = self._highlighted("#adapters-loaded")
        adapter = self._adapter()
        if old is None or adapter is None or self._read_only():
            self._say("Highlight a loaded adapter (to replace) and an adapter on disk (to load).")
            return
        issues = self._problems(adapter)
        if issues:
            self._refuse("adapter.swap", adapter, "Not swapping in " + adapter.name + ": " + "; ".join(issues), old=old)
            return
        self.app.push_screen(ConfirmScreen(f"Load {adapter.name}, then unload {old}?"),
                             on_yes(lambda: self._do("swap", adapter.name, old)))

    def _refuse(self, action: str, adapter: Any, message: str, old: str | None = None) -> None:
        """Refused here, before vLLM is asked: said on screen and recorded like any refusal."""
        from engine.audit import trail as audit

        audit.record(action, adapter.name, "refused", message, server=self.rec.id, adapter=adapter.name,
                     path=adapter.path, old=old)
        self._say(message)

    def _say(self, message: str) -> None:
        self.last_message = message
        self.query_one("#adapters-message", Static).update(Text(message))

    @work(thread=True, group="adapters-action")
    def _do(self, what: str, name: str, old: str | None = None) -> None:
        from engine.adapters import registry as adapters
        from engine.audit import trail as audit
        from fleet.remote import AgentError

        try:
            if what == "load":
                msg = self.ops.load_adapter(self.sid, name)
            elif what == "unload":
                msg = self.ops.unload_adapter(self.sid, name)
            else:
                msg = self.ops.swap_adapter(self.sid, old or "", name)
        except (adapters.AdapterError, AgentError, audit.ReadOnlyError) as exc:
            msg = str(exc)
        self.last_message = msg
        self.refresh_lists()

    def action_close(self) -> None:
        self.dismiss(None)
