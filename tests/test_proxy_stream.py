"""Streamed requests (issue 28): the small model's answer is streamed through, decided on the task's window,
under two named bounds; through real HTTP against a paced streaming stand-in SLM (tests/fakes/fake_openai.py).

Order, not timing: where a test needs "before the SLM finished", the stand-in holds its remaining tokens on
an event the test sets only after the client has its first chunk."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest

from engine.router.config import RouterConfig, load_router_config
from store.config_files import ConfigError
from tests.proxy_helpers import Proxy, frontier, make_config, slm  # noqa: F401 (fixtures)


@pytest.fixture
def make_proxy(tmp_path, monkeypatch, slm):
    monkeypatch.setenv("FAKE_FRONTIER_KEY", "sk-fake")
    slm.app.state.release.clear()
    made: list[Proxy] = []

    def factory(config: RouterConfig) -> Proxy:
        p = Proxy(config, tmp_path / f"fd{len(made)}.db")
        made.append(p)
        return p

    yield factory
    slm.app.state.release.set()
    for p in made:
        p.stop()


def events_of(text: str) -> list[Any]:
    return [e if e == "[DONE]" else json.loads(e) for e in
            (line[6:] for line in text.splitlines() if line.startswith("data: "))]


def content_of(events: list[Any]) -> str:
    return "".join((c["choices"][0]["delta"].get("content") or "")
                   for c in events if isinstance(c, dict) and c.get("choices"))


def body(content: str, **kw: Any) -> dict[str, Any]:
    return {"model": "tickets", "messages": [{"role": "user", "content": content}], "stream": True, **kw}


# --- the first chunk comes before the small model has finished --------------------------------------------
@pytest.mark.parametrize("task, window", [({"confidence": "first_token"}, "first_token"),
                                          ({"confidence": "mean_token", "confidence_window_tokens": 1}, "first_token")])
def test_the_first_chunk_reaches_the_client_before_the_slm_has_finished(slm, frontier, make_proxy, task, window):
    proxy = make_proxy(make_config(slm.url, frontier.url, **task))
    n = None
    seen: list[str] = []
    with proxy.client.stream("POST", "/v1/chat/completions", json=body("hold tokens=4")) as r:
        assert r.status_code == 200 and r.headers["x-fleetdeck-route"] == "slm"
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            seen.append(content_of([json.loads(line[6:])]))
            if "".join(seen):  # the client has the first token
                if n is None:
                    n = len(slm.app.state.calls)
                    # The stand-in is holding the rest of its answer: it has not finished.
                    assert ("finished", n) not in slm.app.state.events
                    assert ("first_token", n) in slm.app.state.events
                    slm.app.state.release.set()
    assert n is not None and "".join(seen) == "slm answer w2 w3"
    assert ("finished", n) in slm.app.state.events
    (row,) = proxy.rows()
    assert row["route"] == "slm" and row["reason"] == "confident" and row["status"] == 200
    assert row["decision_window"] == window and row["slm_ttft_ms"] > 0 and row["stream"] == 1
    assert row["slm_completion_tokens"] == 4 and row["slm_bound"] is None


def test_a_window_of_n_tokens_holds_n_tokens_then_streams(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url, confidence="min_token", confidence_window_tokens=3))
    r = proxy.post("tokens=6 lp=-0.01,-0.01,-0.01,-4,-4,-4", stream=True)
    # The low tokens come after the window: the decision was made on the first three, and stands.
    assert r.headers["x-fleetdeck-route"] == "slm"
    assert content_of(events_of(r.text)) == "slm answer w2 w3 w4 w5"
    (row,) = proxy.rows()
    assert row["decision_window"] == "first_3_tokens" and row["reason"] == "confident"


# --- an escalation decided inside the window sends nothing of the SLM's answer ------------------------------
@pytest.mark.parametrize("task, prompt", [
    ({"confidence": "first_token"}, "lp=-3,-0.01,-0.01"),
    ({"confidence": "mean_token", "confidence_window_tokens": 3}, "lp=-0.01,-0.01,-6,-0.01"),
    ({"confidence": "min_token"}, "lp=-0.01,-0.01,-0.01,-6"),  # the whole answer
])
def test_an_escalation_in_the_window_sends_no_slm_text(slm, frontier, make_proxy, task, prompt):
    proxy = make_proxy(make_config(slm.url, frontier.url, **task))
    r = proxy.post(prompt, stream=True)
    events = events_of(r.text)
    assert r.headers["x-fleetdeck-route"] == "frontier" and events[-1] == "[DONE]"
    assert content_of(events) == "frontier streamed answer"
    assert "slm" not in r.text and "chatcmpl-slm" not in r.text
    (row,) = proxy.rows()
    assert row["reason"] == "low_confidence" and row["escalated"] == 1 and row["route"] == "frontier"
    assert row["decision_window"] == Proxy_window(task)


def Proxy_window(task: dict[str, Any]) -> str:
    if task["confidence"] == "first_token":
        return "first_token"
    n = task.get("confidence_window_tokens")
    return "whole_answer" if n is None else f"first_{n}_tokens"


# --- the two bounds ---------------------------------------------------------------------------------------
def test_no_first_token_in_time_escalates_with_the_first_token_reason(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url, confidence="first_token", slm_first_token_timeout_s=0.3))
    r = proxy.post("firstwait=5 lp=-0.01", stream=True)
    assert r.headers["x-fleetdeck-route"] == "frontier"
    assert content_of(events_of(r.text)) == "frontier streamed answer"
    (row,) = proxy.rows()
    assert row["reason"] == "slm_first_token_timeout" and row["slm_bound"] == "first_token"
    assert row["slm_ttft_ms"] is None


def test_no_first_token_and_no_frontier_is_an_error_the_client_sees_matching_the_ledger(slm, make_proxy):
    proxy = make_proxy(make_config(slm.url, None, confidence="first_token", slm_first_token_timeout_s=0.3))
    r = proxy.post("firstwait=5", stream=True)
    err = r.json()["error"]
    assert r.status_code == 503 and "no first token within slm_first_token_timeout_s = 0.3 s" in err["message"]
    (row,) = proxy.rows()
    assert row["reason"] == "slm_first_token_timeout" and row["status"] == 503
    assert row["error"] == err["message"]


def test_a_stream_past_the_total_bound_ends_with_an_error_event_matching_the_ledger(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url, confidence="first_token",
                                   slm_first_token_timeout_s=1, slm_total_timeout_s=1.5))
    r = proxy.post("tokens=5 stallafter=2", stream=True)
    assert r.status_code == 200 and r.headers["x-fleetdeck-route"] == "slm"
    events = events_of(r.text)
    assert content_of(events) == "slm answer"  # relayed as it came, before the cut
    err = events[-1]["error"]
    assert err["code"] == "upstream_error"
    assert err["message"] == "small model stream cut: the answer did not end within slm_total_timeout_s = 1.5 s"
    (row,) = proxy.rows()
    assert row["status"] == 502 and row["reason"] == "slm_total_timeout" and row["slm_bound"] == "total"
    assert row["error"] == err["message"]


def test_a_whole_answer_window_past_the_total_bound_escalates_with_the_total_reason(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url, slm_first_token_timeout_s=1, slm_total_timeout_s=1.5))
    r = proxy.post("tokens=5 stallafter=2", stream=True)
    assert r.headers["x-fleetdeck-route"] == "frontier" and "slm" not in r.text
    (row,) = proxy.rows()
    assert row["reason"] == "slm_total_timeout" and row["slm_bound"] == "total"


@pytest.mark.parametrize("confidence", ["first_token", "mean_token"])
def test_a_slow_healthy_slm_is_not_escalated_at_the_default_settings(slm, frontier, make_proxy, confidence):
    # First token at once, the whole answer well past 2 s (30 tokens, 0.09 s apart).
    cfg = make_config(slm.url, frontier.url, confidence=confidence)
    task = cfg.task[0].model_dump()
    for key in ("slm_first_token_timeout_s", "slm_total_timeout_s"):
        task.pop(key)  # the defaults, as an operator who sets nothing gets them
    cfg = RouterConfig.model_validate({**cfg.model_dump(), "task": [task]})
    proxy = make_proxy(cfg)
    r = proxy.post("tokens=30 pace=0.09", stream=True)
    events = events_of(r.text)
    assert r.headers["x-fleetdeck-route"] == "slm" and events[-1] == "[DONE]"
    (row,) = proxy.rows()
    assert row["escalated"] == 0 and row["reason"] == "confident" and row["slm_completion_tokens"] == 30


# --- config -----------------------------------------------------------------------------------------------
def _task_toml(tmp_path, extra: str):
    path = tmp_path / "router.toml"
    path.write_text("[[task]]\nname = \"t\"\nslm_base_url = \"http://127.0.0.1:1/v1\"\nslm_model = \"m\"\n"
                    f"threshold = 0.5\n{extra}\n")
    return path


def test_slm_timeout_s_is_a_deprecated_alias_for_the_first_token_bound(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fleetdeck.config"):
        task = load_router_config(_task_toml(tmp_path, "slm_timeout_s = 3.5")).task[0]
    assert task.slm_first_token_timeout_s == 3.5 and task.slm_total_timeout_s == 120
    (record,) = [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert "\n" not in record.getMessage() and "slm_first_token_timeout_s" in record.getMessage()
    defaults = load_router_config(_task_toml(tmp_path, "")).task[0]
    assert (defaults.slm_first_token_timeout_s, defaults.slm_total_timeout_s) == (2.0, 120.0)


def test_a_total_bound_below_the_first_token_bound_is_refused_naming_both(tmp_path):
    with pytest.raises(ConfigError, match="slm_total_timeout_s.*slm_first_token_timeout_s"):
        load_router_config(_task_toml(tmp_path, "slm_first_token_timeout_s = 5\nslm_total_timeout_s = 1"))


# --- real clients -----------------------------------------------------------------------------------------
def test_the_openai_sdk_streams_and_sees_a_cut(slm, frontier, make_proxy):
    openai = pytest.importorskip("openai")
    proxy = make_proxy(make_config(slm.url, frontier.url, confidence="first_token",
                                   slm_first_token_timeout_s=1, slm_total_timeout_s=1.5))
    with httpx.Client(trust_env=False) as http:
        client = openai.OpenAI(base_url=f"{proxy.server.url}/v1", api_key="unused", http_client=http, max_retries=0)
        pieces = []
        n = None
        for chunk in client.chat.completions.create(model="tickets", stream=True,
                                                    messages=[{"role": "user", "content": "hold tokens=3"}]):
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece:
                pieces.append(piece)
                if n is None:
                    n = len(slm.app.state.calls)
                    assert ("finished", n) not in slm.app.state.events  # streamed, not buffered
                    slm.app.state.release.set()
        assert "".join(pieces) == "slm answer w2"
        stream = client.chat.completions.create(model="tickets", stream=True,
                                                messages=[{"role": "user", "content": "tokens=4 stallafter=1"}])
        with pytest.raises(openai.APIError, match="slm_total_timeout_s"):
            for _ in stream:
                pass
    rows = proxy.rows()
    assert [(r["reason"], r["status"]) for r in rows] == [("confident", 200), ("slm_total_timeout", 502)]


def test_litellm_streams_through_the_proxy(slm, frontier, make_proxy):
    litellm = pytest.importorskip("litellm")
    proxy = make_proxy(make_config(slm.url, frontier.url, confidence="first_token"))
    stream = litellm.completion(model="openai/tickets", api_base=f"{proxy.server.url}/v1", api_key="unused",
                                messages=[{"role": "user", "content": "tokens=5"}], stream=True, num_retries=0)
    text = "".join((c.choices[0].delta.content or "") for c in stream if c.choices)
    assert text == "slm answer w2 w3 w4"
    (row,) = proxy.rows()
    assert row["route"] == "slm" and row["decision_window"] == "first_token"


def test_a_failed_frontier_after_low_confidence_relays_the_held_slm_stream(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url, confidence="first_token"))
    r = proxy.post("lp=-3,-3,-3 ffail", stream=True)
    events = events_of(r.text)
    assert r.headers["x-fleetdeck-route"] == "slm" and r.headers["x-fleetdeck-escalated"] == "true"
    assert content_of(events) == "slm answer w2" and events[-1] == "[DONE]"
    (row,) = proxy.rows()
    assert row["route"] == "slm" and row["escalated"] == 1 and row["error"].startswith("frontier failed")


# --- concurrency ------------------------------------------------------------------------------------------
def test_more_streams_than_one_pool_holds_are_all_open_at_once_and_each_gets_a_row(slm, frontier, make_proxy):
    """48 streams (more than one upstream pool's 32 connections) held open by the stand-in at once: every
    client has its first token before any stream is released, so none waited for another's connection."""
    from concurrent.futures import ThreadPoolExecutor

    from engine.router.upstream_pool import SHARD_CONNECTIONS
    from tests.helpers import wait_for

    streams = SHARD_CONNECTIONS + 16
    proxy = make_proxy(make_config(slm.url, frontier.url, confidence="first_token"))
    firsts: list[bool] = []

    def client() -> str:
        seen = []
        with httpx.Client(base_url=proxy.server.url, timeout=60, trust_env=False) as c:
            with c.stream("POST", "/v1/chat/completions", json=body("hold tokens=3")) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        piece = content_of([json.loads(line[6:])])
                        if piece and not "".join(seen):
                            firsts.append(not slm.app.state.release.is_set())
                        seen.append(piece)
        return "".join(seen)

    with ThreadPoolExecutor(streams) as pool:
        futures = [pool.submit(client) for _ in range(streams)]
        all_first = wait_for(lambda: len(firsts) == streams, timeout=60)
        slm.app.state.release.set()
        texts = [f.result() for f in futures]
    assert all_first and all(firsts), f"{len(firsts)} of {streams} streams had their first token while all were held"
    assert texts == ["slm answer w2"] * streams
    rows = proxy.rows()
    assert len(rows) == streams and {r["status"] for r in rows} == {200}


# --- the small model's connections are kept ----------------------------------------------------------------
def test_a_finished_answer_gives_its_connection_back_for_the_next_request(slm, frontier, make_proxy, monkeypatch):
    """`data: [DONE]` comes before the end of the HTTP body: the proxy reads to the end, so the connection
    goes back to its pool and the next request, streamed or whole, uses it (the stand-in counts connections
    by their client address). One pool here, so "the next request" is the one that reuses it."""
    import functools

    import engine.router.proxy as proxy_module
    from engine.router.upstream_pool import SHARD_CONNECTIONS, UpstreamClients

    monkeypatch.setattr(proxy_module, "UpstreamClients",
                        functools.partial(UpstreamClients, host_connections=SHARD_CONNECTIONS))
    proxy = make_proxy(make_config(slm.url, frontier.url, confidence="first_token"))
    start = len(slm.app.state.peers)
    for i in range(8):
        r = proxy.post("tokens=3", stream=i % 2 == 0, logprobs=True)
        assert r.status_code == 200 and r.headers["x-fleetdeck-route"] == "slm"
    peers = slm.app.state.peers[start:]
    assert len(peers) == 8 and len(set(peers)) == 1, f"{len(set(peers))} connections for 8 sequential requests"
    rows = proxy.rows()
    assert len(rows) == 8 and {(r["status"], r["reason"]) for r in rows} == {(200, "confident")}


@pytest.mark.parametrize("stream", [True, False])
def test_an_answer_whose_body_does_not_end_after_done_is_whole_and_stands(slm, frontier, make_proxy, stream):
    """A server that keeps its body open after `data: [DONE]`: the answer is whole at [DONE]; waiting for
    the body's end is brief and never turns a finished answer into a cut."""
    proxy = make_proxy(make_config(slm.url, frontier.url, confidence="first_token"))
    r = proxy.post("tokens=3 donestall", stream=stream)
    assert r.status_code == 200 and r.headers["x-fleetdeck-route"] == "slm"
    if stream:
        events = events_of(r.text)
        assert events[-1] == "[DONE]" and content_of(events) == "slm answer w2"
    else:
        assert r.json()["choices"][0]["message"]["content"] == "slm answer w2"
    (row,) = proxy.rows()
    assert (row["status"], row["reason"], row["error"], row["slm_bound"]) == (200, "confident", None, None)
    assert row["slm_completion_tokens"] == 3


# --- property: the client gets one model's answer, never a mix -------------------------------------------
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture(scope="module")
def window_proxies(slm, frontier, tmp_path_factory):
    """One proxy per confidence method (a 3-token window for mean/min), kept for every drawn example."""
    tmp = tmp_path_factory.mktemp("window")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FAKE_FRONTIER_KEY", "sk-fake")
        proxies = {m: Proxy(make_config(slm.url, frontier.url, confidence=m, threshold=0.5,
                                        **({} if m == "first_token" else {"confidence_window_tokens": 3})),
                            tmp / f"{m}.db")
                   for m in ("first_token", "mean_token", "min_token")}
        yield proxies
        for p in proxies.values():
            p.stop()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["first_token", "mean_token", "min_token"]),
       lps=st.lists(st.sampled_from([-0.01, -0.2, -0.9, -3.0]), min_size=1, max_size=6))
