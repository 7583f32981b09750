"""What every full screen shares: header (title, host, clock), the status line, the footer of keys."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from rich.text import Text
from textual import events, getters
from textual.binding import Binding
from textual.app import ComposeResult
from textual.dom import DOMNode
from textual.message_pump import MessagePump
from textual.screen import ModalScreen, Screen
from textual.containers import Horizontal
from textual.widgets import Footer, Header, Static

from tui.screens.confirm import ConfirmScreen
from tui.table import DeckTable, highlighted_key as highlighted_key  # noqa: F401 (the screens import it from here)

if TYPE_CHECKING:
    from store.db import Store
    from tui.app import FleetDeckApp
    from tui.chrome import FilterBar


class StatusLine(Static):
    """Node and GPU counts, store state, and the SIMULATED badge when the fleet is simulated."""


class _DeckApp(getters.app["FleetDeckApp"]):
    """`self.app` typed as the dashboard's app: Textual's `getters.app`, which checks the type when read, with
    the class looked up on first read, because tui.app imports this module (FleetDeckApp does not exist yet when
    the screens below are defined)."""

    def __init__(self) -> None:  # getters.app.__init__ wants the class itself, now
        pass

    def __get__(self, obj: MessagePump, obj_type: type[MessagePump]) -> FleetDeckApp:
        from tui.app import FleetDeckApp

        return getters.app(FleetDeckApp).__get__(obj, obj_type)


def while_attached(widget: DOMNode, fn: Callable[..., None]) -> Callable[..., None]:
    """`fn`, run only while `widget` is still in the app and not on its way out. A worker's results reach the
    UI thread through call_from_thread; by then the screen may be gone (closed, or the app quitting), and its
    queries would fail with NoMatches, which Textual raises as the app's own error. A screen being removed is
    still attached while Textual takes its children away first (the app quitting removes every screen so):
    Textual marks it `_pruning` from the start of that removal (8.2, App._prune), so that is checked too; the
    CI run of d6d46c3 lost the jobs table in that window."""

    def run(*args: Any) -> None:
        if widget.is_attached and not (widget._pruning or widget._closing or widget._closed):
            fn(*args)

    return run


def read_only(app: FleetDeckApp) -> bool:
    """Read-only from the fleet config or `--read-only` (the app's options) or the audit trail's mode."""
    from engine.audit import trail as audit

    return app.options.config.read_only or audit.is_read_only()


class ReadOnlyAware(MessagePump):
    """Screens whose keys change a node list those actions; read-only shows them disabled and never runs them.
    Every screen and dialog of the dashboard derives from this (before Textual's Screen, which is a MessagePump
    too), so here `self.app` gets its real type."""

    MUTATING: ClassVar[frozenset[str]] = frozenset()
    app = _DeckApp()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in self.MUTATING and read_only(self.app):
            return None
        return True

    def on_key(self, event: events.Key) -> None:
        """A key whose action read-only disables comes here (Textual skips the binding): said, not ignored.
        In `fleetdeck demo --read-only`, s and x on Servers did nothing and said nothing."""
        if not self.MUTATING or not read_only(self.app):
            return
        for binding in getattr(self, "BINDINGS", []):
            if isinstance(binding, Binding) and event.key in binding.key.split(",") \
                    and binding.action.split("(", 1)[0] in self.MUTATING:
                event.stop()
                self.app.notify(f"Read-only mode: {binding.description or binding.action} is disabled "
                                "(this dashboard changes nothing on a node).", severity="warning")
                return


class DeckScreen(ReadOnlyAware, Screen[None]):
    """Header, status line, the screen's body, then (80x24 first) the filter bar when a `/` filter is
    on, the flash line while a message lasts, the bar of screens and global keys, and a compact
    footer of this screen's own keys."""

    def compose(self) -> ComposeResult:
        from tui.chrome import FilterBar, FlashLine, ScreenBar

        yield Header(show_clock=self.app.options.show_clock)
        yield StatusLine(self.app.status_text, id="status", markup=True)
        yield from self.compose_body()
        with Horizontal(id="filter-row") as row:  # "/ text": the filter in force, while it is
            row.display = False
            yield Static("/ ", id="filter-mark")
            yield FilterBar(id="filter-bar")
        flash = FlashLine("", id="flash")
        flash.display = False
        yield flash
        yield ScreenBar(self.app.current_mode, id="screen-bar")
        yield Footer(compact=True, show_command_palette=False)

    def compose_body(self) -> ComposeResult:
        yield from ()

    @property
    def filter_bar(self) -> FilterBar | None:
        from tui.chrome import FilterBar

        found = self.query(FilterBar)
        return found.first() if found else None

    def open_filter(self, table: DeckTable) -> None:
        bar = self.filter_bar
        if bar is not None:
            bar.open(table)

    def show_flashes(self, flashes: list[Text]) -> None:
        from tui.chrome import FlashLine

        for line in self.query(FlashLine):
            line.show(flashes)

    def on_screen_resume(self) -> None:
        flashes = getattr(self.app, "live_flashes", None)
        if flashes is not None:
            self.show_flashes(flashes())


class PolledScreen(DeckScreen):
    """A screen that re-reads its figures in a worker every `refresh_s` while it is on top.

    Subclasses implement `load(store)` (start a thread worker that ends by calling `loaded()` on the
    UI thread) and may override `no_store()` and `focus_first()`. A tick that finds the previous load
    still running is skipped, so loads never overlap.
    """

    NO_STORE = "No store: this screen reads the store (see --store)."
    FOCUS: str | None = None

    def __init__(self, refresh_s: float) -> None:
        super().__init__()
        self.refresh_s = refresh_s
        self._loading = False

    @property
    def store(self) -> Store | None:
        return self.app.store

    def on_mount(self) -> None:
        if self.FOCUS:
            self.query_one(self.FOCUS).focus()
        self.set_interval(self.refresh_s, self.reload)
        self.reload()

    def on_screen_resume(self) -> None:
        self.reload()

    def reload(self) -> None:
        if not self.is_current or self._loading:
            return
        if self.store is None:
            self.no_store()
            return
        self._loading = True
        self.load(self.store)

    def loaded(self) -> None:
        self._loading = False

    def load(self, store: Store) -> None:
        raise NotImplementedError

    def no_store(self) -> None:
        self.notify(self.NO_STORE, severity="warning")


def store_of(app: Any) -> Store:
    """The dashboard's store for an action that needs one; StoreError (one line: what to do) when none is open."""
    from store.db import StoreError

    if app.store is None:
        raise StoreError(PolledScreen.NO_STORE)
    store: Store = app.store
    return store


def ask_to_prune(screen: Screen[Any], ended: list[str], what: str, stays: str, nothing: str,
                 prune: Callable[[], object]) -> None:
    """Ask before forgetting the ended runs of this host (`ended`, their ids; `what`: "server(s)", "job(s)");
    `stays` says what is left on disk, `nothing` what to say when none has ended. `prune` starts the screen's
    prune worker (a thread that ends in `report_prune`)."""
    if not ended:
        screen.notify(nothing)
        return
    screen.app.push_screen(ConfirmScreen(f"Forget {len(ended)} ended {what} ({', '.join(ended[:3])}"
                                         f"{', ...' if len(ended) > 3 else ''})? {stays}"),
                           on_yes(prune))


def on_yes(action: Callable[[], object]) -> Callable[[bool | None], None]:
    """A confirm dialog's callback that runs `action` (often a worker, whose handle nobody needs) on yes."""

    def answered(ok: bool | None) -> None:
        if ok:
            action()

    return answered


def report_prune(screen: PolledScreen, prune: Callable[[], str]) -> None:
    """The body of a prune worker (a thread): run it, say what it did (or why read-only refused it) as plain
    text (ids are never markup), and re-read the screen."""
    from engine.audit import trail as audit

    try:
        message = prune()
    except audit.ReadOnlyError as exc:
        message = str(exc)
    screen.app.call_from_thread(screen.notify, message, markup=False)
    screen.app.call_from_thread(while_attached(screen, screen.reload))


class DeckModal(ReadOnlyAware, ModalScreen[Any]):
    """A dialog whose confirm key changes a node (start a server, start a job)."""


class LaunchGate:
    """Esc and a start in flight, settled once (the start dialogs plan, then start, in a worker thread).

    Esc while the plan still runs cancels the start for good: the worker finds the gate closed and starts
    nothing (before, the dialog closed on Esc and the server started anyway, its message arriving after).
    Esc once the start has begun is refused with a word: what is under way cannot be taken back from
    here. A second ctrl+s while one start runs starts nothing more (an exclusive worker is only marked
    cancelled; its thread goes on)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = "open"  # open | cancelled | launching

    def cancel(self) -> bool:
        """Esc: True if nothing was started (and nothing will be); False while a start is under way."""
        with self._lock:
            if self.state == "launching":
                return False
            self.state = "cancelled"
            return True

    def begin(self) -> bool:
        """The worker, just before starting: True if it may start (and no other start may, until `end`)."""
        with self._lock:
            if self.state != "open":
                return False
            self.state = "launching"
            return True

    def end(self) -> None:
        """A start that failed: the dialog stays, and another try may start."""
        with self._lock:
            if self.state == "launching":
                self.state = "open"

    def refused(self, where: Any, what: str) -> None:
        """Esc refused: said in the dialog itself (the message line is under the dialog)."""
        where.update(Text(f"Starting {what} already: it is listed when it has started, or this says why not.",
                          style="yellow"))


def dialog_gpus(text: str) -> list[int]:
    """GPU indices typed in a dialog, with the dialog's words on a mistake (the command line's parser
    says "--gpus takes ...", a flag the dialog's operator never typed)."""
    from engine.vllm.profile import parse_gpus

    try:
        return parse_gpus(text)
    except ValueError:
        raise ValueError(f"GPUs are distinct indices like 0 or 0,1 (after node/ for a node); got {text!r}") from None


def nodes_away(sources: Any) -> set[str]:
    """The nodes over SSH that are not connected now (reconnecting, or down): their rows are kept, marked
    unreachable, rather than dropped from the Servers and Jobs tables until they answer again."""
    from fleet.remote import RemoteNode

    return {str(s.name) for s in sources if isinstance(s, RemoteNode) and s.link.status != "connected"}
