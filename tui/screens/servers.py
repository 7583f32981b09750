"""The Servers screen: every vLLM server fleetdeck started, its state and live figures from /metrics,
and the actions: start from a profile (with the planner's verdict first), stop, restart, logs, adapters.

A worker refreshes states and scrapes /metrics every couple of seconds while the screen is on top;
rates come from counter deltas between two scrapes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from tui.format import sparkline
from engine.nodes.ids import split_id
from tui.screens.adapters_panel import AdaptersScreen
from tui.screens.base import PolledScreen, ask_to_prune, highlighted_key, nodes_away, report_prune, store_of, while_attached
from tui.screens.start_server import StartServerScreen
from tui.table import Col, DeckTable
from tui.screens.confirm import ConfirmScreen
from tui.screens.logs import LogScreen

if TYPE_CHECKING:
    from store.db import Store

STATE_STYLE = {"ready": "bold green", "starting": "yellow", "crashed": "bold red", "stopped": "dim"}


@dataclass
class ServerView:
    rec: Any
    figures: Any = None
    gen_history: deque[float] = field(default_factory=lambda: deque(maxlen=120))
    away: bool = False  # its node is not answering now: the row stays, marked, until the node is back


def _f(x: float | None, fmt: str = "{:.0f}", unit: str = "") -> str:
    return "n/a" if x is None else fmt.format(x) + unit


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1000:.0f}"


def _pair(a: str, b: str) -> str:
    """Two figures in one column ("50/97"); neither known is one "n/a", not "n/a/n/a"."""
    return "n/a" if a == b == "n/a" else f"{a}/{b}"


# Column, label, priority (the highest hides first when narrow: at 80 columns the server, its node,
# state, GPUs, generation rate and TTFT stay).
COLUMNS = (Col("id", "Server", give=14), Col("node", "Node"), Col("state", "State"), Col("gpus", "GPUs"),
           Col("port", "Port", 6), Col("gen", "Gen tok/s", 1), Col("prompt", "Prompt tok/s", 7),
           Col("reqs", "Run/Wait", 3), Col("kv", "KV use", 4), Col("ttft", "TTFT p50/95 ms", 2),
           Col("e2e", "E2E p50/95 s", 5), Col("pre", "Preempt", 8), Col("hit", "Prefix hit", 8),
           Col("cap", "KV tokens alloc/plan", 7))


class ServersScreen(PolledScreen):
    MUTATING = frozenset({"start", "stop", "restart", "prune"})
    BINDINGS = [
        Binding("s", "start", "Start", id="servers.start"),
        Binding("x", "stop", "Stop", id="servers.stop"),
        Binding("r", "restart", "Restart", id="servers.restart"),
        Binding("l", "logs", "Logs", id="servers.logs"),
        Binding("a", "adapters", "Adapters", tooltip="Load, unload or swap LoRA adapters", id="servers.adapters"),
        Binding("p", "prune", "Prune", tooltip="Forget stopped and crashed servers (logs stay)", id="servers.prune"),
    ]
    PALETTE_EXTRA = (("Swap adapter (a, then w)", "Servers: the adapters panel of the server under the cursor",
                      "adapters"),)

    FOCUS = "#servers-table"

    def __init__(self, refresh_s: float = 2.0) -> None:
        super().__init__(refresh_s)
        self.views: dict[str, ServerView] = {}
        self._scrapes: dict[str, Any] = {}
        self._local_ops: Any = None

    def compose_body(self) -> ComposeResult:
        yield DeckTable(COLUMNS, id="servers-table")
        yield Static("", id="servers-detail")

    def no_store(self) -> None:
        self.query_one("#servers-detail", Static).update("No store: servers are recorded in the store (see --store).")

    def load(self, store: Store) -> None:
        self._load(store)

    @work(thread=True, exclusive=True, group="servers")
    def _load(self, store: Store) -> None:
        from engine.nodes.select import remote_ops
        from fleet.remote import AgentError

        try:
            statuses = self._local().servers()  # the same figures `serve ls --json` prints
        except Exception as exc:
            self.app.call_from_thread(self._error, f"servers unavailable: {exc}")
            return
        away = nodes_away(self._sources())
        for node in remote_ops(self._sources()):
            try:
                statuses += node.servers()  # figures read by that node's agent
            except AgentError:
                away.add(node.name)
        self.app.call_from_thread(while_attached(self, self._show), [(st.rec, st.figures) for st in statuses], away)

    def _sources(self) -> list[Any]:
        return list(getattr(getattr(self.app, "poller", None), "sources", []))

    def _local(self) -> Any:
        from engine.nodes.local import LocalOps

        config = self.app.options.config
        if self._local_ops is None or self._local_ops.store is not self.store:
            self._local_ops = LocalOps(store_of(self.app), list(config.adapter_roots), scrapes=self._scrapes,
                                       folders=self.app.options.folders, slurm_settings=getattr(config, "slurm", None))
        return self._local_ops

    def _error(self, message: str) -> None:
        self.loaded()
        self.query_one("#servers-detail", Static).update(f"[red]{message}[/]")

    def _show(self, views: list[tuple[Any, Any]], away: set[str] | frozenset[str] = frozenset()) -> None:
        self.loaded()
        table = self.query_one("#servers-table", DeckTable)
        for rec, fig in views:
            view = self.views.setdefault(rec.id, ServerView(rec))
            view.rec, view.figures, view.away = rec, fig, False
            if fig is not None:
                view.gen_history.append(fig.generation_tps)
        listed = {rec.id for rec, _ in views}
        # A node that is not answering (reconnecting) keeps its rows, marked: they vanished before, and a
        # key pressed then acted on whatever row slid under the cursor.
        kept = [(v.rec, None) for sid, v in self.views.items() if sid not in listed and split_id(sid)[0] in away]
        for rec, _ in kept:
            self.views[rec.id].figures, self.views[rec.id].away = None, True
        views = [*views, *kept]
        listed |= {rec.id for rec, _ in kept}
        for gone in [sid for sid in self.views if sid not in listed]:  # pruned, or its node dropped
            del self.views[gone]
        with self.app.batch_update():
            table.set_rows([(rec.id, self._cells(self.views[rec.id])) for rec, _ in views])
        self._detail()

    def _cells(self, v: ServerView) -> list[Any]:
        from engine.vllm.record import ServerState  # (lazily: loaded by the poll already)

        r, f = v.rec, v.figures
        state = Text("unreachable", style="dim") if v.away else Text(r.state, style=STATE_STYLE.get(r.state, ""))
        node, own = split_id(r.id)  # a node's server shows its own id: the Node column names the node
        node = node or r.node
        if f is None:
            blanks = ["" if r.state != ServerState.READY else "n/a"] * 9
            return [own, node, state, str(r.gpus), str(r.port or ""), *blanks]
        from engine.vllm.status import kv_disagreement  # (lazily: the screens load without httpx)

        alloc = f"{f.kv_tokens:,}" if f.kv_tokens else "n/a"
        plan = f"{r.predicted_kv_tokens:,}" if r.predicted_kv_tokens else "n/a"
        apart = kv_disagreement(f.kv_tokens, r.predicted_kv_tokens)
        # Far apart: the plan no longer describes this server; marked so it is not read as a confirmation.
        cap: Any = Text(f"⚠ {alloc}/{plan} ({apart:.1f}x)", style="bold yellow") if apart else f"{alloc}/{plan}"
        return [
            own, node, state, str(r.gpus), str(r.port), _f(f.generation_tps), _f(f.prompt_tps),
            _pair(_f(f.running), _f(f.waiting)), _f(None if f.kv_usage is None else f.kv_usage * 100, unit="%"),
            _pair(_ms(f.ttft_p50), _ms(f.ttft_p95)), _pair(_f(f.e2e_p50, '{:.2f}'), _f(f.e2e_p95, '{:.2f}')),
            _f(f.preemptions), _f(None if f.prefix_hit_rate is None else f.prefix_hit_rate * 100, unit="%"),
            cap,
        ]

    def selected_id(self) -> str | None:
        return highlighted_key(self.query_one("#servers-table", DataTable))

    def selected(self) -> ServerView | None:
        sid = self.selected_id()
        return self.views.get(sid) if sid else None

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._detail()

    def on_deck_table_filtered(self, event: DeckTable.Filtered) -> None:
        self._detail()

    def _detail(self) -> None:
        from engine.vllm.record import ServerState  # (lazily: loaded by the poll already)

        v = self.selected()
        detail = self.query_one("#servers-detail", Static)
        if v is None:
            hidden = self.query_one("#servers-table", DeckTable).hidden_by_filter()
            detail.update(Text(f"Nothing shown: {hidden}.") if hidden else
                          "No servers yet. Press [b]s[/b] to start one from a launch profile.")
            return
        r = v.rec
        # Names, paths and vLLM's own words are text, not markup: "[serve]" in a reason stays visible.
        lines = [f"[b]{escape(r.id)}[/b] · {escape(r.served_name)} · GPUs {r.gpus} · {r.base_url} · log "
                 f"{escape(str(r.log_path))}"]
        if r.reason and r.state != ServerState.READY:
            lines.append(f"[{'red' if r.state == ServerState.CRASHED else 'dim'}]{escape(r.reason)}[/]")
        if v.gen_history:
            top = max([x for x in v.gen_history if x is not None] or [1.0]) or 1.0
            lines.append(f"gen tok/s {sparkline(v.gen_history, 60, top=top)}")
        detail.update("\n".join(lines))

    # -- actions --------------------------------------------------------------------------------
    def _none(self, what: str) -> None:
        """A key on no row: says why there is none (nothing listed, or a filter hiding every row)."""
        hidden = self.query_one("#servers-table", DeckTable).hidden_by_filter()
        self.notify(f"{what}: {hidden or 'none is listed here'}.", severity="warning")

    def _guard(self) -> bool:
        if getattr(self.app.options.config, "read_only", False):
            self.notify("Read-only mode: servers are not started, stopped or changed.", severity="warning")
            return False
        return True

    def action_start(self) -> None:
        if not self._guard():
            return
        self.app.push_screen(StartServerScreen(), self._started)

    def _started(self, result: Any) -> None:
        if result:
            self.notify(result)
            self.reload()

    def action_stop(self) -> None:
        from engine.vllm.record import ENDED

        v = self.selected()
        if v is None:
            self._none("No server to stop")
            return
        if not self._guard():
            return
        if v.rec.state in ENDED:  # said, not ignored: a key that does nothing reads as a broken key
            self.notify(f"{v.rec.id} is already {v.rec.state}: `r` starts it again, `p` forgets it.",
                        severity="warning")
            return

        def done(ok: bool | None) -> None:
            if ok:
                self._stop(v.rec)

        self.app.push_screen(ConfirmScreen(f"Stop {v.rec.id} (pid {v.rec.pid}, GPUs {v.rec.gpus})?"), done)

    def _gpus_now(self, rec: Any) -> Any:
        """The poller's figures for the GPUs a server ran on, on its node (the demo's simulated nodes have no
        source of their own in the engine): a restart of an ended server is planned against them. None: the
        engine reads the node's own."""
        from engine.managed import LocalGpus

        poller = getattr(self.app, "poller", None)
        snap = (poller.latest or {}).get(rec.node) if poller is not None and rec.node else None
        if snap is None or not isinstance(rec.gpus, LocalGpus):
            return None
        try:
            return snap.gpus_at(list(rec.gpus.indices))
        except ValueError:  # the node no longer has that GPU: the engine's plan says so
            return None

    @work(thread=True, group="servers-action")
    def _stop(self, rec: Any, restart: bool = False) -> None:
        from engine.audit import trail as audit
        from engine.nodes.ops import restarted_text
        from engine.nodes.select import ops_for
        from fleet.remote import AgentError

        try:
            ops, sid = ops_for(self._sources(), self._local(), rec.id)
            if restart:
                message = restarted_text(ops.restart_server(sid, gpu_snapshots=self._gpus_now(rec)))
            else:
                message = f"{ops.stop_server(sid).id} stopped"
        except (AgentError, audit.ReadOnlyError) as exc:
            message = f"{rec.id}: {exc}"
        except Exception as exc:  # a restart whose start failed: the stop stands
            message = f"{rec.id}: restart failed: {exc}"
        self.app.call_from_thread(self.notify, message)
        self.app.call_from_thread(self.reload)

    def action_restart(self) -> None:
        v = self.selected()
        if v is None:
            self._none("No server to restart")
            return
        if not self._guard():
            return

        def done(ok: bool | None) -> None:
            if ok:
                self._stop(v.rec, restart=True)

        self.app.push_screen(ConfirmScreen(f"Restart {v.rec.id} with the same profile and GPUs?"), done)

    def action_prune(self) -> None:
        from engine.vllm.record import ENDED

        ended = [v.rec.id for v in self.views.values() if v.rec.state in ENDED
                 and split_id(v.rec.id)[0] is None]
        if not self._guard():
            return
        ask_to_prune(self, ended, "server(s)", "Their logs stay on disk.",
                     "No stopped or crashed servers on this host to prune.", self._prune)

    @work(thread=True, group="servers-action")
    def _prune(self) -> None:
        from engine.nodes.ops import pruned

        report_prune(self, lambda: pruned("servers", self._local().prune_servers()))

    def action_logs(self) -> None:
        v = self.selected()
        if v is None:
            self._none("No server, so no log")
        else:
            from engine.nodes.select import ops_for
            from fleet.remote import AgentError

            try:
                ops, sid = ops_for(self._sources(), self._local(), v.rec.id)
            except AgentError as exc:
                self.notify(str(exc), severity="warning")
                return
            self.app.push_screen(LogScreen(v.rec.id, v.rec.log_path, lambda: ops.tail_log("server", sid)))

    def action_adapters(self) -> None:
        from engine.vllm.record import ENDED

        v = self.selected()
        if v is None:
            self._none("No server, so no adapters")
            return
        if v.rec.state in ENDED:  # the panel opened on a crashed server, as if adapters could load into it
            self.notify(f"{v.rec.id} is {v.rec.state}: adapters load into a running server (`r` starts it again).",
                        severity="warning")
            return
        from engine.nodes.select import ops_for
        from fleet.remote import AgentError

        try:
            ops, sid = ops_for(self._sources(), self._local(), v.rec.id)
        except AgentError as exc:
            self.notify(str(exc), severity="warning")
            return
        self.app.push_screen(AdaptersScreen(v.rec, ops, sid))
