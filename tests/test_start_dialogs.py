"""Starting work from the TUI: a vLLM server from a profile and a peft fine-tune from a spec."""

from __future__ import annotations

import json
import time

from textual.widgets import Input, Select, Static

from engine.finetune import jobs
from engine.vllm import launcher
from store.db import open_store
from store.paths import config_dir
from tests.fakes.tiny_model import make_dataset, make_tiny_model
from tests.helpers import FAKE_VLLM_CMD, WAIT_CEILING_S
from tests.tui_helpers import make_app, open_dialog, ready, settle, static_text
from tui.screens.jobs import StartJobScreen
from tui.screens.servers import StartServerScreen


async def test_start_a_server_from_the_servers_screen(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETDECK_VLLM", FAKE_VLLM_CMD)
    monkeypatch.setenv("FLEETDECK_SIM_START_DELAY", "0.2")
    profiles = config_dir() / "profiles"
    profiles.mkdir(parents=True)
    (profiles / "qwen.toml").write_text('name = "qwen"\nmodel = "Qwen/Qwen3-8B"\n')
    (profiles / "huge.toml").write_text('name = "huge"\nmodel = "meta-llama/Llama-3.3-70B-Instruct"\n')
    db = tmp_path / "fd.db"
    app = make_app(store_path=db)
    try:
        async with app.run_test(size=(120, 34)) as pilot:
            dialog = await open_dialog(app, pilot, "3", "s", StartServerScreen)
            # A node the fleet does not have is refused with the ones it has (never planned elsewhere).
            dialog.query_one("#start-gpus", Input).value = "no-such-node/0"
            dialog.query_one("#start-profile", Select).value = "qwen"
            await settle(app, pilot)
            await pilot.press("ctrl+s")
            await settle(app, pilot)
            verdict = static_text(dialog.query_one("#start-verdict", Static))
            assert "no node 'no-such-node'; the fleet has sim-a10-02, sim-h100-01, sim-ws-4090" in verdict, verdict
            assert launcher.list_servers(open_store(db)) == []
            dialog.query_one("#start-gpus", Input).value = "sim-h100-01/3"
            dialog.query_one("#start-profile", Select).value = "huge"  # 70B in 16-bit on one H100: refused
            await settle(app, pilot)
            await pilot.press("ctrl+s")
            await settle(app, pilot)
            assert "CUDA out of memory while loading weights" in static_text(dialog.query_one("#start-verdict", Static))
            assert launcher.list_servers(open_store(db)) == []
            dialog.query_one("#start-profile", Select).value = "qwen"
            await settle(app, pilot)
            await pilot.press("ctrl+s")
            await settle(app, pilot, 5)
            (rec,) = launcher.list_servers(open_store(db))
            assert str(rec.gpus) == "3" and rec.name == "qwen" and rec.predicted_kv_tokens
    finally:
        store = open_store(db)
        for r in launcher.list_servers(store):
            launcher.stop(store, r, timeout=5)


async def test_start_a_peft_fine_tune_on_cpu_from_the_jobs_screen(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    data = make_dataset(tmp_path / "data.jsonl")
    specs = config_dir() / "finetune"
    specs.mkdir(parents=True)
    (specs / "tiny.toml").write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in {
        "name": "tiny", "base_model": str(model), "dataset": str(data), "backend": "peft", "lora_rank": 4,
        "max_steps": 3, "batch_size": 2, "gradient_accumulation_steps": 1, "adapter_root": str(tmp_path / "adapters"),
    }.items()))
    db = tmp_path / "fd.db"
    app = make_app(store_path=db)
    async with app.run_test(size=(120, 34)) as pilot:
        dialog = await open_dialog(app, pilot, "4", "s", StartJobScreen)
        dialog.query_one("#job-gpus", Input).value = "cpu"
        dialog.query_one("#job-spec", Select).value = "tiny"
        await settle(app, pilot)
        assert "24 examples (chat)" in static_text(dialog.query_one("#job-check", Static))
        await pilot.press("ctrl+s")
        await settle(app, pilot, 5)
    store = open_store(db)
    (rec,) = jobs.list_jobs(store)
    deadline = time.time() + WAIT_CEILING_S  # a safety net: the loop waits for the job to end
    while jobs.refresh(store, jobs.get(store, rec.id)).state == "running":
        assert time.time() < deadline
        time.sleep(0.2)
    assert jobs.get(store, rec.id).state == "finished"
    assert (tmp_path / "adapters" / "tiny@v1" / "adapter_config.json").exists()


async def test_the_start_dialog_suggests_only_a_utilisation_that_holds_the_model(tmp_path, monkeypatch):
    """On the demo's busy A10 (the simulated vLLM holds most of it) the dialog's verdict names a utilisation
    that holds the weights and the length, or says none does; never one that cannot."""
    from engine.kvfit import FitRequest, load_model, plan
    from engine.kvfit.overhead import vllm_view_of

    monkeypatch.setenv("FLEETDECK_VLLM", FAKE_VLLM_CMD)
    profiles = config_dir() / "profiles"
    profiles.mkdir(parents=True)
    (profiles / "llama.toml").write_text('name = "llama"\nmodel = "meta-llama/Llama-3.1-8B-Instruct"\n')
    (profiles / "small.toml").write_text('name = "small"\nmodel = "Qwen/Qwen2.5-0.5B-Instruct"\nmax_model_len = 4096\n')
    app = make_app(store_path=tmp_path / "fd.db")
    async with app.run_test(size=(120, 40)) as pilot:
        dialog = await open_dialog(app, pilot, "3", "s", StartServerScreen)
        # The busy A10 holds neither model; the H100 with a fine-tune on it holds the 8B at a lower utilisation.
        for where, name, model, suggests in (("sim-a10-02/0", "llama", "meta-llama/Llama-3.1-8B-Instruct", False),
                                             ("sim-a10-02/0", "small", "Qwen/Qwen2.5-0.5B-Instruct", False),
                                             ("sim-h100-01/2", "llama", "meta-llama/Llama-3.1-8B-Instruct", True)):
            node, _, index = where.partition("/")
            (gpu,) = app.poller.latest[node].gpus_at([int(index)])
            total, free, used, _ = vllm_view_of(gpu)
            dialog.query_one("#start-gpus", Input).value = where
            dialog.query_one("#start-profile", Select).value = name
            await settle(app, pilot)
            await pilot.press("ctrl+s")
            await settle(app, pilot)
            verdict = dialog.verdict
            text = static_text(dialog.query_one("#start-verdict", Static))
            assert verdict is not None and not verdict.fits and "DOES NOT FIT" in text
            assert "max concurrency" not in text
            assert (verdict.fitting_gpu_memory_utilization is not None) == suggests, text
            arch, _ = load_model(model)
            if not suggests:
                assert "No gpu_memory_utilization fits on this GPU" in text
            else:
                util = verdict.fitting_gpu_memory_utilization
                assert util < 0.9 and f"gpu_memory_utilization {util:.2f}" in text
                assert plan(arch, FitRequest(gpu_memory_bytes=total, free_memory_bytes=free, other_process_bytes=used,
                                             gpu_memory_utilization=util, max_model_len=verdict.fitting_max_model_len,
                                             gpu_name=gpu.name)).fits
        assert launcher.list_servers(open_store(tmp_path / "fd.db")) == []
