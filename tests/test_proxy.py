"""The routing proxy over real HTTP on loopback, against a fake SLM and a fake frontier."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.router.confidence import confidence, token_logprobs
from engine.router.config import load_router_config
from engine.router.server import ProxyStartError, check_can_start
from store.config_files import ConfigError
from store.db import open_store
from tests.fakes.fake_openai import (
    FRONTIER_COMPLETION_TOKENS,
    FRONTIER_PROMPT_TOKENS,
    SLM_PROMPT_TOKENS,
)
from tests.helpers import WAIT_CEILING_S, wait_for
from tests.proxy_helpers import Proxies, free_port, frontier, make_config, slm  # noqa: F401 (fixtures)

GPT4O_IN, GPT4O_OUT = 2.5e-6, 10e-6  # litellm's bundled price map for openai/gpt-4o, $/token


@pytest.fixture
def make_proxy(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_FRONTIER_KEY", "sk-fake")
    proxies = Proxies(tmp_path)
    yield proxies
    proxies.close()


def test_a_confident_answer_stays_on_the_slm_and_logprobs_are_removed(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url))
    r = proxy.post("lp=-0.01,-0.02")
    assert r.status_code == 200
    assert r.headers["x-fleetdeck-route"] == "slm" and r.headers["x-fleetdeck-escalated"] == "false"
    assert float(r.headers["x-fleetdeck-confidence"]) == pytest.approx(math.exp(-0.015), abs=1e-4)
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "slm answer"
    assert "logprobs" not in body["choices"][0]  # the client did not ask for them
    assert slm.app.state.calls[-1]["logprobs"] is True and slm.app.state.calls[-1]["model"] == "tickets-v3"
    (row,) = proxy.rows()
    assert row["route"] == "slm" and row["reason"] == "confident" and row["escalated"] == 0
    assert row["id"] == r.headers["x-fleetdeck-request-id"]
    assert row["cost_usd"] == 0
    # The counterfactual prices the small model's tokens at the frontier model.
    assert row["all_frontier_cost_usd"] == pytest.approx(SLM_PROMPT_TOKENS * GPT4O_IN + 2 * GPT4O_OUT)
    assert row["prompt_text"] is None and row["completion_text"] is None  # no text by default


def test_a_client_that_asks_for_logprobs_keeps_them(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url))
    r = proxy.post("lp=-0.01", logprobs=True, top_logprobs=3)
    assert r.json()["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.01
    assert slm.app.state.calls[-1]["top_logprobs"] == 3


def test_low_confidence_escalates_and_costs_the_frontier_price(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url))
    r = proxy.post("lp=-1.0,-1.0")
    assert r.status_code == 200 and r.headers["x-fleetdeck-route"] == "frontier"
    assert r.headers["x-fleetdeck-escalated"] == "true"
    assert r.json()["choices"][0]["message"]["content"] == "frontier answer"
    assert frontier.app.state.calls[-1]["model"] == "gpt-4o"
    (row,) = proxy.rows()
    expected = FRONTIER_PROMPT_TOKENS * GPT4O_IN + FRONTIER_COMPLETION_TOKENS * GPT4O_OUT
    assert row["route"] == "frontier" and row["reason"] == "low_confidence" and row["escalated"] == 1
    assert row["confidence"] == pytest.approx(math.exp(-1.0))
    assert row["cost_usd"] == pytest.approx(expected) and row["all_frontier_cost_usd"] == pytest.approx(expected)
    assert row["frontier_prompt_tokens"] == FRONTIER_PROMPT_TOKENS and row["slm_prompt_tokens"] == SLM_PROMPT_TOKENS


@pytest.mark.parametrize("method, route", [("first_token", "slm"), ("mean_token", "frontier"), ("min_token", "frontier")])
def test_each_confidence_method(slm, frontier, make_proxy, method, route):
    proxy = make_proxy(make_config(slm.url, frontier.url, confidence=method, threshold=0.5))
    r = proxy.post("lp=-0.01,-0.1,-3.0")
    assert r.headers["x-fleetdeck-route"] == route


def test_confidence_arithmetic():
    lps = [-0.1, -0.5, -2.0]
    assert confidence("first_token", lps) == pytest.approx(math.exp(-0.1))
    assert confidence("mean_token", lps) == pytest.approx(math.exp(-2.6 / 3))
    assert confidence("min_token", lps) == pytest.approx(math.exp(-2.0))
    assert token_logprobs({"logprobs": None}) is None
    assert token_logprobs({"logprobs": {"content": [{"logprob": "x"}]}}) is None


@pytest.mark.parametrize(
    "content, task, reason",
    [
        # No answer head at all, then a head and no token: both are the first-token bound's.
        ("sleep=1.0", {"slm_first_token_timeout_s": 0.2}, "slm_first_token_timeout"),
        ("firstwait=5", {"slm_first_token_timeout_s": 0.3}, "slm_first_token_timeout"),
        ("tokens=5 stallafter=2", {"slm_first_token_timeout_s": 0.5, "slm_total_timeout_s": 1.0}, "slm_total_timeout"),
        ("fail=500", {}, "slm_error"),
        ("nolp", {}, "no_logprobs"),
    ],
)
def test_slm_failures_escalate_with_the_reason(slm, frontier, make_proxy, content, task, reason):
    proxy = make_proxy(make_config(slm.url, frontier.url, **task))
    r = proxy.post(content)
    assert r.status_code == 200 and r.headers["x-fleetdeck-route"] == "frontier"
    (row,) = proxy.rows()
    assert row["reason"] == reason and row["escalated"] == 1


def test_slm_down_escalates(frontier, make_proxy):
    proxy = make_proxy(make_config(f"http://127.0.0.1:{free_port()}", frontier.url))
    r = proxy.post("hi")
    assert r.status_code == 200 and r.headers["x-fleetdeck-route"] == "frontier"
    assert proxy.rows()[0]["reason"] == "slm_error"


def test_forced_routes(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url))
    before = len(slm.app.state.calls)
    r = proxy.post("lp=-0.01", headers={"X-Fleetdeck-Escalate": "always"})
    assert r.headers["x-fleetdeck-route"] == "frontier"
    assert len(slm.app.state.calls) == before  # the small model was not asked
    r = proxy.post("lp=-5.0", headers={"X-Fleetdeck-Escalate": "never"})
    assert r.headers["x-fleetdeck-route"] == "slm" and r.headers["x-fleetdeck-escalated"] == "false"
    r = proxy.post("hi", headers={"X-Fleetdeck-Escalate": "sometimes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Fleetdeck-Escalate"
    rows = proxy.rows()
    # A refusal for a known task is a row like any other (bad_request), the header's included.
    assert [(x["route"], x["reason"], x["forced"]) for x in rows] == [
        ("frontier", "forced_frontier", 1), ("slm", "forced_slm", 1), ("none", "bad_request", 0)]


def test_the_task_header_overrides_the_model_field(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url))
    r = proxy.client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]},
                          headers={"X-Fleetdeck-Task": "tickets"})
    assert r.status_code == 200


def _sse_content(text: str) -> tuple[str, list[dict]]:
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    content = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c.get("choices"))
    return content, chunks


def test_streaming_a_confident_answer(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url))
    r = proxy.post("lp=-0.01,-0.01", stream=True, stream_options={"include_usage": True})
    assert r.headers["content-type"].startswith("text/event-stream") and r.headers["x-fleetdeck-route"] == "slm"
    content, chunks = _sse_content(r.text)
    assert content == "slm answer" and chunks[-1]["usage"]["prompt_tokens"] == SLM_PROMPT_TOKENS
    assert slm.app.state.calls[-1]["stream"] is True and slm.app.state.calls[-1]["logprobs"] is True
    assert all("logprobs" not in ch for c in chunks for ch in c.get("choices", []))  # not asked for
    (row,) = proxy.rows()
    assert row["stream"] == 1 and row["route"] == "slm" and row["decision_window"] == "whole_answer"
    assert row["slm_completion_tokens"] == 2 and row["slm_ttft_ms"] is not None and row["slm_bound"] is None


def test_streaming_an_escalated_answer_passes_the_frontier_stream_through(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url))
    r = proxy.post("lp=-2.0", stream=True)
    assert r.headers["x-fleetdeck-route"] == "frontier"
    content, chunks = _sse_content(r.text)
    assert content == "frontier streamed answer"
    assert all("usage" not in c for c in chunks)  # the client did not ask for usage
    (row,) = proxy.rows()
    assert row["completion_tokens"] == FRONTIER_COMPLETION_TOKENS
    assert row["cost_usd"] == pytest.approx(FRONTIER_PROMPT_TOKENS * GPT4O_IN + FRONTIER_COMPLETION_TOKENS * GPT4O_OUT)


def test_errors_use_openais_shape_and_the_proxy_keeps_serving(slm, frontier, make_proxy, monkeypatch):
    cfg = make_config(slm.url, frontier.url)
    cfg = cfg.model_copy(update={"proxy": cfg.proxy.model_copy(update={"max_body_bytes": 2048})})
    proxy = make_proxy(cfg)
    c = proxy.client
    r = c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = c.post("/v1/chat/completions", json={"model": "tickets"})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = c.post("/v1/chat/completions", json={"model": "tickets", "messages": [{"role": "user", "content": "x" * 5000}]})
    assert r.status_code == 413
    r = c.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and "tickets" in r.json()["error"]["message"]
    r = c.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert proxy.post("lp=-0.01").status_code == 200  # still serving


def test_api_keys_are_required_when_configured(slm, frontier, make_proxy, monkeypatch):
    monkeypatch.setenv("FD_TEST_KEYS", "k1, k2")
    cfg = make_config(slm.url, frontier.url)
    cfg = cfg.model_copy(update={"proxy": cfg.proxy.model_copy(update={"api_keys_env": "FD_TEST_KEYS"})})
    proxy = make_proxy(cfg)
    assert proxy.post("lp=-0.01").status_code == 401
    assert proxy.post("lp=-0.01", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert proxy.post("lp=-0.01", headers={"Authorization": "Bearer k2"}).status_code == 200
    assert proxy.client.get("/v1/models").status_code == 401
    # Task names and volumes are not for anyone who can reach the port.
    assert proxy.client.get("/metrics").status_code == 401
    assert proxy.client.get("/health").json() == {"status": "ok"}
    key = {"Authorization": "Bearer k1"}
    assert 'task="tickets"' in proxy.client.get("/metrics", headers=key).text
    assert proxy.client.get("/health", headers=key).json()["tasks"] == 1


def test_slm_down_and_no_frontier_is_503(make_proxy):
    proxy = make_proxy(make_config(f"http://127.0.0.1:{free_port()}", None))
    r = proxy.post("hi")
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    (row,) = proxy.rows()
    assert row["route"] == "none" and row["status"] == 503


def test_low_confidence_without_a_frontier_returns_the_slm_answer(slm, make_proxy):
    proxy = make_proxy(make_config(slm.url, None))
    r = proxy.post("lp=-3.0")
    assert r.status_code == 200 and r.headers["x-fleetdeck-route"] == "slm"
    assert proxy.rows()[0]["error"] == "no frontier model configured"


def test_slm_and_frontier_both_failing_is_502(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url))
    r = proxy.post("fail=500 ffail")
    assert r.status_code == 502 and "both" in r.json()["error"]["message"]
    assert proxy.rows()[0]["status"] == 502


def test_frontier_failing_after_a_low_confidence_answer_returns_the_slm_answer(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url))
    r = proxy.post("lp=-2.0,-2.0 ffail")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "slm answer"
    assert r.headers["x-fleetdeck-route"] == "slm" and r.headers["x-fleetdeck-escalated"] == "true"
    (row,) = proxy.rows()
    assert row["route"] == "slm" and row["reason"] == "low_confidence" and row["error"].startswith("frontier failed")
    assert row["cost_usd"] == 0


def test_a_task_that_opts_in_stores_text(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url, store_text=True))
    proxy.post("lp=-0.01,-0.01 the secret")
    (row,) = proxy.rows()
    assert "the secret" in row["prompt_text"] and row["completion_text"] == "slm answer"


def test_models_health_and_metrics(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url))
    assert [m["id"] for m in proxy.client.get("/v1/models").json()["data"]] == ["tickets"]
    assert proxy.client.get("/health").json()["status"] == "ok"
    proxy.post("lp=-0.01")
    proxy.post("lp=-3.0")
    text = proxy.client.get("/metrics").text
    assert 'fleetdeck_requests_total{route="slm",task="tickets"} 1.0' in text
    assert 'fleetdeck_escalations_total{reason="low_confidence",task="tickets"} 1.0' in text
    assert "fleetdeck_request_latency_seconds_bucket" in text


def test_rollups_match_the_rows(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url))
    for content in ["lp=-0.01"] * 3 + ["lp=-2.0"] * 2:
        proxy.post(content)
    rows = proxy.rows()
    store = open_store(proxy.store_path)
    rolls = {r["route"]: r for r in store.query("SELECT route, SUM(requests) AS n, SUM(escalated) AS e, SUM(cost_usd) AS c,"
                                                 " SUM(esc_low_confidence) AS lc FROM rollup_minute GROUP BY route")}
    assert rolls["slm"]["n"] == 3 and rolls["frontier"]["n"] == 2 and rolls["frontier"]["lc"] == 2
    assert rolls["frontier"]["c"] == pytest.approx(sum(r["cost_usd"] for r in rows))


def write_router_toml(path: Path, slm_url: str, extra: str = "") -> Path:
    path.write_text(f"""
