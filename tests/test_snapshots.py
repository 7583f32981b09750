"""Every top-level screen (and the start dialog, and the keys' help) at 80x24 and 120x40, from one app factory on the simulated
fleet with a seeded store: fixed time, fixed data, no clock, nothing running."""

from __future__ import annotations

import time as real_time
from types import SimpleNamespace

import pytest

from tests.tui_helpers import FIXED_NOW, make_app, ready, seeded_store, settle

SCREENS = [("fleet", "1"), ("fit", "2"), ("servers", "3"), ("jobs", "4"), ("router", "5"), ("cost", "6"),
           ("audit", "7"), ("start-dialog", "3s"), ("help", "?")]
SIZES = [(80, 24), (120, 40)]


@pytest.fixture
def fixed_time(monkeypatch):
    """The screens that read the clock for their windows read FIXED_NOW; times shown in UTC."""
    import tui.screens.audit
    import tui.screens.cost
    import tui.screens.router

    clock = SimpleNamespace(time=lambda: FIXED_NOW, monotonic=real_time.monotonic)
    for module in (tui.screens.audit, tui.screens.cost, tui.screens.router):
        monkeypatch.setattr(module, "time", clock)
    monkeypatch.setenv("TZ", "UTC")
    real_time.tzset()
    yield
    monkeypatch.undo()
    real_time.tzset()


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
@pytest.mark.parametrize("name,keys", SCREENS, ids=[n for n, _ in SCREENS])
def test_snapshot(snap_compare, tmp_path, fixed_time, name, keys, size):
    app = make_app(store_path=seeded_store(tmp_path / "fd.db"))

    async def run_before(pilot) -> None:
        await ready(pilot.app, pilot)
        for key in keys:
            await pilot.press(key)
            await settle(pilot.app, pilot)
        await settle(pilot.app, pilot)

    assert snap_compare(app, terminal_size=size, run_before=run_before)