def test_a_streamed_answer_is_one_models_decided_on_its_window(window_proxies, method, lps):
    import math

    from engine.router.confidence import confidence

    proxy = window_proxies[method]
    n = 1 if method == "first_token" else 3
    expect_slm = confidence(method, lps[:n]) >= 0.5
    r = proxy.post("lp=" + ",".join(str(x) for x in lps), stream=True)
    events = events_of(r.text)
    assert r.status_code == 200 and events[-1] == "[DONE]"
    text = content_of(events)
    if expect_slm:
        assert r.headers["x-fleetdeck-route"] == "slm"
        assert text == "".join(("slm ", "answer")[i] if i < 2 else f" w{i}" for i in range(len(lps)))
        assert float(r.headers["x-fleetdeck-confidence"]) == pytest.approx(
            math.exp(sum(lps[:n]) / len(lps[:n])) if method == "mean_token" else math.exp(min(lps[:n])), abs=1e-4)
    else:
        assert r.headers["x-fleetdeck-route"] == "frontier"
        assert text == "frontier streamed answer" and "slm" not in r.text


def test_an_slm_that_does_not_stream_is_an_slm_error_and_escalates(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url, confidence="first_token"))
    r = proxy.post("nostream", stream=True)
    assert r.headers["x-fleetdeck-route"] == "frontier" and content_of(events_of(r.text)) == "frontier streamed answer"
    (row,) = proxy.rows()
    assert row["reason"] == "slm_error" and row["decision_window"] == "first_token"


