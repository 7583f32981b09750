"""The Textual app shell: header with host, clock and SIMULATED badge, the poll loop, the screens.

The poll runs in a thread worker and never overlaps itself: a tick that finds the previous poll still
running is skipped. Only the screen on top renders a new snapshot (background screens keep the data
the poller collected and render it when they come back), the way Dolphie keeps quiet tabs cheap.
"""

from __future__ import annotations

import importlib
import socket
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from engine.host.folders import Folders
from engine.router.config import load_router_settings
from fleet.config import FleetConfig
from fleet.poller import FleetPoller
from fleet.source import NodeSource
from store.analytics import drift_for_tasks, known_tasks
from store.db import StoreError, corrupt_message, is_corrupt, open_store
from tui.chrome import flash_text
from tui.lifetime import Lifetime
from tui.screens.base import StatusLine, read_only

if TYPE_CHECKING:
    from engine.demo.home import DemoHome
    from store.db import Store


@dataclass
class AppOptions:
    sources_factory: Callable[[], list[NodeSource]]
    store_path: Path | None = None
    config: FleetConfig = field(default_factory=FleetConfig)
    simulated: bool = False
    poll: bool = True  # tests drive polls by hand when False
    show_clock: bool = True  # snapshot tests turn the clock off
    router_config: Path | None = None  # pricing, tasks and drift windows for the Router and Cost screens
    demo_backend: bool = False  # `fleetdeck demo`: start simulated router traffic beside the dashboard
    demo_home: DemoHome | None = None  # `fleetdeck demo`: its folder and helper record
    folders: Folders = field(default_factory=Folders)  # where the start dialogs find profiles and specs
    # Ends what the dashboard started for itself (the demo's backend and all under it); called once, on
    # any exit: q, SIGHUP, SIGTERM, the terminal gone.
    end_helpers: Callable[[], object] | None = None
    watch_terminal: bool = False  # a real terminal: SIGHUP/SIGTERM and a hung-up stdin end the dashboard
    start_notice: str | None = None  # said once the dashboard is up (e.g. an earlier demo's leftovers ended)


def _screen(module: str, cls: str) -> Callable[[], Screen[Any]]:
    """A top-level screen made on first visit: its module (and what it imports) loads only then, which
    keeps the dashboard's start fast over SSH."""

    def make() -> Screen[Any]:
        screen: Screen[Any] = getattr(importlib.import_module(f"tui.screens.{module}"), cls)()
        return screen

    return make


def node_trouble(snapshots: Iterable[Any]) -> dict[str, int]:
    """Nodes the header counts as in trouble, by what is wrong: a remote node that cannot be reached (or is still
    connecting, or speaks another protocol) is that, not "without NVML", which is a reachable node's driver."""
    counts: dict[str, int] = {}
    for snap in snapshots:
        if snap.link in ("unreachable", "connecting", "incompatible"):
            what = snap.link
        elif snap.nvml != "ok":
            what = "without NVML"
        else:
            continue
        counts[what] = counts.get(what, 0) + 1
    return counts


