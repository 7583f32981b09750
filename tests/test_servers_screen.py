"""The Servers screen through Pilot: live figures from a real (fake) vLLM, stop with confirmation, adapters."""

from __future__ import annotations


import pytest
from textual.widgets import DataTable

from engine.audit import trail as audit
from engine.vllm import launcher
from fleet.config import FleetConfig
from store.db import open_store
from tests.helpers import FAKE_VLLM_CMD, WAIT_CEILING_S, h100, make_adapter, profile
from tests.tui_helpers import make_app, open_dialog, open_screen, press_and_confirm, ready, settle, static_text, until
from tui.screens.confirm import ConfirmScreen
from tui.screens.servers import AdaptersScreen, ServersScreen


@pytest.fixture
def running(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETDECK_VLLM", FAKE_VLLM_CMD)
    monkeypatch.setenv("FLEETDECK_SIM_START_DELAY", "0.2")
    store = open_store(tmp_path / "fd.db")
    rec, _ = launcher.start(store, profile(), [0], gpu_snapshots=[h100()], log_dir=tmp_path)
    rec = launcher.wait_ready(store, rec, timeout=WAIT_CEILING_S, poll=0.1)
    assert rec.state == "ready", rec.reason
    yield tmp_path / "fd.db", rec
    for r in launcher.list_servers(store):
        if r.state not in ("stopped", "crashed"):
            launcher.stop(store, r, timeout=5)


async def test_servers_screen_shows_state_and_figures_then_stops_after_confirmation(running):
    path, rec = running
    app = make_app(store_path=path)
    with audit.session(path, "tui"):  # as `fleetdeck` runs the app: its changes are audited
        await _stop_from_the_screen(app, rec, path)
    (record,) = audit.query(open_store(path))
    assert (record["action"], record["target"], record["outcome"], record["source"]) == ("server.stop", rec.id, "done", "tui")


async def _stop_from_the_screen(app, rec, path):
    async with app.run_test(size=(140, 30)) as pilot:
        screen = await open_screen(app, pilot, "3", ServersScreen)
        screen.reload()  # a second scrape gives rates
        await settle(app, pilot)
        table = screen.query_one("#servers-table", DataTable)
        assert str(table.get_cell(rec.id, "state")) == "ready"
        assert str(table.get_cell(rec.id, "cap")).startswith("476,016/")  # allocated vs planned KV tokens
        await pilot.press("l")
        await settle(app, pilot)
        assert "Starting vLLM API server" in static_text(app.screen.query_one("#log-text"))
        await pilot.press("escape")
        await pilot.pause()
        await press_and_confirm(app, pilot, "x")
        await settle(app, pilot, 5)
        assert launcher.get(open_store(path), rec.id).state == "stopped"


async def test_adapters_panel_lists_compatibility_and_loads(running, tmp_path):
    path, rec = running
    root = tmp_path / "adapters"
    make_adapter(root, "tickets-v1")
    make_adapter(root, "too-wide", rank=128)
    app = make_app(store_path=path)
    app.options.config = FleetConfig(adapter_roots=[root])
    with audit.session(path, "tui"):
        await _load_two(app, pilot_size=(140, 34))
    # One record each: the load, and the refusal made before vLLM was asked.
    records = [(r["action"], r["target"], r["outcome"]) for r in reversed(audit.query(open_store(path)))]
    assert records == [("adapter.load", "tickets-v1", "done"), ("adapter.load", "too-wide", "refused")]


async def _load_two(app, pilot_size):
    async with app.run_test(size=pilot_size) as pilot:
        await ready(app, pilot)
        await pilot.press("3")
        await settle(app, pilot)
        await pilot.press("a")
        await until(app, pilot, lambda: isinstance(app.screen, AdaptersScreen) and app.screen.disk, "the listing")
        panel = app.screen
        disk = panel.query_one("#adapters-disk", DataTable)
        assert str(disk.get_cell("too-wide", disk.ordered_columns[1].key)) == "no"
        assert str(disk.get_cell("tickets-v1", disk.ordered_columns[1].key)) == "yes"
        await pilot.press("enter")  # loads the highlighted (first) adapter: tickets-v1
        # The load's worker asks vLLM, then starts the listing's reload: wait for what it shows.
        await until(app, pilot, lambda: panel.loaded_names == ["tickets-v1"], "tickets-v1 loaded")
        await settle(app, pilot)
        assert panel.loaded_names == ["tickets-v1"]
        await pilot.press("down", "enter")  # too-wide: refused before asking vLLM
        await until(app, pilot, lambda: "above the server's max LoRA rank" in panel.last_message, "the refusal")


async def test_read_only_mode_refuses_actions(running):
    path, rec = running
    app = make_app(store_path=path)
    app.options.config = FleetConfig(read_only=True)
    async with app.run_test(size=(140, 30)) as pilot:
        await ready(app, pilot)
        await pilot.press("3")
        await settle(app, pilot)
        await pilot.press("x")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)


def test_kv_allocated_and_planned_far_apart_is_a_disagreement():
    from engine.vllm.status import kv_disagreement

    assert kv_disagreement(476_016, 400_000) is None  # within 1.5x: agrees
    assert kv_disagreement(200_000, 460_000) == pytest.approx(2.3)
    assert kv_disagreement(460_000, 200_000) == pytest.approx(2.3)  # either way round
    assert kv_disagreement(None, 460_000) is None and kv_disagreement(460_000, 0) is None


async def test_servers_screen_marks_kv_allocated_far_from_the_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETDECK_VLLM", FAKE_VLLM_CMD)
    monkeypatch.setenv("FLEETDECK_SIM_START_DELAY", "0.2")
    monkeypatch.setenv("FLEETDECK_SIM_NUM_GPU_BLOCKS", "1000")  # vLLM found far less room than planned
    store = open_store(tmp_path / "fd.db")
    rec, _ = launcher.start(store, profile(), [0], gpu_snapshots=[h100()], log_dir=tmp_path)
    try:
        rec = launcher.wait_ready(store, rec, timeout=WAIT_CEILING_S, poll=0.1)
        app = make_app(store_path=tmp_path / "fd.db")
        async with app.run_test(size=(200, 30)) as pilot:
            screen = await open_screen(app, pilot, "3", ServersScreen)
            cell = str(screen.query_one("#servers-table", DataTable).get_cell(rec.id, "cap"))
            assert cell.startswith("⚠ 16,000/") and cell.endswith("x)"), cell
    finally:
        for r in launcher.list_servers(store):
            if r.state not in ("stopped", "crashed"):
                launcher.stop(store, r, timeout=5)