# --- a client that wants one JSON answer: the SLM is still streamed upstream -------------------------------
def _default_bounds(cfg: RouterConfig) -> RouterConfig:
    task = cfg.task[0].model_dump()
    for key in ("slm_first_token_timeout_s", "slm_total_timeout_s"):
        task.pop(key)  # the defaults, as an operator who sets nothing gets them
    return RouterConfig.model_validate({**cfg.model_dump(), "task": [task]})


@pytest.mark.parametrize("confidence", ["first_token", "mean_token"])
def test_a_whole_answer_from_a_slow_healthy_slm_is_not_escalated_at_the_default_settings(slm, frontier, make_proxy,
                                                                                          confidence):
    # First token at once, the whole answer well past 2 s (30 tokens, 0.09 s apart); the client did not stream.
    proxy = make_proxy(_default_bounds(make_config(slm.url, frontier.url, confidence=confidence)))
    r = proxy.post("tokens=30 pace=0.09")
    assert r.headers["content-type"].startswith("application/json") and r.headers["x-fleetdeck-route"] == "slm"
    answer = r.json()
    assert answer["object"] == "chat.completion" and answer["id"] == "chatcmpl-slm"
    assert answer["choices"][0]["message"] == {"role": "assistant",
                                               "content": "slm answer" + "".join(f" w{i}" for i in range(2, 30))}
    assert answer["choices"][0]["finish_reason"] == "stop" and answer["usage"]["completion_tokens"] == 30
    assert slm.app.state.calls[-1]["stream"] is True  # asked as a stream, so the first-token bound watched it
    assert slm.app.state.calls[-1]["stream_options"] == {"include_usage": True}
    (row,) = proxy.rows()
    assert row["escalated"] == 0 and row["reason"] == "confident" and row["stream"] == 0
    assert row["slm_completion_tokens"] == 30 and row["slm_ttft_ms"] is not None


