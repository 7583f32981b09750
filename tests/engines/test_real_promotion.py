"""From fine-tune to production on the real engines: two versions trained with peft on CPU, evaluated
through a real vLLM (CPU build), a promotion the gate refuses, one that passes while requests flow
through the proxy (not one fails), the ledger naming the version that answered, a rollback; then the
version merged into its base, served by vLLM without LoRA and scored beside the version, and AWQ through the real llm-compressor
as far as it goes without a GPU."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from store.db import open_store
from tests.engines.stack import ROOT, cli, free_port, train, wait_http, write_profile
from tests.engines.vllm_cpu_env import quant_env_dir


def chat(base_url: str, model: str, text: str, **extra) -> httpx.Response:
    return httpx.post(f"{base_url}/chat/completions", trust_env=False, timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": text}], "temperature": 0, **extra})


def test_train_evaluate_gate_promote_under_traffic_rollback_merge_quantize(real_server, real_vllm):
    srv = real_server
    # v1 barely moves from the base (one step, tiny learning rate); v2 trains hard: their answers differ.
    v1 = train(srv, "tickets", seed=1, steps=1, lr=1e-6)
    v2 = train(srv, "tickets", seed=2, steps=24, lr=0.02)
    assert (v1.name, v2.name) == ("tickets@v1", "tickets@v2")
    meta = json.loads((v2 / "fleetdeck.json").read_text())
    assert meta["origin"] == "job" and meta["version"] == 2 and len(meta["base_config_sha256"]) == 64

    # The held-out set is labelled with the answers the operator wants, which v2 gives.
    assert srv.run("adapters", "load", srv.id, "tickets@v2").returncode == 0
    prompts = [f"ticket {i}: the invoice is wrong please route" for i in range(40, 46)]
    wanted = [chat(f"{srv.base_url}/v1", "tickets@v2", p).json()["choices"][0]["message"]["content"] for p in prompts]
    gate = srv.root / "gate.jsonl"
    gate.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}], "expected": w}) + "\n"
                            for p, w in zip(prompts, wanted)))
    port = free_port()
    cfg = srv.root / "router-promote.toml"
    cfg.write_text("\n".join([
        "[proxy]", 'host = "127.0.0.1"', f"port = {port}",
        "[[task]]", 'name = "tickets"', f'slm_base_url = "{srv.base_url}/v1"', 'slm_model = "tickets@v1"',
        "threshold = 0.0", "slm_timeout_s = 60",
        "[task.gate]", 'eval = "gate.jsonl"', "target_accuracy = 1.0",
    ]) + "\n")
    router = ["--router-config", str(cfg)]
    assert srv.run("adapters", "load", srv.id, "tickets@v1").returncode == 0

    # Both versions evaluated on the task's set: accuracy, calibration and latency per version.
    scores = {}
    for v in ("tickets@v1", "tickets@v2"):
        ev = srv.run("adapters", "eval", v, "--eval", str(gate), "--task", "tickets", "--json", *router)
        assert ev.returncode == 0, ev.stderr
        scores[v] = json.loads(ev.stdout)
    assert scores["tickets@v2"]["accuracy"] == 1.0 and scores["tickets@v1"]["accuracy"] < 1.0
    assert scores["tickets@v2"]["p95_ms"] >= scores["tickets@v2"]["p50_ms"] > 0

    # The gate refuses v1's promotion (were it not already serving, it would still fall short).
    cfg.write_text(cfg.read_text().replace('slm_model = "tickets@v1"', 'slm_model = "tiny"'))
    refused = srv.run("adapters", "promote", "tickets", "tickets@v1", *router)
    assert refused.returncode == 2 and "its gate asks for 100.0%" in refused.stderr
    cfg.write_text(cfg.read_text().replace('slm_model = "tiny"', 'slm_model = "tickets@v1"'))

    # With the proxy up and requests flowing, v2 is promoted and then rolled back: not one request fails.
    proxy = subprocess.Popen([sys.executable, "-m", "fleetdeck", "proxy", "--router-config", str(cfg), "--store", str(srv.store)],
                             env=srv.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    codes: list[int] = []
    stop = threading.Event()

    def flow() -> None:
        while not stop.is_set():
            codes.append(chat(f"http://127.0.0.1:{port}/v1", "tickets", "ticket 7: the invoice is wrong", max_tokens=4)
                         .status_code)

    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        t = threading.Thread(target=flow)
        t.start()
        time.sleep(1.0)
        promoted = srv.run("adapters", "promote", "tickets", "tickets@v2", *router)
        assert promoted.returncode == 0 and f"reloaded at 127.0.0.1:{port}" in promoted.stdout, promoted.stderr
        time.sleep(1.5)
        rolled = srv.run("adapters", "rollback", "tickets", *router)
        assert rolled.returncode == 0 and "tickets@v2 -> tickets@v1" in rolled.stdout, rolled.stderr
        time.sleep(1.0)
        stop.set()
        t.join(timeout=120)
    finally:
        stop.set()
        proxy.send_signal(signal.SIGTERM)
        out, _ = proxy.communicate(timeout=60)
    assert codes and set(codes) == {200}, codes
    store = open_store(srv.store)
    seq = [r["slm_model"] for r in store.query("SELECT slm_model FROM requests WHERE task = 'tickets' ORDER BY ts")]
    runs = [m for i, m in enumerate(seq) if i == 0 or seq[i - 1] != m]
    assert runs == ["tickets@v1", "tickets@v2", "tickets@v1"], runs

    # Merge v2 into its base; vLLM serves the merged model without LoRA and answers as v2 did.
    merged = srv.root / "models" / "tickets-v2-merged"
    m = srv.run("finetune", "merge", "tickets@v2", "--out", str(merged), "--wait", timeout=600)
    assert m.returncode == 0 and "finished" in m.stdout, m.stdout + m.stderr
    profile = write_profile(srv.root / "merged.toml", real_vllm, merged, name="merged")
    profile.write_text(profile.read_text().split("[lora]")[0])  # a merged model needs no LoRA
    started = srv.run("serve", "start", str(profile), "--gpus", "0", "--wait", timeout=600)
    assert started.returncode == 0, started.stderr
    sid = started.stdout.split()[1]
    try:
        doc = json.loads(srv.run("serve", "show", sid, "--json", "--interval", "0").stdout)
        assert doc["state"] == "ready", doc.get("reason")
        answer = chat(f"{doc['base_url']}/v1", "tiny", prompts[0], max_tokens=4)
        assert answer.status_code == 200
        # the merged weights answer the first greedy token as v2 on its base did
        assert wanted[0].split()[:1] == answer.json()["choices"][0]["message"]["content"].split()[:1]
        # Scored on the gate's set beside the version it came from; the verdict follows the figures.
        cmp = srv.run("adapters", "compare", "tickets@v2", "--server", sid, "--eval", str(gate), "--task", "tickets",
                      "--json", *router)
        assert cmp.returncode in (0, 3), cmp.stderr
        doc = json.loads(cmp.stdout)
        assert doc["adapter"]["accuracy"] == 1.0 and doc["ok"] == (doc["model"]["accuracy"] >= 1.0)
        assert (cmp.returncode == 0) == doc["ok"]
    finally:
        srv.run("serve", "stop", sid)

    # AWQ with the real llm-compressor: calibration is read, then llm-compressor 0.14 needs a GPU, said so.
    fleet = srv.root / "fleet-quant.toml"
    fleet.write_text(srv.fleet.read_text() + f'[models]\nquantize_python = "{quant_env_dir() / "bin" / "python"}"\n')
    q = cli(srv.env, "finetune", "quantize", str(merged), "--calibration", str(srv.root / "tickets.jsonl"), "--samples",
            "8", "--wait", "--store", str(srv.store), "--config", str(fleet), timeout=600)
    assert q.returncode == 1 and "llm-compressor's AWQ needs a GPU" in q.stdout, q.stdout + q.stderr
    jobs_now = json.loads(srv.run("finetune", "ls", "--json").stdout)
    (qjob,) = [j for j in jobs_now if j["spec"].get("kind") == "quantize"]
    assert qjob["state"] == "failed" and not Path(str(merged) + "-awq").exists()


@pytest.fixture(autouse=True)
def _quant_env_present():
    python = quant_env_dir() / "bin" / "python"
    if not python.exists():
        pytest.fail(f"llm-compressor's environment is missing at {python}: run `.venv/bin/python tests/engines/vllm_cpu_env.py`")
