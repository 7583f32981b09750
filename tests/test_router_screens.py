"""The Router and Cost screens through Pilot, on a store back-filled with a month of router history."""

from __future__ import annotations

import time

import pytest
from textual.widgets import DataTable, Static

from engine.router.demo import DEMO_TASKS
from store.db import open_store
from tests.helpers import router_history
from tests.tui_helpers import drain, make_app, ready, settle, static_text, until
from tui.screens.confirm import ConfirmScreen
from tui.screens.cost import CostScreen
from tui.screens.router import RouterScreen


@pytest.fixture
def router_store(tmp_path):
    return router_history(tmp_path)


async def _open(app, pilot, key: str):
    await ready(app, pilot)
    await pilot.press(key)
    await settle(app, pilot)
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
        await drain(app)
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
        await until(app, pilot, lambda: app.drifting == {"triage-alerts"}, "drift noticed")
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


async def test_the_side_panels_30_day_figure_is_the_30d_columns_and_the_axis_says_days_ago(router_store):
    from tui.format import ago, ago_ticks

    path, cfg = router_store
    app = make_app(store_path=path)
    app.options.router_config = cfg
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _open(app, pilot, "5")
        await pilot.press("m")  # the 30-day window
        await settle(app, pilot)
        table = screen.query_one("#router-tasks", DataTable)
        column = str(table.get_cell(screen.selected, "r30"))
        panel = static_text(screen.query_one("#router-detail", Static))
        assert f"last 30 days: {column} escalated of" in panel, panel
        import re

        chart = re.sub(r"\x1b\[[0-9;]*m", "", screen.query_one("#router-chart").plt.build())
        assert "30d ago" in chart and "now" in chart and "-720" not in chart and "hours ago" not in chart
    assert ago(-720 * 3600) == "30d ago" and ago(-90 * 60) == "1.5h ago" and ago(0) == "now"
    assert ago_ticks(3600)[1] == ["1h ago", "45m ago", "30m ago", "15m ago", "now"]


async def test_a_toast_shows_its_text_literally():
    from textual.widgets._toast import Toast

    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(app, pilot)
        app.screen.notify("[serve] qwen-1a2b started on [b]GPU 3[/b]")
        await pilot.pause()
        await pilot.pause()
        (note,) = [n for n in app._notifications if "qwen-1a2b" in n.message]
        assert not note.markup  # the toast shows it as text
        assert str(Toast(note).render()) == "[serve] qwen-1a2b started on [b]GPU 3[/b]"


def test_the_header_counts_an_unreachable_node_as_unreachable():
    from fleet.model import NodeSnapshot
    from tui.app import node_trouble

    snaps = [NodeSnapshot(node="a", taken_at=0, nvml="ok"),
             NodeSnapshot(node="b", taken_at=0, nvml="unavailable", reason="no driver"),
             NodeSnapshot(node="c", taken_at=0, nvml="unavailable", reason="unreachable since 10:00", link="unreachable"),
             NodeSnapshot(node="d", taken_at=0, nvml="unavailable", reason="connecting", link="connecting")]
    assert node_trouble(snaps) == {"without NVML": 1, "unreachable": 1, "connecting": 1}


async def test_the_side_panel_says_what_a_streamed_decision_waits_for(router_store):
    import re

    path, cfg = router_store
    # extract-fields (selected first: names sort) decides on the whole answer, so its streams buffer.
    text, n = re.subn(r'(name = "extract-fields"\n(?:[^\[\n]*\n)*?)confidence = "first_token"',
                      r'\1confidence = "mean_token"', cfg.read_text())
    assert n == 1
    cfg.write_text(text)
    app = make_app(store_path=path)
    app.options.router_config = cfg
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _open(app, pilot, "5")
        assert screen.selected == "extract-fields"
        windows = {r.name: r.window for r in screen.data.rows}
        assert windows["extract-fields"] == "whole_answer" and windows["ticket-routing"] == "first_token"
        panel = static_text(screen.query_one("#router-detail", Static))
        assert "streamed: decided on the whole answer — buffers it" in panel, panel