def test_a_whole_answer_from_an_slm_that_never_starts_escalates_on_the_first_token_bound(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url, slm_first_token_timeout_s=0.3))
    r = proxy.post("firstwait=5 lp=-0.01")  # the answer's head comes, its first token not for 5 s
    assert r.status_code == 200 and r.headers["x-fleetdeck-route"] == "frontier"
    assert r.json()["choices"][0]["message"]["content"] == "frontier answer"
    (row,) = proxy.rows()
    assert row["reason"] == "slm_first_token_timeout" and row["slm_bound"] == "first_token" and row["escalated"] == 1
    assert row["slm_ttft_ms"] is None


LPS = [-0.1, -0.25, -0.02, -0.4]


@pytest.mark.parametrize("method", ["first_token", "mean_token", "min_token"])
def test_a_whole_answer_assembled_from_the_stream_carries_the_same_confidence_usage_and_logprobs(
        slm, frontier, make_proxy, method):
    """The assembled answer against the stand-in's known log-probabilities, and against the same SLM
    answering with one JSON body (a server that ignores `stream`): the ledger rows agree."""
    import math

    from engine.router.confidence import confidence
    from tests.fakes.fake_openai import SLM_PROMPT_TOKENS

    proxy = make_proxy(make_config(slm.url, frontier.url, confidence=method, threshold=0.5))
    prompt = "lp=" + ",".join(str(x) for x in LPS)
    streamed = proxy.post(prompt, logprobs=True)
    whole = proxy.post(prompt + " jsononly", logprobs=True)
    expected = confidence(method, LPS)
    for r in (streamed, whole):
        assert r.headers["x-fleetdeck-route"] == "slm"
        assert float(r.headers["x-fleetdeck-confidence"]) == pytest.approx(expected, abs=1e-4)
    items = streamed.json()["choices"][0]["logprobs"]["content"]
    assert [i["logprob"] for i in items] == LPS and "".join(i["token"] for i in items) == "slm answer w2 w3"
    assert streamed.json()["usage"] == {"prompt_tokens": SLM_PROMPT_TOKENS, "completion_tokens": len(LPS),
                                        "total_tokens": SLM_PROMPT_TOKENS + len(LPS)}
    assert whole.json()["choices"][0]["message"]["content"] == "slm answer"  # the JSON body, as it came
    # Not asked for: removed, as before.
    assert proxy.post(prompt).json()["choices"][0].get("logprobs") is None
    rows = proxy.rows()
    assert [r["reason"] for r in rows] == ["confident"] * 3
    for row in rows:
        assert row["confidence"] == pytest.approx(expected) and row["confidence"] == pytest.approx(
            math.exp({"first_token": LPS[0], "mean_token": sum(LPS) / 4, "min_token": min(LPS)}[method]))
        assert (row["slm_prompt_tokens"], row["slm_completion_tokens"]) == (SLM_PROMPT_TOKENS, len(LPS))
        assert (row["prompt_tokens"], row["completion_tokens"]) == (SLM_PROMPT_TOKENS, len(LPS))
    assert rows[0]["all_frontier_cost_usd"] == pytest.approx(rows[1]["all_frontier_cost_usd"])


