"""The real engines, one real vLLM (CPU build) for the module: the contract the simulator must keep,
the failures only a real server shows, and the golden path, as one test: a peft fine-tune on CPU, its adapter served by a real
vLLM (CPU build) with LoRA, live figures from vLLM's own /metrics, the proxy routing with confidence
from real log-probabilities to the adapter and escalating to the same real server as an on-prem
frontier through litellm, the ledger, `report`, `calibrate`, a hot swap under traffic, stop, and a
dashboard process that re-attaches to a server it did not start."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

import pytest

from engine.adapters import registry as adapters
from engine.vllm import launcher
from engine.vllm.metrics import NAMES
from store.db import open_store
from tests.engines.stack import ROOT, free_port, train, wait_http
from tests.fakes.tiny_model import make_peft_adapter, make_tiny_model
from tests.helpers import FAKE_VLLM

# What fleetdeck reads from vLLM's /metrics, with the labels it relies on.
METRIC_FAMILIES = {name.removesuffix("_total") for key, names in NAMES.items() for name in names[:1]
                   if key != "prefix_hit_rate"} | {"vllm:cache_config_info"}


@pytest.fixture(scope="module")
def simulator(real_server):
    """fleetdeck's vLLM simulator, started the way the demo starts it, serving the same model folder."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, FAKE_VLLM, "serve", str(real_server.base), "--port", str(port),
                             "--served-model-name", "tiny", "--max-model-len", "256", "--enable-lora",
                             "--max-loras", "2", "--max-lora-rank", "16"],
                            env={**real_server.env, "FLEETDECK_SIM_START_DELAY": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def contract_adapters(real_server):
    root = real_server.root / "contract"
    ok = make_peft_adapter(real_server.base, root / "ok", rank=8)
    too_big = make_peft_adapter(real_server.base, root / "rank32", rank=32)
    other_base = make_tiny_model(root / "other-base", hidden_size=256, num_attention_heads=4, num_key_value_heads=1,
                                 max_position_embeddings=256)
    foreign = make_peft_adapter(other_base, root / "foreign", rank=8)
    return {"ok": ok, "rank32": too_big, "foreign": foreign}


def post(base: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, timeout=120, trust_env=False)


@pytest.mark.parametrize("which", ["real", "simulator"])
def test_the_simulator_keeps_the_real_servers_contract(which, real_server, simulator, contract_adapters):
    """The same checks against vLLM itself and fleetdeck's simulator, so the demo cannot drift from vLLM."""
    base = real_server.base_url if which == "real" else simulator
    assert httpx.get(f"{base}/health", trust_env=False).status_code == 200

    models = httpx.get(f"{base}/v1/models", trust_env=False).json()
    assert models["object"] == "list"
    (m,) = models["data"]
    assert (m["id"], m["object"], m["root"], m["parent"], m["max_model_len"]) == ("tiny", "model", str(real_server.base), None, 256)

    path = str(contract_adapters["ok"])
    r = post(base, "/v1/load_lora_adapter", {"lora_name": "contract", "lora_path": path})
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'contract' added successfully.")
    lora = [d for d in httpx.get(f"{base}/v1/models", trust_env=False).json()["data"] if d["id"] == "contract"]
    assert lora and lora[0]["parent"] == "tiny" and lora[0]["root"] == path
    again = post(base, "/v1/load_lora_adapter", {"lora_name": "contract", "lora_path": path})
    assert again.status_code == 400 and "has already been loaded" in again.json()["error"]["message"]
    assert set(again.json()["error"]) == {"message", "type", "param", "code"} and again.json()["error"]["code"] == 400
    big = post(base, "/v1/load_lora_adapter", {"lora_name": "big", "lora_path": str(contract_adapters["rank32"])})
    assert big.status_code == 500 and "LoRA rank 32 is greater than max_lora_rank 16" in big.json()["error"]["message"]
    missing = post(base, "/v1/unload_lora_adapter", {"lora_name": "nope"})
    assert missing.status_code == 404 and "cannot be found" in missing.json()["error"]["message"]

    chat = post(base, "/v1/chat/completions", {"model": "contract", "max_tokens": 3, "logprobs": True, "top_logprobs": 1,
                                                "messages": [{"role": "user", "content": "hello"}]})
    assert chat.status_code == 200
    body = chat.json()
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] >= 1
    token = body["choices"][0]["logprobs"]["content"][0]
    assert {"token", "logprob", "bytes", "top_logprobs"} <= set(token) and token["logprob"] <= 0
    unknown = post(base, "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert unknown.status_code == 404 and "does not exist" in unknown.json()["error"]["message"]

    r = post(base, "/v1/unload_lora_adapter", {"lora_name": "contract"})
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'contract' removed successfully.")

    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{base}/metrics", trust_env=False).text)}
    assert METRIC_FAMILIES <= set(families), METRIC_FAMILIES - set(families)
    running = families["vllm:num_requests_running"].samples[0]
    assert {"model_name", "engine"} <= set(running.labels) and running.labels["model_name"] == "tiny"
    info = families["vllm:cache_config_info"].samples[0].labels
    assert int(info["num_gpu_blocks"]) > 0 and int(info["block_size"]) > 0


def test_real_lora_refusals_reach_the_operator_as_vllms_own_words(real_server, contract_adapters):
    """What only the real engine says: a rank above max_lora_rank, an adapter made for another base model."""
    with pytest.raises(adapters.AdapterError) as too_big:
        adapters.load(real_server.base_url, "big", str(contract_adapters["rank32"]))
    with pytest.raises(adapters.AdapterError) as foreign:
        adapters.load(real_server.base_url, "foreign", str(contract_adapters["foreign"]))
    assert "LoRA rank 32 is greater than max_lora_rank 16" in str(too_big.value)
    assert "raise [lora] max_lora_rank in the profile" in str(too_big.value)
    assert "must match the size of tensor b" in str(foreign.value) and "trained on another base model" in str(foreign.value)
    # fleetdeck's own check says it before vLLM is asked
    found = real_server.run("adapters", "load", real_server.id, str(contract_adapters["rank32"]))
    assert found.returncode == 2 and "above the server's max LoRA rank 16" in found.stderr
    # and the server is still serving
    assert httpx.get(f"{real_server.base_url}/health", trust_env=False).status_code == 200


def router_config(server, port: int) -> Path:
    v1 = f"{server.base_url}/v1"
    common = [f'slm_base_url = "{v1}"', 'confidence = "first_token"', "slm_timeout_s = 30",
              'frontier_model = "hosted_vllm/tiny"', f'frontier_api_base = "{v1}"',
              "frontier_input_usd_per_mtok = 1.0", "frontier_output_usd_per_mtok = 2.0"]
    path = server.root / "router.toml"
    path.write_text("\n".join([
        "[proxy]", 'host = "127.0.0.1"', f"port = {port}", "frontier_timeout_s = 60",
        "[pricing]", "slm_gpu_hour_usd = 1.0", "slm_gpus = 1",
        # the small model always answers (threshold 0) ...
        "[[task]]", 'name = "tickets"', 'slm_model = "tickets-v1@v1"', "threshold = 0.0", *common,
        # ... or never does: a random model is never 99 % sure, so every request escalates
        "[[task]]", 'name = "tickets-strict"', 'slm_model = "tickets-v1@v1"', "threshold = 0.99", *common,
    ]) + "\n")
    return path


def ask(proxy: str, task: str, text: str = "the invoice is wrong please route", **extra) -> httpx.Response:
    body = {"model": task, "messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}
    return httpx.post(f"{proxy}/v1/chat/completions", json=body, timeout=120, trust_env=False)


def test_finetune_serve_route_report_calibrate_swap_stop_on_real_engines(real_server):
    srv = real_server

    # 1. Two fine-tunes with the peft backend on CPU; each adapter lands with its provenance.
    v1, v2 = train(srv, "tickets-v1", seed=1), train(srv, "tickets-v2", seed=2)
    meta = json.loads((v1 / "fleetdeck.json").read_text())
    assert Path(meta["base_model"]) == srv.base and (v1 / "adapter_config.json").is_file()
    listed = json.loads(srv.run("adapters", "ls", "--json").stdout)
    assert {"tickets-v1@v1", "tickets-v2@v1"} <= {a["name"] for a in listed["adapters"]}

    # 2. The adapter goes into the real server through fleetdeck's compatibility check.
    loaded = srv.run("adapters", "load", srv.id, "tickets-v1")  # its newest version, served as tickets-v1@v1
    assert loaded.returncode == 0 and "added successfully" in loaded.stdout, loaded.stderr

    # 3. Traffic straight at vLLM, then live figures from its own /metrics, through a process of its own.
    for _ in range(3):
        r = httpx.post(f"{srv.base_url}/v1/chat/completions", trust_env=False, timeout=120, json={
            "model": "tickets-v1@v1", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8})
        assert r.status_code == 200
    show = json.loads(srv.run("serve", "show", srv.id, "--json", "--interval", "0.5").stdout)
    fig = show["figures"]
    assert show["state"] == "ready" and show["loaded_adapters"] == ["tickets-v1@v1"]
    assert fig["ttft_p50"] is not None and fig["e2e_p95"] is not None and fig["kv_usage"] is not None
    assert fig["running"] == 0 and fig["waiting"] == 0 and fig["preemptions"] == 0
    # The KV capacity vLLM allocated is what the planner predicted for the CPU build's 1 GiB KV space.
    assert fig["kv_tokens"] == show["predicted_kv_tokens"] == 2 * 1024**3 // 512 // 2
    listing = json.loads(srv.run("serve", "ls", "--json", "--interval", "0").stdout)
    assert [s["id"] for s in listing] == [srv.id] and listing[0]["figures"]["kv_tokens"] == fig["kv_tokens"]

    # 4. The proxy: the adapter as the small model, the same real server as an on-prem frontier via litellm.
    port = free_port()
    cfg = router_config(srv, port)
    proxy = subprocess.Popen([sys.executable, "-m", "fleetdeck", "proxy", "--router-config", str(cfg), "--store", str(srv.store)],
                             env=srv.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    sent = 0
    try:
        wait_http(f"{base}/health")
        r = ask(base, "tickets", logprobs=True)
        sent += 1
        assert r.status_code == 200 and r.headers["x-fleetdeck-route"] == "slm"
        first = r.json()["choices"][0]["logprobs"]["content"][0]["logprob"]
        # the header carries 4 decimals of exp(first token's log-probability), as vLLM reported it
        assert abs(float(r.headers["x-fleetdeck-confidence"]) - math.exp(first)) < 1e-4
        r = ask(base, "tickets-strict")
        sent += 1
        assert r.status_code == 200 and r.headers["x-fleetdeck-route"] == "frontier"
        assert r.headers["x-fleetdeck-escalated"] == "true" and r.json()["choices"][0]["message"]["content"]
        strict_id = r.headers["x-fleetdeck-request-id"]
        for task in ("tickets", "tickets-strict"):
            assert ask(base, task).status_code == 200
            sent += 1

        # 5. Hot swap while requests flow: not one request fails.
        codes: list[int] = []
        stop = threading.Event()

        def flow() -> None:
            while not stop.is_set():
                codes.append(ask(base, "tickets").status_code)

        t = threading.Thread(target=flow)
        t.start()
        time.sleep(1.0)
        from engine.adapters import registry as adapters

        assert adapters.swap(srv.base_url, "tickets-v1@v1", "tickets-v2@v1", str(v2)) == \
            "tickets-v2@v1 loaded, then tickets-v1@v1 unloaded"
        time.sleep(1.0)
        stop.set()
        t.join(timeout=120)
        assert codes and set(codes) == {200}, codes
        sent += len(codes)
        assert [m["id"] for m in adapters.loaded(srv.base_url)] == ["tickets-v2@v1"]
    finally:
        proxy.send_signal(signal.SIGTERM)  # finishes requests in flight and flushes the ledger
        out, _ = proxy.communicate(timeout=60)
    assert proxy.returncode in (0, -signal.SIGTERM), out

    # 6. Every request is one ledger row; the month report counts them and the escalations.
    store = open_store(srv.store)
    assert store.query("SELECT COUNT(*) AS n FROM requests")[0]["n"] == sent
    (row,) = store.query("SELECT route, reason, confidence FROM requests WHERE id = ?", (strict_id,))
    assert (row["route"], row["reason"]) == ("frontier", "low_confidence") and 0 < row["confidence"] < 0.99
    report = srv.run_router("report", "--json", "--config", str(cfg))
    assert report.returncode in (0, 3), report.stderr  # 3: a task drifts (a random model escalates a lot)
    rep = json.loads(report.stdout)
    assert rep["requests"] == sent and rep["escalated"] >= 2
    strict = next(t for t in rep["tasks"] if t["name"] == "tickets-strict")
    assert strict["requests"] == 2 and strict["escalated"] == 2 and strict["frontier_cost_usd"] > 0

    # 7. Calibration: a labelled set through the real small model.
    evalset = srv.root / "eval.jsonl"
    evalset.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"ticket {i}: the invoice is wrong"}],
                                             "expected": "route to billing"}) for i in range(6)) + "\n")
    adapters_now = srv.run("adapters", "load", srv.id, "tickets-v1@v1")
    assert adapters_now.returncode == 0, adapters_now.stderr
    cal = srv.run_router("calibrate", "tickets", "--eval", str(evalset), "--json", "--router-config", str(cfg))
    assert cal.returncode == 0, cal.stderr
    doc = json.loads(cal.stdout)
    assert doc["items"] == 6 and 0 <= doc["ece"] <= 1 and doc["curve"]

    # 8. A dashboard that did not start the server re-attaches to it (pid + create time), then stops it.
    again = open_store(srv.store)
    (rec,) = [launcher.refresh(again, r) for r in launcher.list_servers(again)]
    assert rec.state == "ready" and rec.engine_pid is not None
    stopped = srv.run("serve", "stop", srv.id)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert launcher.get(again, srv.id).state == "stopped"
    try:
        httpx.get(f"{srv.base_url}/health", timeout=2, trust_env=False)
        raise AssertionError("the server still answers after stop")
    except httpx.HTTPError:
        pass