class FleetDeckApp(Lifetime, App[None]):
    CSS_PATH = "app.tcss"
    MODES = {
        "fleet": _screen("fleet", "FleetScreen"),
        "fit": _screen("fit", "FitScreen"),
        "servers": _screen("servers", "ServersScreen"),
        "jobs": _screen("jobs", "JobsScreen"),
        "router": _screen("router", "RouterScreen"),
        "cost": _screen("cost", "CostScreen"),
        "audit": _screen("audit", "AuditScreen"),
    }
    DEFAULT_MODE = "fleet"
    TITLE = "fleetdeck"
    ENABLE_COMMAND_PALETTE = True

    # The screens' keys and the global ones are on the screen bar above the footer (tui/chrome.py),
    # so the footer holds only the keys of the screen on top and fits 80 columns.
    BINDINGS = [
        Binding("q", "quit", "Quit", show=False, id="app.quit"),
        Binding("question_mark", "help", "Help", key_display="?", show=False, id="app.help"),
        Binding("colon", "command_palette", "Actions (command palette)", key_display=":", show=False,
                id="app.palette"),
        Binding("1", "show_fleet", "Fleet", show=False, id="app.fleet"),
        Binding("2", "show_fit", "Fit", show=False, id="app.fit"),
        Binding("3", "show_servers", "Servers", show=False, id="app.servers"),
        Binding("4", "show_jobs", "Jobs", show=False, id="app.jobs"),
        Binding("5", "show_router", "Router", show=False, id="app.router"),
        Binding("6", "show_cost", "Cost", show=False, id="app.cost"),
        Binding("7", "show_audit", "Audit", show=False, id="app.audit"),
        Binding("ctrl+r", "poll_now", "Refresh", show=False, id="app.refresh"),
    ]

    def __init__(self, options: AppOptions) -> None:
        super().__init__()
        self.options = options
        self.poller = FleetPoller([], history_every_s=options.config.history_every_s,
                                  record_history=not options.config.read_only)
        self.store: Store | None = None
        self.store_error: str | None = None
        self.store_note: str | None = None  # said once the store is open (a read-only run without one yet)
        self._polling = False
        self.status_text = "starting…"
        self.drifting: set[str] = set()
        self._demo_proc: Any = None
        self._ending = False
        self._ending_lock = threading.Lock()
        self._ender: threading.Thread | None = None
        self._loop_ref: Any = None
        self._exit_asked = False
        self._exit_thread_started = False
        self.sub_title = socket.gethostname()
        self._flashes: list[tuple[float, object]] = []  # (monotonic expiry, Text): what the flash line shows

    def on_mount(self) -> None:
        if self.options.simulated:
            self.sub_title = "SIMULATED FLEET"
        if self.options.watch_terminal:
            self._watch_terminal()
        self.call_after_refresh(self._start)

    def _start(self) -> None:
        self._open_sources()
        if self.options.poll:
            self.set_interval(self.options.config.refresh_s, self.action_poll_now)
            self.set_interval(30.0, self.check_drift)

    @work(thread=True, exclusive=True, group="start")
    def _open_sources(self) -> None:
        """NVML init and the store open can take a moment on a busy host: never on the UI thread."""
        sources = self.options.sources_factory()
        store: Store | None = None
        error = None
        if self.options.store_path is not None:
            try:
                store = self._open_store(self.options.store_path)
            except StoreError as exc:
                error = str(exc)
        with self._ending_lock:
            self.poller.sources = sources
            ending = self._ending
        if ending:  # the ending came while the sources were opening: they stop now, as the others did
            self.poller.close()
        self.poller.store = store
        self.store = store
        if self.options.demo_backend and self.options.demo_home is not None and store is not None:
            self._start_demo_backend(store.path)
        if store is not None:
            try:
                self.poller.seed_history()
            except Exception as exc:  # an unreadable history is not worth stopping for
                error = corrupt_message(store.path, exc) if is_corrupt(exc) else f"GPU history could not be read: {exc}"
        self.call_from_thread(self._sources_ready, error)

    def _open_store(self, path: Path) -> Store:
        """Read-write, created and migrated if need be; read-only (`--read-only`, `read_only = true`): read as it
        is and followed as it changes (store/readview.py), never created, migrated or written, an absent one an
        empty view until a run that writes makes it."""
        if not read_only(self):
            return open_store(path)
        from store.readview import open_read_view

        self.poller.record_history = False  # read-only by the audit trail too, not only by the options
        view = open_read_view(path)
        if view.absent:
            self.store_note = (f"no store at {path} yet: a read-only run does not create one; the dashboard runs "
                               "without history (it reads the store once a run that writes makes it)")
        return view

    @work(thread=True, exclusive=True, group="drift")
    def check_drift(self) -> None:
        """Notify when a task starts (or stops) drifting above its baseline escalation rate."""
        if self.store is None:
            return
        policies = load_router_settings(self.router_config_path()).policies
        now = time.time()
        try:
            names = sorted(set(policies) | set(known_tasks(self.store)))
            drifts = drift_for_tasks(self.store, now, names, policies)
            drifting = {(d.task, d.recent_rate, d.baseline_rate) for d in drifts.values() if d.alert}
        except Exception:
            return
        self.call_from_thread(self._drift_changed, drifting)

    def _drift_changed(self, drifting: set[tuple[str, float, float]]) -> None:
        names = {d[0] for d in drifting}
        for name, recent, base in sorted(drifting):
            if name not in self.drifting:
                self.notify(f"{name}: escalation {recent * 100:.1f}% vs baseline {base * 100:.1f}%",
                            title="Escalation drift", severity="error", timeout=20)
        for name in sorted(self.drifting - names):
            self.notify(f"{name}: escalation back within its baseline band", title="Drift cleared")
        self.drifting = names

    def _sources_ready(self, store_error: str | None) -> None:
        self.store_error = store_error
        if self.options.start_notice:
            self.notify(self.options.start_notice, title="Demo", timeout=15)
        if store_error:
            self.notify(store_error + " The dashboard keeps running without history.", severity="error", timeout=15)
        elif self.store_note:
            self.notify(self.store_note, severity="warning", timeout=15)
        if self.options.poll:
            self.action_poll_now()

    # -- polling --------------------------------------------------------------------------------
    def action_poll_now(self) -> None:
        if self._polling or not self.poller.sources:
            return
        self._polling = True
        self._poll_worker()

    @work(thread=True, group="poll")
    def _poll_worker(self) -> None:
        try:
            self.poller.poll()
        finally:
            self.call_from_thread(self._poll_done)

    def _poll_done(self) -> None:
        self._polling = False
        # A poll that ends while the app shuts down finds its screens gone (or going): nothing to draw on.
        if not self.is_running or not self.screen_stack:
            return
        screen = self.screen
        if screen._pruning or screen._closing:
            return
        self.update_status()
        render = getattr(screen, "render_fleet", None)
        if render is not None:
            render(self.poller)

    def poll_once_sync(self) -> None:
        """For tests: one poll on the calling thread, then render."""
        self.poller.poll()
        self._poll_done()

    def update_status(self) -> None:
        nodes = self.poller.latest
        gpus = sum(len(s.gpus) for s in nodes.values())
        parts = [f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}", f"{gpus} GPU{'s' if gpus != 1 else ''}"]
        parts += [f"[b red]{n} {what}[/]" for what, n in node_trouble(nodes.values()).items()]
        if self.store_error or self.poller.store_error:
            parts.append("[red]store: unavailable[/]")
        elif self.store is not None:
            parts.append("store: none yet" if getattr(self.store, "absent", False) else f"store: {self.store.path.name}")
        badge = " [b reverse yellow] SIMULATED [/]" if self.options.simulated or self.poller.simulated else ""
        if read_only(self):
            badge += " [b reverse cyan] READ-ONLY [/]"
        self.status_text = " · ".join(parts) + badge
        for line in self.screen.query(StatusLine):
            line.update(self.status_text)

    # -- actions --------------------------------------------------------------------------------
    def action_help(self) -> None:
        from tui.screens.help import HelpScreen  # a screen's module loads on first use, as _screen's do

        self.push_screen(HelpScreen(self.describe_bindings()))

    def describe_bindings(self) -> list[tuple[str, str, str]]:
        """(key, description, scope) of fleetdeck's own bindings active now (those with an id)."""
        rows: list[tuple[str, str, str]] = []
        seen: set[str] = set()
        for active in self.active_bindings.values():
            b = active.binding
            if not b.id or not b.description or b.id in seen:
                continue
            seen.add(b.id)
            prefix = b.id.split(".", 1)[0]
            scope = {"app": "everywhere", "table": "tables"}.get(prefix, prefix.capitalize())
            rows.append((b.key_display or self.get_key_display(b), b.tooltip or b.description, scope))
        rows.append(("ctrl+p", "Command palette", "everywhere"))
        rows.sort(key=lambda r: (r[2] != "everywhere", r[2], r[0]))
        return rows

    def action_show_fleet(self) -> None:
        self.switch_to("fleet")

    def action_show_fit(self) -> None:
        self.switch_to("fit")

    def action_show_servers(self) -> None:
        self.switch_to("servers")

    def action_show_jobs(self) -> None:
        self.switch_to("jobs")

    def action_show_router(self) -> None:
        self.switch_to("router")

    def action_show_cost(self) -> None:
        self.switch_to("cost")

    def action_show_audit(self) -> None:
        self.switch_to("audit")

    def router_config_path(self) -> Path | None:
        return self.options.router_config

    def switch_to(self, name: str) -> None:
        """Go to a top-level screen (a Textual mode: each is created on its first visit and keeps its
        state between visits); a dialog or detail open over the current one is closed first."""
        while len(self.screen_stack) > 1:
            self.pop_screen()
        self.switch_mode(name)

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield from self.screen_actions(screen)
        yield SystemCommand("Fleet (1)", "Every GPU of every node", self.action_show_fleet)
        yield SystemCommand("Fit (2)", "Will this model fit, and how many requests will it hold", self.action_show_fit)
        yield SystemCommand("Servers (3)", "vLLM servers: state, throughput, adapters", self.action_show_servers)
        yield SystemCommand("Jobs (4)", "Fine-tunes: progress, loss, cancel, resume, serve", self.action_show_jobs)
        yield SystemCommand("Router (5)", "Escalation rate per task, drift, calibration", self.action_show_router)
        yield SystemCommand("Cost (6)", "Month to date against all-frontier, last 12 months", self.action_show_cost)
        yield SystemCommand("Audit (7)", "Who changed what on this node, and whether the record is intact",
                            self.action_show_audit)
        yield SystemCommand("Refresh now (ctrl+r)", "Poll every node immediately", self.action_poll_now)
        yield SystemCommand("Keys (?)", "Every key and what it does", self.action_help)

    def screen_actions(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        """Every action of the screen below the palette (and of its focused table), with its key, as the
        palette's commands: what the footer shows and what it had no room for. Actions the screen
        refuses now (read-only) are left out."""
        seen: set[str] = set()
        for namespace, bindings in screen._binding_chain:
            if namespace is self or namespace is screen.app:
                continue  # the app's own: listed with their own names below
            for key_bindings in bindings.key_to_bindings.values():
                for b in key_bindings:
                    if not b.id or not b.description or b.id in seen or b.id in ("table.down", "table.up"):
                        continue
                    seen.add(b.id)
                    name = b.action.split("(", 1)[0]
                    if not namespace.check_action(name, ()):
                        continue
                    key = b.key_display or self.get_key_display(b)
                    where = getattr(screen, "PALETTE_SCOPE", None) or type(screen).__name__.removesuffix("Screen")
                    # The palette searches titles: the longer description goes there too ("calib" finds Apply).
                    more = f": {b.tooltip[0].lower()}{b.tooltip[1:]}" if b.tooltip else ""
                    yield SystemCommand(f"{b.description} ({key}){more}", f"{where}, key {key}",
                                        partial(self.run_action, b.action, namespace))
        for title, help_text, action in getattr(screen, "PALETTE_EXTRA", ()):
            if screen.check_action(action.split("(", 1)[0], ()):
                yield SystemCommand(title, help_text, partial(self.run_action, action, screen))

    def action_help_quit(self) -> None:
        """ctrl+c: Textual's own answer named ctrl+q, in raw markup on the message line ("Press [b]ctrl+q[/b]
        to quit the app"); fleetdeck's quit is q, which also ends the demo's helpers."""
        self.notify("ctrl+c does not quit fleetdeck (in a text field it copies): press q to quit.", severity="warning")

    # -- messages: a line of their own, never over the content ------------------------------------
    def notify(self, message: str, *, title: str = "", severity: str = "information",
               timeout: float | None = None, markup: bool = True) -> None:
        """Every message carries dynamic text (ids, paths, a node's or vLLM's error): shown literally, never read
        as markup, so "[serve]" in a message stays "[serve]". Screens' notify() lands here too."""
        markup = False
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)  # type: ignore[arg-type]
        seconds = self.NOTIFICATION_TIMEOUT if timeout is None else timeout
        self._flashes.append((time.monotonic() + seconds, flash_text(message, title, severity, markup)))
        self._show_flashes()
        self.set_timer(seconds + 0.1, self._show_flashes)

    def live_flashes(self) -> list[object]:
        now = time.monotonic()
        self._flashes = [(t, text) for t, text in self._flashes if t > now]
        return [text for _, text in self._flashes]

    def _show_flashes(self) -> None:
        show = getattr(self.screen, "show_flashes", None)
        if show is not None:
            show(self.live_flashes())

    def on_unmount(self) -> None:
        # The helpers are ended by end_helpers(), which `fleetdeck` calls once the terminal is restored
        # (so quitting never shows a frozen screen while the demo's servers stop).
        self.poller.close()
        if self.store is not None:
            self.store.close()