def test_a_whole_answer_without_logprobs_or_past_the_total_bound_escalates_with_its_reason(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url, slm_first_token_timeout_s=1, slm_total_timeout_s=1.5))
    assert proxy.post("nolp").headers["x-fleetdeck-route"] == "frontier"
    assert proxy.post("tokens=5 stallafter=2").headers["x-fleetdeck-route"] == "frontier"
    assert proxy.post("nostream").headers["x-fleetdeck-route"] == "frontier"  # a JSON body that is no answer
    rows = proxy.rows()
    assert [(r["reason"], r["slm_bound"]) for r in rows] == [("no_logprobs", None), ("slm_total_timeout", "total"),
                                                             ("slm_error", None)]


def test_tool_call_deltas_are_assembled_into_one_call_per_index():
    from engine.router.slm_stream import assemble_completion

    def chunk(delta: dict[str, Any], **choice: Any) -> dict[str, Any]:
        return {"id": "c1", "model": "m", "created": 1, "choices": [{"index": 0, "delta": delta, **choice}]}

    chunks = [
        chunk({"role": "assistant", "content": None}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "lookup", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"id\":"}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "close", "arguments": "{}"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"7\"}"}}]}),
        chunk({}, finish_reason="tool_calls"),
    ]
    answer = assemble_completion(chunks, {"prompt_tokens": 3, "completion_tokens": 4}, missing_logprobs=False)
    (choice,) = answer["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {"id": "call_a", "type": "function", "function": {"name": "lookup", "arguments": "{\"id\":\"7\"}"}},
        {"id": "call_b", "type": "function", "function": {"name": "close", "arguments": "{}"}},
    ]
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 4} and answer["id"] == "c1"