[proxy]
api_keys_env = "FD_NO_SUCH_ENV"
{extra}
[pricing]
slm_gpu_hour_usd = 1.20
slm_gpus = 2

[[task]]
name = "tickets"
slm_base_url = "{slm_url}/v1"
slm_model = "tickets-v3"
confidence = "first_token"
threshold = 0.85
""")
    return path


def test_graceful_shutdown_of_the_real_command_loses_no_rows(slm, tmp_path):
    cfg = write_router_toml(tmp_path / "router.toml", slm.url, extra="shutdown_grace_s = 0.3")
    port = free_port()
    db = tmp_path / "ledger.db"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "fleetdeck", "proxy", "--router-config", str(cfg), "--port", str(port),
                             "--store", str(db)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + WAIT_CEILING_S  # a safety net: the loop waits for /health
        while True:
            try:
                if httpx.get(f"{url}/health", trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            time.sleep(0.1)

        def one(i: int) -> int:
            return httpx.post(f"{url}/v1/chat/completions", trust_env=False, timeout=30,
                              json={"model": "tickets", "messages": [{"role": "user", "content": f"q{i} lp=-0.01"}]}).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, range(300)))
        assert codes == [200] * 300
        # One request still waiting on the small model when the stop comes, past the grace period.
        late = ThreadPoolExecutor(1).submit(lambda: httpx.post(
            f"{url}/v1/chat/completions", trust_env=False, timeout=30,
            json={"model": "tickets", "messages": [{"role": "user", "content": "late sleep=1.5"}]}))
        assert wait_for(lambda: any("late" in json.dumps(c) for c in slm.app.state.calls))
        proc.send_signal(signal.SIGTERM)
        # Requests in flight get the grace period, the ledger is stored, the WAL checkpointed: exit 0.
        assert proc.wait(timeout=30) == 0
        with pytest.raises(httpx.HTTPError):
            late.result().raise_for_status()
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert "fleetdeck proxy stopped: 301 ledger row(s) stored" in out, out
    wal = Path(f"{db}-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # everything is in the database file
    store = open_store(db)
    assert store.execute("SELECT count(*) FROM requests")[0][0] == 301
    assert store.execute("SELECT SUM(requests) FROM rollup_minute")[0][0] == 301
    (cut,) = store.query("SELECT status, reason FROM requests WHERE reason = 'shutdown'")
    assert cut["status"] == 503


def test_router_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "router.toml"
    bad.write_text('[[task]]\nname = "t"\nslm_base_url = "ftp://x"\nslm_model = "m"\nthreshold = 1.5\nconfidence = "vibes"\n')
    with pytest.raises(ConfigError) as exc:
        load_router_config(bad)
    text = str(exc.value)
    assert str(bad) in text and "task[0].threshold" in text and "task[0].slm_base_url" in text and "task[0].confidence" in text
    empty = tmp_path / "empty.toml"
    empty.write_text("[proxy]\nport = 4000\n")
    with pytest.raises(ConfigError, match="task"):
        load_router_config(empty)


def test_the_proxy_refuses_a_non_loopback_address_without_keys(slm, tmp_path):
    cfg = load_router_config(write_router_toml(tmp_path / "router.toml", slm.url))
    with pytest.raises(ProxyStartError, match="without API keys"):
        check_can_start(cfg, "0.0.0.0", free_port())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ProxyStartError, match="cannot listen"):
            check_can_start(cfg, "127.0.0.1", s.getsockname()[1])


def test_the_proxy_command_reports_a_bad_config_and_exits_2(tmp_path):
    from fleetdeck.cli import main

    assert main(["proxy", "--router-config", str(tmp_path / "missing.toml")]) == 2


# --- what a client can send: every case gets an OpenAI-shaped 4xx, and the proxy keeps serving ----------
MSG = '"messages":[{"role":"user","content":"x"}]'
BAD_INPUTS = [
    # (raw body, status, error code, param); a known task also leaves one ledger row with status 400
    (b'{"model":"tickets",' + MSG.encode() + b',"temperature":NaN}', 400, "invalid_json", None),
    (b'{"model":"tickets",' + MSG.encode() + b',"temperature":1e999}', 400, "invalid_json", None),
    (b'{"model":"tickets",' + MSG.encode() + b',"temperature":true}', 400, "invalid_value", "temperature"),
    (b'{"model":"tickets",' + MSG.encode() + b',"temperature":7}', 400, "invalid_value", "temperature"),
    (b'{"model":"tickets","messages":[{"role":"user","content":"\\ud800"}]}', 400, "invalid_encoding", None),
    (b'{"model":"tickets",' + MSG.encode() + b',"top_logprobs":"abc"}', 400, "invalid_value", "top_logprobs"),
    (b'{"model":"tickets",' + MSG.encode() + b',"stream":true,"stream_options":"x"}', 400, "invalid_value", "stream_options"),
    (b'{"model":"tickets",' + MSG.encode() + b',"stream_options":{"include_usage":"yes"}}', 400, "invalid_value", "include_usage"),
    (b'{"model":"tickets",' + MSG.encode() + b',"stream_options":{"include_usage":true}}', 400, "invalid_value", "stream_options"),
    (b'{"model":"tickets",' + MSG.encode() + b',"stream":false,"stream_options":{}}', 400, "invalid_value", "stream_options"),
    (b'{"model":"tickets",' + MSG.encode() + b',"top_logprobs":3}', 400, "invalid_value", "top_logprobs"),
    (b'{"model":"tickets",' + MSG.encode() + b',"logprobs":false,"top_logprobs":3}', 400, "invalid_value", "top_logprobs"),
    (b'{"model":"tickets",' + MSG.encode() + b',"seed":' + b"9" * 5000 + b"}", 400, "invalid_json", None),
    (b'{"model":"tickets",' + MSG.encode() + b',"x":' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "invalid_json", None),
    (b'{"model":"tickets",' + MSG.encode() + b',"max_tokens":-5}', 400, "invalid_value", "max_tokens"),
    (b'{"model":"tickets",' + MSG.encode() + b',"n":0}', 400, "invalid_value", "n"),
    (b'{"model":"tickets",' + MSG.encode() + b',"stop":[1,2]}', 400, "invalid_value", "stop"),
    (b'{"model":"tickets","messages":[{"role":5,"content":"x"}]}', 400, "invalid_value", "messages[0].role"),
    (b'{"model":["tickets"],' + MSG.encode() + b"}", 400, "invalid_value", "model"),  # no task named: no row
    (b'{"model":"nope",' + MSG.encode() + b"}", 404, "model_not_found", None),
    (b"[1,2]", 400, "invalid_request", None),
    (b"\xff\xfe", 400, "invalid_json", None),
]


def test_every_bad_input_gets_an_openai_4xx_and_the_proxy_keeps_serving(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url))
    slm_calls = len(slm.app.state.calls)
    for raw, status, code, param in BAD_INPUTS:
        r = proxy.client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == status, (raw[:80], r.text[:200])
        err = r.json()["error"]
        assert err["code"] == code and err["type"] == "invalid_request_error", (raw[:80], err)
        assert param is None or param in (err["param"] or "") or param in err["message"], (raw[:80], err)
    assert len(slm.app.state.calls) == slm_calls  # nothing bad went upstream
    assert proxy.post("lp=-0.01").status_code == 200
    rows = proxy.rows()
    known_task = [b for b in BAD_INPUTS if b[2] == "invalid_value" and b[3] != "model"]
    assert [x["status"] for x in rows] == [400] * len(known_task) + [200]
    assert all(x["reason"] == "bad_request" and x["route"] == "none" for x in rows[:-1])


def test_an_upstream_4xx_is_the_clients_error_and_the_frontier_is_not_asked(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url))
    before = len(frontier.app.state.calls)
    r = proxy.post("fail=400 patient John Doe")
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "upstream_rejected"
    assert "fake failure" in err["message"]  # the client sees the small model's own words
    assert len(frontier.app.state.calls) == before
    # The frontier refusing the request (after a small-model failure) is also the client's 400, not a 502.
    r = proxy.post("fail=500 f400 patient John Doe")
    assert r.status_code == 400 and "frontier model refused" in r.json()["error"]["message"]
    rows = proxy.rows()
    assert [(x["status"], x["reason"]) for x in rows] == [(400, "client_error"), (400, "slm_error")]
    # store_text is off: the upstreams' error text (which quotes the prompt) is not in the ledger.
    assert all("John Doe" not in (x["error"] or "") for x in rows)


def test_upstream_error_text_is_kept_only_when_the_task_stores_text(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url))
    assert proxy.post("fail=500 ffail patient John Doe").status_code == 502
    assert proxy.post("lp=-2.0 ffail patient John Doe").status_code == 200
    rows = proxy.rows()
    assert all("John Doe" not in (x["error"] or "") for x in rows) and rows[0]["error"] and rows[1]["error"]
    proxy = make_proxy(make_config(slm.url, frontier.url, store_text=True))
    assert proxy.post("fail=500 ffail patient John Doe").status_code == 502
    assert "John Doe" in proxy.rows()[0]["error"]


def test_the_frontier_timeout_is_one_attempt_not_three(slm, frontier, make_proxy):
    cfg = make_config(slm.url, frontier.url)
    cfg = cfg.model_copy(update={"proxy": cfg.proxy.model_copy(update={"frontier_timeout_s": 0.3})})
    proxy = make_proxy(cfg)
    before = len(frontier.app.state.calls)
    r = proxy.post("fail=500 fsleep=1.5")
    assert r.status_code == 502 and "no answer within 0.3 s" in r.json()["error"]["message"]
    time.sleep(1.6)  # let a retry, if litellm made one, reach the fake before counting
    assert len(frontier.app.state.calls) - before == 1


@pytest.mark.parametrize("key,value", [("frontier_timeout_s", "inf"), ("frontier_timeout_s", "nan"),
                                       ("body_timeout_s", "0")])
def test_timeouts_that_are_not_bounds_are_refused_in_config(tmp_path, key, value):
    path = tmp_path / "router.toml"
    path.write_text(f"[proxy]\n{key} = {value}\n[[task]]\nname = \"t\"\nslm_base_url = \"http://127.0.0.1:1/v1\"\n"
                    "slm_model = \"m\"\nthreshold = 0.5\n")
    with pytest.raises(ConfigError, match=key):
        load_router_config(path)


def test_a_body_that_never_finishes_gets_408_and_a_disconnect_is_one_line(slm, frontier, make_proxy, caplog):
    cfg = make_config(slm.url, frontier.url)
    cfg = cfg.model_copy(update={"proxy": cfg.proxy.model_copy(update={"body_timeout_s": 0.5})})
    proxy = make_proxy(cfg)
    with socket.create_connection(("127.0.0.1", proxy.server.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\":")
        s.settimeout(30)
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 408") and "request_timeout" in head
    with caplog.at_level("INFO", logger="fleetdeck.proxy"):
        with socket.create_connection(("127.0.0.1", proxy.server.port)) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"mo")
        assert wait_for(lambda: any("disconnected" in r.getMessage() for r in caplog.records))
    assert proxy.post("lp=-0.01").status_code == 200



def test_a_full_store_loses_no_row_while_clients_get_answers(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url))
    proxy.ledger.retry_every_s = 0.05
    store = proxy.store
    store.execute(f"PRAGMA max_page_count = {store.execute('PRAGMA page_count')[0][0]}")  # SQLITE_FULL from here
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: proxy.post(f"q{i} lp=-0.01").status_code, range(200)))
    assert codes == [200] * 200
    # (the rows that fit the free space left in the file's last page are stored; the rest are held)
    ledger = proxy.ledger
    assert wait_for(lambda: ledger.write_failures > 0 and ledger.pending + ledger.written == 200 and ledger.pending > 100)
    metrics = proxy.client.get("/metrics").text
    assert f"fleetdeck_ledger_rows_pending {float(ledger.pending)}" in metrics
    assert "fleetdeck_ledger_write_failures_total" in metrics
    health = proxy.client.get("/health").json()
    assert health["ledger_pending"] == ledger.pending and "full" in health["ledger_error"]
    store.execute("PRAGMA max_page_count = 1073741823")  # space returns
    assert wait_for(lambda: proxy.ledger.pending == 0)
    rows = proxy.rows()
    assert len(rows) == 200 and len({r["id"] for r in rows}) == 200
