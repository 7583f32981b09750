"""The Fleet screen through Pilot: rows, live updates, detail, help, faults, quit."""

from __future__ import annotations

import pynvml
from textual.widgets import DataTable, Static

from fleet.source import LocalNode
from tests.fakes.fake_nvml import FakeGpu, FakeNvml
from tests.tui_helpers import drain, make_app, ready, static_text
from tui.screens.fleet import FleetScreen
from tui.screens.gpu_detail import GpuDetailScreen, NodeDetailScreen
from tui.screens.help import HelpScreen


async def test_the_simulated_fleet_is_listed_by_node_and_labelled():
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        table = app.screen.query_one("#fleet-table", DataTable)
        keys = [r.key.value for r in table.ordered_rows]
        assert keys[0] == "node:sim-a10-02"
        assert sum(k.startswith("gpu:") for k in keys) == 7
        assert sum(k.startswith("node:") for k in keys) == 3
        assert "SIMULATED" in app.status_text
        assert "7 GPUs" in app.status_text


async def test_a_refresh_updates_changed_cells_in_place():
    now = [1_790_000_000.0]
    from fleet.simulated import demo_fleet

    nodes = demo_fleet(clock=lambda: now[0])
    app = make_app(lambda: nodes)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(app, pilot)
        table = app.screen.query_one("#fleet-table", DataTable)
        row_key = next(r.key for r in table.ordered_rows if r.key.value.startswith("gpu:sim-h100-01"))
        before = str(table.get_cell(row_key, "util"))
        rows_before = [r.key for r in table.ordered_rows]
        for _ in range(5):
            now[0] += 13
            app.poll_once_sync()
        await pilot.pause()
        assert [r.key for r in table.ordered_rows] == rows_before  # same rows, not rebuilt
        assert str(table.get_cell(row_key, "util")) != before
        assert len(app.poller.history[row_key.value[4:]].util) == 6


async def test_enter_opens_gpu_detail_and_escape_returns():
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        await pilot.press("down", "enter")
        assert isinstance(app.screen, GpuDetailScreen)
        text = static_text(app.screen.query_one("#detail-fields", Static))
        assert "Throttle reasons" in text and "ECC" in text and "NVIDIA A10" in text
        procs = app.screen.query_one("#detail-procs", DataTable)
        assert procs.row_count == 1
        assert "phi-3.5-mini" in str(procs.get_row_at(0)[4])
        await pilot.press("escape")
        assert isinstance(app.screen, FleetScreen)
        await pilot.press("enter")  # the cursor is back on the first GPU row... the node row is row 0
        assert isinstance(app.screen, (GpuDetailScreen, NodeDetailScreen))


async def test_node_row_opens_node_detail():
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        await pilot.press("enter")
        assert isinstance(app.screen, NodeDetailScreen)
        assert "SIMULATED" in static_text(app.screen.query_one("#detail-fields", Static))


async def test_help_lists_the_keys_and_closes():
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        rows = [tuple(str(c) for c in app.screen.query_one(DataTable).get_row_at(i)) for i in range(app.screen.query_one(DataTable).row_count)]
        actions = {r[1] for r in rows}
        assert {"Quit", "Help", "Fleet", "Detail", "Command palette"} <= actions
        await pilot.press("escape")
        assert isinstance(app.screen, FleetScreen)


async def test_q_quits():
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        await pilot.press("q")
    assert app.return_code == 0


async def test_no_driver_shows_the_reason_and_host_figures_and_keeps_running(monkeypatch):
    FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND).install(monkeypatch)
    app = make_app(lambda: [LocalNode("gpu-less")], simulated=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        banner = app.screen.query_one("#fleet-banner", Static)
        assert banner.display
        text = static_text(banner)
        assert "No NVIDIA driver" in text and "nvidia-smi" in text and "memory" in text
        assert "SIMULATED" not in app.status_text
        app.poll_once_sync()  # still polling
        assert app.is_running


async def test_a_lost_gpu_shows_lost_in_its_row(monkeypatch):
    gpus = [FakeGpu(uuid="GPU-a"), FakeGpu(uuid="GPU-b")]
    FakeNvml(gpus).install(monkeypatch)
    app = make_app(lambda: [LocalNode("n1")], simulated=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        gpus[1].lost = True
        app.poll_once_sync()
        await pilot.pause()
        table = app.screen.query_one("#fleet-table", DataTable)
        assert str(table.get_cell("gpu:n1/GPU-b", "vram")) == "LOST"
        assert str(table.get_cell("gpu:n1/GPU-a", "vram")) != "LOST"


async def test_an_unusable_store_is_reported_and_the_dashboard_keeps_running(tmp_path):
    app = make_app(store_path=tmp_path)  # a directory is not a store
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        assert app.store is None and "is a directory" in app.store_error
        assert "store: unavailable" in app.status_text
        assert app.screen.query_one("#fleet-table", DataTable).row_count == 10


async def test_history_survives_a_restart_through_the_store(tmp_path):
    path = tmp_path / "fd.db"
    app = make_app(store_path=path)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
    again = make_app(store_path=path)
    async with again.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await drain(again)
        # Seeded from the store before any poll of this session.
        assert any(len(h.util) >= 1 for h in again.poller.history.values())


# The Fleet screen's snapshots are in tests/test_snapshots.py, with every other screen's.


async def test_a_read_only_dashboard_reads_the_history_and_writes_none(tmp_path):
    """README: a read-only run writes nothing on the node but its refusals' records; the GPU history it
    samples each `history_every_s` was one thing it still wrote."""
    from fleet.config import FleetConfig
    from store.db import open_store

    path = tmp_path / "fd.db"
    app = make_app(store_path=path)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)

    def samples() -> int:
        store = open_store(path, read_only=True)
        try:
            return store.query("SELECT COUNT(*) AS n FROM gpu_samples")[0]["n"]
        finally:
            store.close()

    before = samples()
    assert before > 0
    from dataclasses import replace

    from tui.app import FleetDeckApp

    watcher = FleetDeckApp(replace(make_app(store_path=path).options, config=FleetConfig(read_only=True)))
    async with watcher.run_test(size=(80, 24)) as pilot:
        await ready(watcher, pilot)
        watcher.poller._last_history = -1e18  # a sample is due now
        watcher.poll_once_sync()
        await pilot.pause()
        assert any(len(h.util) >= 1 for h in watcher.poller.history.values())  # seeded from the store
    assert samples() == before