# --- a small model whose chunks are not OpenAI chunks (Hypothesis) --------------------------------------------
def _odd_slm_app() -> Any:
    """A small model that streams one good token, the chunk `app.state.odd` (text sent as the data line as it
    is), and a good end; or the odd chunk first when `app.state.first` is set."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    def good(content: str | None, finish: str | None = None) -> str:
        delta = {} if content is None else {"content": content}
        choice = {"index": 0, "delta": delta, "finish_reason": finish,
                  "logprobs": {"content": [{"token": "t", "logprob": -0.01, "bytes": [116], "top_logprobs": []}]}}
        return json.dumps({"id": "o", "object": "chat.completion.chunk", "created": 1, "model": "o", "choices": [choice]})

    async def chat(request: Any) -> Any:
        await request.body()
        odd, first = request.app.state.odd, request.app.state.first

        async def gen() -> Any:
            lines = [good("a"), odd, good(None, "stop")] if not first else [odd, good("a"), good(None, "stop")]
            for line in lines:
                yield f"data: {line}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    app.state.odd, app.state.first = "{}", False
    return app


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(max_size=5), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(["content", "index", "delta", "role", "x"]), inner, max_size=3),
                           max_leaves=6)
ODD_AT = ["choices", "choice", "delta", "content", "index", "tool_calls", "usage", "logprobs", "no_choices",
          "usage_only"]


def _odd_chunk(where: str, value: Any) -> str:
    chunk: dict[str, Any] = {"id": "o", "object": "chat.completion.chunk", "created": 1, "model": "o",
                             "choices": [{"index": 0, "delta": {"content": "b"}, "finish_reason": None}]}
    choice = chunk["choices"][0]
    if where == "choices":
        chunk["choices"] = value
    elif where == "choice":
        chunk["choices"] = [value]
    elif where == "delta":
        choice["delta"] = value
    elif where in ("content", "tool_calls"):
        choice["delta"][where] = value
    elif where in ("index", "logprobs"):
        choice[where] = value
    elif where == "usage":
        chunk["usage"] = value
    elif where == "usage_only":  # a usage chunk whose `choices` is missing or null (OpenAI's has [])
        chunk["usage"] = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        if value is None:
            chunk["choices"] = None
        else:
            del chunk["choices"]
    else:
        del chunk["choices"]
    return json.dumps(chunk)


@pytest.fixture(scope="module")
def odd_slm():
    from tests.fakes.fake_openai import ServerThread

    server = ServerThread(_odd_slm_app()).start()
    yield server
    server.stop()


@example(where='usage_only', value=None, first=False, stream=True, raw=None)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(ODD_AT), value=JSON_VALUES, first=st.booleans(), stream=st.booleans(),
       raw=st.one_of(st.none(), st.none(), st.none(),  # mostly a chunk made from `where`, sometimes raw text
                     st.sampled_from(["not json", "[1, 2]", '"text"', "{\"choices\": [}"])))
def test_an_odd_slm_chunk_reaches_no_client_as_it_is(odd_slm, tmp_path_factory, where, value, first, stream, raw):
    """Before: a small model's chunk with `choices` not a list, a choice or `delta` not an object, or content
    that is not text was relayed verbatim (an SDK reading `chunk.choices[0].delta.content` then crashes with
    an AttributeError or TypeError), or before the decision it was a 500 (an int `choices`). Now a chunk no
    client can read is a broken small-model stream: before the decision the small model failed (here: no
    frontier, a 503); after it, the client gets an OpenAI-shaped error event (the SDK raises APIError) and
    the row says 502 and why. A chunk of the right shape is relayed. Never a 500, one row per request."""
    openai = pytest.importorskip("openai")
    odd = raw if raw is not None else _odd_chunk(where, value)
    odd_slm.app.state.odd, odd_slm.app.state.first = odd, first
    proxy = Proxy(make_config(odd_slm.url, None, confidence="first_token", threshold=0.5),
                  tmp_path_factory.mktemp("odd") / "fd.db")
    try:
        with httpx.Client(trust_env=False) as http:
            client = openai.OpenAI(base_url=f"{proxy.server.url}/v1", api_key="unused", http_client=http, max_retries=0)
            messages = [{"role": "user", "content": "q"}]
            try:
                if stream:
                    text = ""
                    for chunk in client.chat.completions.create(model="tickets", stream=True, messages=messages,
                                                                stream_options={"include_usage": True}):
                        for choice in chunk.choices:  # what a client's loop does with every chunk
                            piece = choice.delta.content
                            assert piece is None or isinstance(piece, str)
                            text += piece or ""
                else:
                    text = client.chat.completions.create(model="tickets", messages=messages).choices[0].message.content
                    assert isinstance(text, str)
                outcome = "answered"
            except openai.APIStatusError as exc:
                assert exc.status_code in (502, 503), exc  # the small model failed and there is no frontier
                outcome = "refused"
            except openai.APIError as exc:  # an error event in the stream
                assert "not an OpenAI chat chunk" in str(exc) or "not an OpenAI chat stream" in str(exc), exc
                outcome = "cut"
    finally:
        rows = proxy.rows()
    assert len(rows) == 1, rows
    (row,) = rows
    assert row["status"] != 500 and row["reason"] != "internal_error", row
    if outcome == "cut":
        assert stream and not first and row["status"] == 502 and "not an OpenAI chat" in row["error"]
    elif outcome == "refused":
        assert row["status"] in (502, 503) and row["reason"] in ("slm_error", "no_logprobs"), row
    else:
        assert row["status"] == 200 and "a" in text, (text, row)  # the good token, and the odd chunk's text if it was good
