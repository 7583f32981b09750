"""The Jobs screen through Pilot: progress from a running job, cancel with confirmation, and `v` serving
a finished job's adapter into a compatible running server."""

from __future__ import annotations

import json
import time
from pathlib import Path

from textual.widgets import DataTable

from engine.adapters import registry as adapters
from engine.audit import trail as audit
from engine.finetune import jobs
from engine.finetune.spec import JobSpec
from fleet.config import FleetConfig
from engine.kvfit.catalogue import CATALOGUE
from engine.vllm import launcher
from store.db import open_store
from tests.helpers import FAKE_VLLM_CMD, WAIT_CEILING_S, h100, profile
from tests.tui_helpers import make_app, ready, settle, until
from tui.screens.confirm import ConfirmScreen
from tui.screens.jobs import JobsScreen


def simulated_spec(tmp_path: Path, steps: int) -> JobSpec:
    base = tmp_path / "Qwen3-8B"
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text(json.dumps(CATALOGUE["Qwen/Qwen3-8B"]))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    return JobSpec(name="sim-job", base_model=base, dataset=data, backend="simulated", max_steps=steps,
                   warmup_steps=1, lora_rank=16, adapter_root=tmp_path / "adapters")


async def test_jobs_screen_shows_progress_and_cancels_after_confirmation(tmp_path):
    store = open_store(tmp_path / "fd.db")
    rec = jobs.start(store, simulated_spec(tmp_path, 200), None)
    deadline = time.time() + WAIT_CEILING_S  # a safety net: the loop waits on the condition
    while jobs.last_step(rec) is None:
        assert time.time() < deadline
        time.sleep(0.1)
    app = make_app(store_path=tmp_path / "fd.db")
    with audit.session(tmp_path / "fd.db", "tui"):
        await _cancel_from_the_screen(app, store, rec)
    (record,) = audit.query(store)
    assert (record["action"], record["target"], record["outcome"], record["source"]) == ("job.cancel", rec.id, "done", "tui")


async def _cancel_from_the_screen(app, store, rec):
    async with app.run_test(size=(120, 30)) as pilot:
        await ready(app, pilot)
        await pilot.press("4")
        await settle(app, pilot)
        assert isinstance(app.screen, JobsScreen)
        table = app.screen.query_one("#jobs-table", DataTable)
        assert "(sim)" in str(table.get_cell(rec.id, "id"))
        assert str(table.get_cell(rec.id, "step")).endswith("/200")
        assert str(table.get_cell(rec.id, "state")) == "running"
        await pilot.press("c")
        await until(app, pilot, lambda: isinstance(app.screen, ConfirmScreen), "the question")
        await pilot.press("y")
        await until(app, pilot, lambda: jobs.get(store, rec.id).state == "cancelled", "the job cancelled")
        assert jobs.refresh(store, jobs.get(store, rec.id)).state == "cancelled"


async def test_v_serves_a_finished_adapter_into_a_compatible_server(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETDECK_VLLM", FAKE_VLLM_CMD)
    monkeypatch.setenv("FLEETDECK_SIM_START_DELAY", "0.2")
    store = open_store(tmp_path / "fd.db")
    server, _ = launcher.start(store, profile(), [0], gpu_snapshots=[h100()], log_dir=tmp_path)
    server = launcher.wait_ready(store, server, timeout=WAIT_CEILING_S, poll=0.1)
    rec = jobs.start(store, simulated_spec(tmp_path, 2), None)
    deadline = time.time() + WAIT_CEILING_S  # a safety net: the loop waits on the condition
    while jobs.refresh(store, jobs.get(store, rec.id)).state == "running":
        assert time.time() < deadline
        time.sleep(0.2)
    try:
        app = make_app(store_path=tmp_path / "fd.db")
        async with app.run_test(size=(120, 30)) as pilot:
            await ready(app, pilot)
            await pilot.press("4")
            await settle(app, pilot)
            await pilot.press("v")  # the job wrote outside the node's adapter roots: said so, nothing loaded
            await settle(app, pilot, 4)
            assert adapters.loaded(server.base_url) == []
            assert any("no adapter 'sim-job@v1'" in n.message for n in app._notifications)
            app.options.config = FleetConfig(adapter_roots=[tmp_path / "adapters"])
            await pilot.press("v")
            await settle(app, pilot, 4)
            assert [m["id"] for m in adapters.loaded(server.base_url)] == ["sim-job@v1"]  # a version, served as itself
    finally:
        launcher.stop(store, server, timeout=5)
