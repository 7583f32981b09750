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
    await app.workers.wait_for_complete()
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


async def settle(app, pilot, rounds: int = 3) -> None:
    for _ in range(rounds):
        await pilot.pause()
        await app.workers.wait_for_complete()
    await pilot.pause()


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
    for _ in range(50):  # a question may come from a worker that first reads something
        await pilot.pause()
        if isinstance(app.screen, ConfirmScreen):
            break
        await app.workers.wait_for_complete()
    assert isinstance(app.screen, ConfirmScreen), app.screen
    await pilot.press("y")