def test_a_server_whose_engine_process_dies_is_failed_with_that_reason(real_vllm, real_server, tmp_path):
    """vLLM's API server can outlive its engine process; fleetdeck does not trust /health alone."""
    import os

    from engine.vllm.profile import load_profile
    from tests.engines.stack import write_profile

    store = open_store(tmp_path / "fd.db")
    prof = load_profile(write_profile(tmp_path / "p.toml", real_vllm, real_server.base, name="doomed"))
    rec, verdict = launcher.start(store, prof, [0], log_dir=tmp_path)
    try:
        rec = launcher.wait_ready(store, rec, timeout=420, poll=1.0)
        assert rec.state == "ready", Path(rec.log_path).read_text()[-3000:]
        assert rec.engine_pid is not None and rec.engine_pid != rec.pid
        os.kill(rec.engine_pid, signal.SIGKILL)
        deadline = time.time() + 60
        while time.time() < deadline and rec.state == "ready":
            time.sleep(0.2)
            rec = launcher.refresh(store, rec)
        assert rec.state == "crashed"
        # Either fleetdeck saw the API server alive without its engine, or vLLM shut the API server down
        # and its log says why: both name the engine process.
        assert "engine process" in rec.reason and "restart the server" in rec.reason, rec.reason
    finally:
        launcher.stop(store, launcher.get(store, rec.id), timeout=20)
