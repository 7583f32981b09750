"""One app factory for the UI tests and snapshots (the Posting way)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from fleet.config import FleetConfig
from fleet.simulated import demo_fleet
from tui.app import AppOptions, FleetDeckApp

FIXED_NOW = 1_790_000_000.0


def make_app(
    sources_factory: Callable[[], list] | None = None,
    store_path: Path | None = None,
    simulated: bool = True,
    show_clock: bool = False,
) -> FleetDeckApp:
    factory = sources_factory or (lambda: list(demo_fleet(clock=lambda: FIXED_NOW)))
    return FleetDeckApp(
        AppOptions(
            sources_factory=factory,
            store_path=store_path,
            config=FleetConfig(),
            simulated=simulated,
            poll=False,
            show_clock=show_clock,
        )
    )


async def ready(app: FleetDeckApp, pilot) -> None:
    """Wait until the sources are open, then take one poll synchronously."""
    await pilot.pause()
    await drain(app)
    await pilot.pause()
    app.poll_once_sync()
    await pilot.pause()


def static_text(widget) -> str:
    """The text a Static shows, whether it holds markup or a Rich renderable."""
    from rich.console import Console

    content = widget.content
    if isinstance(content, str):
        from rich.text import Text

        return Text.from_markup(content).plain
    console = Console(width=160, record=True, file=open("/dev/null", "w"))
    console.print(content)
    return console.export_text()


async def drain(app) -> None:
    """Wait for the workers running now. One cancelled meanwhile (an exclusive worker replaced by a newer
    one, as a reload does) is not an error here: its replacement is among those waited for."""
    from textual.worker import WorkerCancelled, WorkerState

    for worker in list(app.workers):
        if worker.state == WorkerState.PENDING:
            continue
        try:
            await worker.wait()
        except WorkerCancelled:
            pass


async def settle(app, pilot, rounds: int = 3) -> None:
    """Let the app run its messages and current workers a few times (for what follows from a key press).
    Where the test then needs a particular result, wait for it with `until`, not with more rounds."""
    for _ in range(rounds):
        await pilot.pause()
        await drain(app)
    await pilot.pause()


async def until(app, pilot, cond, what: str = "") -> None:
    """Let the app run (its messages and workers) until `cond()` holds. A worker may start another (a
    load then a reload), so no fixed number of rounds is enough on a slow machine; the ceiling is only
    a safety net so that a real hang fails the test instead of stalling it."""
    import time

    from tests.helpers import WAIT_CEILING_S

    deadline = time.monotonic() + WAIT_CEILING_S
    while not cond():
        assert time.monotonic() < deadline, f"never happened: {what or cond}"
        await pilot.pause(0.02)
        await drain(app)


async def open_screen(app: FleetDeckApp, pilot, key: str, cls: type) -> object:
    """Press a top-level screen's key, let its first load land, and return it (asserting its class)."""
    await ready(app, pilot)
    await pilot.press(key)
    await settle(app, pilot)
    assert isinstance(app.screen, cls), app.screen
    return app.screen


async def press_and_confirm(app: FleetDeckApp, pilot, key: str) -> None:
    """Press an action's key, check that it asks first, and say yes."""
    from tui.screens.confirm import ConfirmScreen

    await pilot.press(key)
    # A question may come from a worker that first reads something.
    await until(app, pilot, lambda: isinstance(app.screen, ConfirmScreen), f"a question after {key!r}")
    await pilot.press("y")
