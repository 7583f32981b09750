"""The Router and Cost screens through Pilot, on a store back-filled with a month of router history."""

from __future__ import annotations

import time

import pytest
from textual.widgets import DataTable, Static

from engine.router.demo import DEMO_TASKS, backfill, demo_router_toml
from store.db import open_store
from tests.tui_helpers import make_app, ready, static_text
from tui.screens.confirm import ConfirmScreen
from tui.screens.cost import CostScreen
from tui.screens.router import RouterScreen


@pytest.fixture
def router_store(tmp_path):
    path = tmp_path / "fd.db"
    store = open_store(path)
    backfill(store, time.time(), days=8, daily_only_days=20, minute_hours=2)
    store.close()
    cfg = tmp_path / "router.toml"
    cfg.write_text(demo_router_toml("http://127.0.0.1:9", 4000))
    return path, cfg


async def _open(app, pilot, key: str):
    await ready(app, pilot)
    await pilot.press(key)
    for _ in range(3):
        await pilot.pause()
        await app.workers.wait_for_complete()
    await pilot.pause()
    return app.screen


async def test_router_screen_shows_every_task_and_flags_the_drifting_one(router_store):
    path, cfg = router_store
    app = make_app(store_path=path)
    app.options.router_config = cfg
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await _open(app, pilot, "5")
        assert isinstance(screen, RouterScreen)
        table = screen.query_one("#router-tasks", DataTable)
        assert [r.key.value for r in table.ordered_rows] == sorted(t.name for t in DEMO_TASKS)
        alerts = {r.name for r in screen.data.rows if r.alert}
        assert alerts == {"triage-alerts"}
        assert str(table.get_cell("triage-alerts", "task")).startswith("▲")
        ticket = next(r for r in screen.data.rows if r.name == "ticket-routing")
        assert ticket.rate_30d == pytest.approx(0.08, abs=0.01) and ticket.threshold == 0.85
        assert ticket.escalations_24h["low confidence"] > 0 and ticket.escalations_24h["forced"] == 0
        await pilot.press("m")
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert len(screen.data.series) > 100  # hourly points over 8 days of history
        await pilot.press("a")  # no calibration yet: a warning, nothing written
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)


async def test_drift_raises_a_notification(router_store):
    path, cfg = router_store
    app = make_app(store_path=path)
    app.options.router_config = cfg
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(app, pilot)
        app.check_drift()
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.drifting == {"triage-alerts"}
        assert any("triage-alerts" in n.message for n in app._notifications)


async def test_cost_screen_shows_month_to_date_and_twelve_months(router_store):
    path, cfg = router_store
    app = make_app(store_path=path)
    app.options.router_config = cfg
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await _open(app, pilot, "6")
        assert isinstance(screen, CostScreen)
        report = screen.data.report
        assert report.requests > 0 and report.savings_usd > 0
        text = static_text(screen.query_one("#cost-summary", Static))
        assert "total" in text and "saved" in text and "$" in text
        assert len(screen.data.history) == 12
        assert screen.query_one("#cost-tasks", DataTable).row_count == len(DEMO_TASKS)


async def test_router_screen_without_traffic_says_so(tmp_path):
    app = make_app(store_path=tmp_path / "empty.db")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _open(app, pilot, "5")
        assert "No router traffic" in static_text(screen.query_one("#router-detail", Static))


async def test_rows_waiting_in_the_proxys_journal_are_shown(router_store):
    """The proxy could not write the store (or was killed first): the operator sees how many rows wait."""
    import json
    import os

    from store.ledger import journal_path

    path, cfg = router_store
    journal = journal_path(open_store(path))
    journal.write_text("".join(json.dumps({"id": f"j{i}", "ts": 1.0, "task": "t", "route": "slm", "escalated": False,
                                           "reason": "confident", "status": 200}) + "\n" for i in range(37)))
    os.utime(journal, (time.time() - 60, time.time() - 60))
    app = make_app(store_path=path)
    app.options.router_config = cfg
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await _open(app, pilot, "5")
        assert screen.data.ledger_backlog == 37
        assert "37 request row(s) not yet in the store" in static_text(screen.query_one("#router-detail", Static))
