"""The Servers screen: every vLLM server fleetdeck started, its state and live figures from /metrics,
and the actions: start from a profile (with the planner's verdict first), stop, restart, logs, adapters.

A worker refreshes states and scrapes /metrics every couple of seconds while the screen is on top;
rates come from counter deltas between two scrapes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Input, Label, Select, Static

from tui.format import sparkline
from engine.node_ops import split_id
from tui.screens.base import DeckModal, PolledScreen, ask_to_prune, highlighted_key, report_prune, while_attached
from tui.table import Col, DeckTable, NavTable
from tui.screens.confirm import ConfirmScreen
from tui.screens.logs import LogScreen

if TYPE_CHECKING:
    from store.db import Store

STATE_STYLE = {"ready": "bold green", "starting": "yellow", "crashed": "bold red", "stopped": "dim"}


@dataclass
class ServerView:
    rec: Any
    figures: Any = None
    gen_history: deque = field(default_factory=lambda: deque(maxlen=120))


def _f(x: float | None, fmt: str = "{:.0f}", unit: str = "") -> str:
    return "n/a" if x is None else fmt.format(x) + unit


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1000:.0f}"


# Column, label, priority (the highest hides first when narrow: at 80 columns the server, its node,
# state, GPUs, generation rate and TTFT stay).
COLUMNS = (Col("id", "Server"), Col("node", "Node"), Col("state", "State"), Col("gpus", "GPUs"),
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
        from engine.node_ops import remote_ops
        from fleet.remote import AgentError

        try:
            statuses = self._local().servers()  # the same figures `serve ls --json` prints
        except Exception as exc:
            self.app.call_from_thread(self._error, f"servers unavailable: {exc}")
            return
        for node in remote_ops(self._sources()):
            try:
                statuses += node.servers()  # figures read by that node's agent
            except AgentError:
                continue
        self.app.call_from_thread(while_attached(self, self._show), [(st.rec, st.figures) for st in statuses])

    def _sources(self) -> list[Any]:
        return list(getattr(getattr(self.app, "poller", None), "sources", []))

    def _local(self) -> Any:
        from engine.node_ops import LocalOps

        if self._local_ops is None or self._local_ops.store is not self.store:
            self._local_ops = LocalOps(self.store, list(self.app.options.config.adapter_roots), scrapes=self._scrapes,
                                       folders=self.app.options.folders)
        return self._local_ops

    def _error(self, message: str) -> None:
        self.loaded()
        self.query_one("#servers-detail", Static).update(f"[red]{message}[/]")

    def _show(self, views: list[tuple[Any, Any]]) -> None:
        self.loaded()
        table = self.query_one("#servers-table", DeckTable)
        for rec, fig in views:
            view = self.views.setdefault(rec.id, ServerView(rec))
            view.rec, view.figures = rec, fig
            if fig is not None:
                view.gen_history.append(fig.generation_tps)
        listed = {rec.id for rec, _ in views}
        for gone in [sid for sid in self.views if sid not in listed]:  # pruned, or its node dropped
            del self.views[gone]
        with self.app.batch_update():
            table.set_rows([(rec.id, self._cells(self.views[rec.id])) for rec, _ in views])
        self._detail()

    def _cells(self, v: ServerView) -> list[Any]:
        from engine.vllm.record import ServerState  # (lazily: loaded by the poll already)

        r, f = v.rec, v.figures
        state = Text(r.state, style=STATE_STYLE.get(r.state, ""))
        node = split_id(r.id)[0] or r.node
        if f is None:
            blanks = ["" if r.state != ServerState.READY else "n/a"] * 9
            return [r.id, node, state, str(r.gpus), str(r.port or ""), *blanks]
        from engine.vllm.status import kv_disagreement  # (lazily: the screens load without httpx)

        alloc = f"{f.kv_tokens:,}" if f.kv_tokens else "n/a"
        plan = f"{r.predicted_kv_tokens:,}" if r.predicted_kv_tokens else "n/a"
        apart = kv_disagreement(f.kv_tokens, r.predicted_kv_tokens)
        # Far apart: the plan no longer describes this server; marked so it is not read as a confirmation.
        cap: Any = Text(f"⚠ {alloc}/{plan} ({apart:.1f}x)", style="bold yellow") if apart else f"{alloc}/{plan}"
        return [
            r.id, node, state, str(r.gpus), str(r.port), _f(f.generation_tps), _f(f.prompt_tps),
            f"{_f(f.running)}/{_f(f.waiting)}", _f(None if f.kv_usage is None else f.kv_usage * 100, unit="%"),
            f"{_ms(f.ttft_p50)}/{_ms(f.ttft_p95)}", f"{_f(f.e2e_p50, '{:.2f}')}/{_f(f.e2e_p95, '{:.2f}')}",
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

    def _detail(self) -> None:
        from engine.vllm.record import ServerState  # (lazily: loaded by the poll already)

        v = self.selected()
        detail = self.query_one("#servers-detail", Static)
        if v is None:
            detail.update("No servers yet. Press [b]s[/b] to start one from a launch profile.")
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
        if v is None or not self._guard() or v.rec.state in ENDED:
            return

        def done(ok: bool | None) -> None:
            if ok:
                self._stop(v.rec)

        self.app.push_screen(ConfirmScreen(f"Stop {v.rec.id} (pid {v.rec.pid}, GPUs {v.rec.gpus})?"), done)

    @work(thread=True, group="servers-action")
    def _stop(self, rec: Any, restart: bool = False) -> None:
        from engine.audit import trail as audit
        from engine.node_ops import ops_for
        from fleet.remote import AgentError

        try:
            ops, sid = ops_for(self._sources(), self._local(), rec.id)
            message = ops.restart_server(rec) if restart else ops.stop_server(sid)
        except (AgentError, audit.ReadOnlyError) as exc:
            message = f"{rec.id}: {exc}"
        except Exception as exc:  # a restart whose start failed: the stop stands
            message = f"{rec.id}: restart failed: {exc}"
        self.app.call_from_thread(self.notify, message)
        self.app.call_from_thread(self.reload)

    def action_restart(self) -> None:
        v = self.selected()
        if v is None or not self._guard():
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
        report_prune(self, lambda: self._local().prune_servers())

    def action_logs(self) -> None:
        v = self.selected()
        if v is not None:
            from engine.node_ops import ops_for
            from fleet.remote import AgentError

            try:
                ops, sid = ops_for(self._sources(), self._local(), v.rec.id)
            except AgentError as exc:
                self.notify(str(exc), severity="warning")
                return
            self.app.push_screen(LogScreen(v.rec.id, v.rec.log_path, lambda: ops.tail_log("server", sid)))

    def action_adapters(self) -> None:
        v = self.selected()
        if v is None:
            self.notify("Select a server first.", severity="warning")
            return
        from engine.node_ops import ops_for
        from fleet.remote import AgentError

        try:
            ops, sid = ops_for(self._sources(), self._local(), v.rec.id)
        except AgentError as exc:
            self.notify(str(exc), severity="warning")
            return
        self.app.push_screen(AdaptersScreen(v.rec, ops, sid))


class StartServerScreen(DeckModal):
    MUTATING = frozenset({"launch"})
    AUTO_FOCUS = "#start-profile"  # not the scrolling frame around the fields (it comes first)
    """Pick a profile and GPUs; see the planner's verdict for exactly those GPUs; then start."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel", id="start.cancel"),
        Binding("ctrl+s", "launch", "Start", id="start.launch"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.verdict: Any = None
        self.profiles: dict[str, Path] = {}
        self.models_of: str | None = "?"  # the node whose models the model list shows (None: this host)

    def compose(self) -> ComposeResult:
        from store.config_files import named_tomls

        self.profiles = named_tomls(self.app.options.folders.profile_roots())
        with VerticalScroll(id="start-server"):
            yield Static("[b]Start a vLLM server[/b]  (Enter plans, ctrl+s starts, Esc cancels)")
            with Horizontal(classes="fit-row"):
                yield Label("Profile ", classes="fit-label")
                yield Select([(n, n) for n in self.profiles], id="start-profile", compact=True, prompt="profile")
            with Horizontal(classes="fit-row"):
                yield Label("GPUs ", classes="fit-label")
                yield Input(placeholder="node/index, e.g. sim-h100-01/3 or 0,1", id="start-gpus", compact=True)
            with Horizontal(classes="fit-row"):
                # The models on the chosen node's disks (HF cache, [models] roots), read there by its agent.
                yield Label("Model ", classes="fit-label")
                yield Select([], id="start-model", compact=True, prompt="the profile's model")
            yield Static("", id="start-verdict")

    def on_mount(self) -> None:
        self._load_models(None)

    def _target_node(self) -> str | None:
        text = self.query_one("#start-gpus", Input).value.strip()
        return text.partition("/")[0] if "/" in text else None

    @work(thread=True, exclusive=True, group="start-models")
    def _load_models(self, node: str | None) -> None:
        """Listing a node's models reads its disks (or asks its agent): never on the UI thread."""
        select = self.query_one("#start-model", Select)
        try:
            ops = self.app.call_from_thread(self._node_ops, node)
            models = [m for m in ops.models() if m.error is None]
        except Exception as exc:  # a node that cannot list (older agent, link down): the profile's model only
            self.app.call_from_thread(self.notify, f"models on {node or 'this host'}: {exc}", severity="warning")
            models = []
        options = [(f"{m.name}  {m.quantization or m.dtype or ''}  {m.context_limit or '?'} ctx", m.name) for m in models]
        self.models_of = node

        def show() -> None:
            keep = select.value
            select.set_options(options)
            if any(value == keep for _, value in options):
                select.value = keep  # the same model is on this node too: the choice stands

        self.app.call_from_thread(show)

    def _over_ssh(self, node: str | None) -> bool:
        from fleet.remote import RemoteNode

        sources = getattr(getattr(self.app, "poller", None), "sources", [])
        return node is not None and any(isinstance(s, RemoteNode) and s.name == node for s in sources)

    def _model(self) -> str | None:
        value = self.query_one("#start-model", Select).value
        return value if isinstance(value, str) else None

    def _gpus(self) -> tuple[list[int], list[Any]]:
        text = self.query_one("#start-gpus", Input).value.strip()
        poller = getattr(self.app, "poller", None)
        snaps = []
        node = None
        if "/" in text:
            node, _, text = text.partition("/")
        from engine.vllm.profile import parse_gpus

        indices = parse_gpus(text)
        if poller is not None:
            known = poller.latest or {}
            if node is not None and node not in known:
                raise ValueError(f"no node {node!r}; the fleet has {', '.join(sorted(known)) or 'no nodes yet'}")
            nodes = [known[node]] if node is not None else list(known.values())[:1]
            for snap in nodes:
                snaps = snap.gpus_at(indices)
        if len(snaps) != len(indices):
            raise ValueError(f"no such GPU(s) {indices} on {node or 'this node'}")
        return indices, snaps

    def _node_ops(self, node: str | None) -> Any:
        """The node's operations: this host's engine, or a node's agent (which plans and starts there)."""
        from engine.node_ops import LocalOps, ops_named

        poller = getattr(self.app, "poller", None)
        config = self.app.options.config
        local = LocalOps(self.app.store, list(config.adapter_roots), model_roots=list(config.models.roots),
                         folders=self.app.options.folders)
        return ops_named(getattr(poller, "sources", []), local, node)

    def _profile_name(self) -> str:
        name = self.query_one("#start-profile", Select).value
        if not isinstance(name, str):
            folders = ", ".join(str(r) for r in self.app.options.folders.profile_roots())
            raise ValueError(f"pick a profile (profile folders: {folders})")
        return name

    def _profile(self) -> Any:
        from engine.vllm.profile import load_profile

        profile = load_profile(self.profiles[self._profile_name()])
        model = self._model()
        return profile.model_copy(update={"model": model}) if model is not None else profile

    @on(Input.Submitted)
    @on(Select.Changed)
    def plan(self) -> None:
        node = self._target_node()
        node = node if self._over_ssh(node) else None  # this host's own sources share its disks
        if node != self.models_of:  # another node: its own disks' models
            self.models_of = node
            self._load_models(node)
        self._plan(launch=False)

    @work(thread=True, exclusive=True, group="start")
    def _plan(self, launch: bool) -> None:
        """Planning may read a local model folder's headers: never on the UI thread."""
        from engine.kvfit.text import render_text
        from engine.vllm.command import LaunchError, preflight
        from store.config_files import ConfigError

        out = self.query_one("#start-verdict", Static)
        try:
            profile = self.app.call_from_thread(self._profile)
            _, snaps = self.app.call_from_thread(self._gpus)
            node = self.app.call_from_thread(self._target_node)
            if self._over_ssh(node) and self.app.call_from_thread(self._model) is not None:
                # A model on another node's disks is read (and planned) there, by its agent, when it starts.
                self.verdict = None
                self.app.call_from_thread(out.update, Text(f"{profile.model}: planned by {node}'s agent from its "
                                                           "own disks when it starts (ctrl+s)"))
                if launch:
                    self._launch_now()
                return
            self.verdict = preflight(profile, snaps)
        except (ValueError, ConfigError, LaunchError) as exc:
            self.verdict = None
            self.app.call_from_thread(out.update, Text(str(exc), style="red"))
            return
        text = render_text(self.verdict)
        if not self.verdict.fits:
            text += "\n\nNot starting it: `fleetdeck serve start --force` overrides the planner."
        self.app.call_from_thread(out.update, Text(text, style="" if self.verdict.fits else "red"))
        if launch and self.verdict.fits:
            self._launch_now()

    def action_launch(self) -> None:
        self._plan(launch=True)

    def _launch_now(self) -> None:
        try:
            indices, snaps = self.app.call_from_thread(self._gpus)
            text = self.app.call_from_thread(lambda: self.query_one("#start-gpus", Input).value)
            node = text.partition("/")[0] if "/" in text else None
            ops = self.app.call_from_thread(self._node_ops, node)
            name = self.app.call_from_thread(self._profile_name)
            model = self.app.call_from_thread(self._model)
            message = ops.start_server(name, indices, gpu_snapshots=snaps, model=model, node=node or self._first_node())
        except Exception as exc:
            self.app.call_from_thread(self.query_one("#start-verdict", Static).update, Text(str(exc), style="red"))
            return
        self.app.call_from_thread(self.dismiss, message)

    def _first_node(self) -> str | None:
        """The node GPUs without a node name are on (the first one the poller knows, as `_gpus` plans)."""
        known = getattr(getattr(self.app, "poller", None), "latest", None) or {}
        return next(iter(known), None)

    def action_cancel(self) -> None:
        self.dismiss(None)


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
            disk.add_columns("On disk", "Rank", "Alpha", "Base model", "MiB", "Version", "Eval", "Compatible")
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
            from engine.node_ops import AdapterListing

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
        self.disk, self.loaded_names = listing.adapters, listing.loaded
        self.integrity, self.accuracy = listing.integrity, listing.accuracy
        disk = self.query_one("#adapters-disk", DataTable)
        disk.clear()
        for a in self.disk:
            issues = self._problems(a)
            version = ("-" if a.version is None else
                       Text("MODIFIED", style="bold red") if self.integrity.get(a.name) else Text("intact", style="green"))
            acc = self.accuracy.get(a.name)
            disk.add_row(a.name, str(a.rank), str(a.alpha or "n/a"), str(a.base_model or "n/a"),
                         f"{a.size_bytes / 1024**2:.1f}", version, f"{acc * 100:.1f}%" if acc is not None else "-",
                         Text("yes", style="green") if not issues else Text("no", style="red"), key=a.name)
        table = self.query_one("#adapters-loaded", DataTable)
        table.clear()
        for name in self.loaded_names:
            table.add_row(name, key=name)
        msg = "\n".join([self.last_message, *listing.problems]).strip()
        self.query_one("#adapters-message", Static).update(msg)

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
                             lambda ok: self._do("unload", name) if ok else None)

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
                             lambda ok: self._do("swap", adapter.name, old) if ok else None)

    def _refuse(self, action: str, adapter: Any, message: str, old: str | None = None) -> None:
        """Refused here, before vLLM is asked: said on screen and recorded like any refusal."""
        from engine.audit import trail as audit

        audit.record(action, adapter.name, "refused", message, server=self.rec.id, adapter=adapter.name,
                     path=adapter.path, old=old)
        self._say(message)

    def _say(self, message: str) -> None:
        self.last_message = message
        self.query_one("#adapters-message", Static).update(message)

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
