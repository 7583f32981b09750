"""The proxy's front door, over real HTTP and real sockets: typed requests, bounded depth, header limits,
a bounded stream that ends in an error event the ledger agrees with, /health that tells the truth, and
property tests (Hypothesis) over bodies generated from OpenAI's schema and then mutated."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.router.config import RouterConfig
from engine.router.request_check import MAX_DEPTH, json_depth_over
from tests.proxy_helpers import Proxies, Proxy, free_port, frontier, make_config, slm  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def frontier_key():
    # Module scope (the property tests share one proxy), so not monkeypatch.
    old = os.environ.get("FAKE_FRONTIER_KEY")
    os.environ["FAKE_FRONTIER_KEY"] = "sk-fake"
    yield
    if old is None:
        os.environ.pop("FAKE_FRONTIER_KEY", None)
    else:
        os.environ["FAKE_FRONTIER_KEY"] = old


@pytest.fixture
def make_proxy(tmp_path, frontier_key):
    proxies = Proxies(tmp_path)
    yield proxies
    proxies.close()


def with_proxy(config: RouterConfig, **proxy: Any) -> RouterConfig:
    return config.model_copy(update={"proxy": config.proxy.model_copy(update=proxy)})


def assert_openai_error(r: httpx.Response, status: int | None = None) -> dict[str, Any]:
    assert 400 <= r.status_code < 500 if status is None else r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == "invalid_request_error" and "param" in err and "code" in err, err
    return err


FORCE = {"X-Fleetdeck-Escalate": "always"}


# --- 1 and 2: typed requests; nothing unchecked reaches an upstream ------------------------------------
UNTYPED = [
    # (messages or extra parameters, the field the 400 names); each reached litellm (502) or was accepted
    ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [["nested"]]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "http://x"}]}]},
     "messages[0].content[0].image_url"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x", "secret": 1}]}, "messages[0].secret"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "assistant"}]}, "messages[0]"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "has space"}}}, "response_format.json_schema.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools[0].function"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": "sometimes", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ({"logit_bias": {"hello": 5}}, "logit_bias.hello"),
    ({"logit_bias": {"50256": 101}}, "logit_bias.50256"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"user": 7}, "user"),
    ({"user": "u" * 257}, "user"),
    ({"stop": {"a": 1}}, "stop"),
]


@pytest.mark.parametrize("extra, param", UNTYPED, ids=[p for _, p in UNTYPED])
def test_untyped_input_is_a_400_naming_the_field_on_the_escalation_path(slm, frontier, make_proxy, extra, param):
    proxy = make_proxy(make_config(slm.url, frontier.url))
    body = {"model": "tickets", "messages": [{"role": "user", "content": "x"}], **extra}
    calls = len(slm.app.state.calls), len(frontier.app.state.calls)
    for headers in (FORCE, {}):  # forced to the frontier, and the small model's path
        r = proxy.client.post("/v1/chat/completions", json=body, headers=headers)
        err = assert_openai_error(r, 400)
        assert err["param"] == param and err["code"] == "invalid_value", err
    assert (len(slm.app.state.calls), len(frontier.app.state.calls)) == calls  # nothing went upstream
    assert proxy.post("lp=-0.01").status_code == 200
    rows = proxy.rows()
    assert [(x["status"], x["reason"]) for x in rows[:2]] == [(400, "bad_request")] * 2 and rows[2]["status"] == 200


def test_the_full_schema_reaches_the_frontier_as_checked(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url))
    tools = [{"type": "function", "function": {"name": "lookup", "description": "find a ticket",
                                              "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}}]
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "what is this"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{\"id\":\"7\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ticket 7: printer"},
        {"role": "user", "content": "and now?"},
    ]
    body = {"model": "tickets", "messages": messages, "tools": tools, "tool_choice": {"type": "function", "function": {"name": "lookup"}},
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True}},
            "logit_bias": {"50256": -100}, "user": "desk-7", "stop": ["\n\n"], "temperature": 0.2,
            "not_openai": {"dropped": True}}
    r = proxy.client.post("/v1/chat/completions", json=body, headers=FORCE)
    assert r.status_code == 200, r.text
    sent = frontier.app.state.calls[-1]
    assert sent["messages"][1]["content"][1]["image_url"]["detail"] == "low"
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
    assert sent["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert sent["logit_bias"] == {"50256": -100} and sent["user"] == "desk-7"
    assert "not_openai" not in sent


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 900, 990, 5000])
def test_nesting_past_the_bound_is_a_400_before_any_recursive_walk(slm, frontier, make_proxy, depth):
    # A task that stores text encodes the messages for the ledger: nested just under Python's recursion
    # limit this was a RecursionError and a 500.
    proxy = make_proxy(make_config(slm.url, frontier.url, store_text=True))
    raw = ('{"model":"tickets","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":'
           '{"name":"f","parameters":{"type":"object","properties":{"p":' + '{"a":' * depth + '"x"' + "}" * depth + "}}}}]}").encode()
    for headers in (FORCE, {}):
        r = proxy.client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json", **headers})
        err = assert_openai_error(r, 400)
        assert err["code"] == "invalid_json" and "nested more than" in err["message"]
    assert proxy.post("lp=-0.01").status_code == 200


def _nesting(value: Any) -> int:
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (list, dict)):
            deepest = max(deepest, depth + 1)
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


@settings(max_examples=100, deadline=None)
@given(value=st.recursive(st.none() | st.integers() | st.text(alphabet='[]{}"\\ax', max_size=6),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                              st.text(alphabet='[]{}"\\', max_size=3), inner, max_size=3), max_leaves=40),
       limit=st.integers(0, 10))
def test_the_depth_bound_counts_nesting_as_the_parser_does(value, limit):
    # Brackets, quotes and backslashes inside strings are text, not nesting.
    assert json_depth_over(json.dumps(value), limit) == (_nesting(value) > limit)


def test_a_schema_nested_within_the_bound_is_served_and_stored(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url, store_text=True))
    schema: dict[str, Any] = {"type": "object"}
    for _ in range(25):  # 50 levels of JSON inside a body that adds 5
        schema = {"type": "object", "properties": {"p": schema}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    for headers in (FORCE, {}):
        r = proxy.client.post("/v1/chat/completions", headers=headers, json={
            "model": "tickets", "messages": [{"role": "user", "content": "lp=-0.01"}], "tools": tools})
        assert r.status_code == 200, r.text
    assert [x["status"] for x in proxy.rows()] == [200, 200]


# --- 3: header size and header deadline, on a real socket -------------------------------------------------
def _response_head(sock: socket.socket) -> bytes:
    data = b""
    sock.settimeout(30)
    while b"\r\n" not in data:
        try:
            part = sock.recv(4096)
        except ConnectionResetError:
            break
        if not part:
            break
        data += part
    return data


def test_a_header_past_the_limit_is_refused_and_not_read(slm, frontier, make_proxy):
    proxy = make_proxy(with_proxy(make_config(slm.url, frontier.url), max_header_bytes=4096))
    port = proxy.server.port
    # Just past the limit, sent whole: the answer is a 4xx and the connection closes.
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n")
        head = _response_head(s)
    assert head.startswith(b"HTTP/1.1 431"), head[:100]
    # Headers within the limit are served as before.
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n")
        assert _response_head(s).startswith(b"HTTP/1.1 200")
    # 64 MB of header: the proxy stops reading and closes long before the client has sent it.
    sent = 0
    refused = threading.Event()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(30)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        chunk = b"a" * 65536
        try:
            while sent < 64 * 1024 * 1024:
                s.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            refused.set()
    assert refused.is_set() and sent < 64 * 1024 * 1024
    assert proxy.post("lp=-0.01").status_code == 200  # others are still served


@contextlib.contextmanager
def _closed() -> Any:
    """The peer closed: an end of stream, or a reset."""
    try:
        yield
    except ConnectionResetError:
        pass


def test_a_slowloris_connection_is_closed_and_others_are_served(slm, frontier, make_proxy):
    # Small, but far above the moment between a test's connect and its send, which it must not cut.
    proxy = make_proxy(with_proxy(make_config(slm.url, frontier.url), header_timeout_s=1.0))
    with socket.create_connection(("127.0.0.1", proxy.server.port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # and never the rest
        head = _response_head(s)
        assert head.startswith(b"HTTP/1.1 408")
        s.settimeout(30)
        with _closed():
            while s.recv(4096):
                pass
    # The deadline holds on a kept-alive connection too, for its next request's headers.
    with socket.create_connection(("127.0.0.1", proxy.server.port)) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert _response_head(s).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHo")
        s.settimeout(30)
        data = b""
        while b"408" not in data:
            part = s.recv(65536)
            if not part:
                break
            data += part
        assert b"HTTP/1.1 408" in data
    # A connection that never sends a byte is closed too, without an unasked-for answer.
    with socket.create_connection(("127.0.0.1", proxy.server.port)) as s:
        s.settimeout(30)
        with _closed():
            assert s.recv(4096) == b""
    assert proxy.post("lp=-0.01").status_code == 200
    assert proxy.client.get("/health").status_code == 200


def test_the_real_command_uses_the_header_limits():
    from engine.router.http_limits import HeaderDeadline, uvicorn_limits
    from engine.router.config import ProxySettings

    limits = uvicorn_limits(ProxySettings(max_header_bytes=8192, header_timeout_s=2.5))
    assert limits["h11_max_incomplete_event_size"] == 8192
    assert issubclass(limits["http"], HeaderDeadline) and limits["http"].header_timeout_s == 2.5
    assert limits["http"].max_header_bytes == 8192
    source = Path("engine/router/server.py").read_text()
    assert "**uvicorn_limits(config.proxy)" in source


# --- 4: a stream is bounded as a whole, and a cut one says so -----------------------------------------------
def sse_events(text: str) -> list[Any]:
    return [e if e == "[DONE]" else json.loads(e) for e in
            (line[6:] for line in text.splitlines() if line.startswith("data: "))]


@pytest.mark.parametrize("steer", ["fkeepalive", "fstall"])
def test_a_stream_past_the_frontier_timeout_is_cut_with_an_error_event_the_ledger_matches(slm, frontier, make_proxy, steer):
    # The bound must let the stream open (litellm, on a loaded machine) and cut what follows; the fake
    # keeps the stream alive for a minute.
    proxy = make_proxy(with_proxy(make_config(slm.url, frontier.url), frontier_timeout_s=3))
    # litellm's first call in a process loads what it needs: done before the bound is what is tested.
    assert proxy.post("warm up", headers=FORCE).status_code == 200
    r = proxy.post(f"lp=-3.0 {steer}", stream=True)
    assert r.status_code == 200  # already sent with the first chunk
    events = sse_events(r.text)
    assert events[-1] != "[DONE]" and "error" in events[-1], events
    err = events[-1]["error"]
    assert err["type"] == "server_error" and err["code"] == "upstream_error"
    assert "did not end within frontier_timeout_s = 3 s" in err["message"]
    assert "choices" in events[0]  # the first chunk was delivered before the cut
    (_, row) = proxy.rows()
    assert row["status"] == 502 and row["route"] == "frontier"
    assert row["error"] == err["message"]


def test_a_stream_the_frontier_breaks_ends_with_an_error_event_and_a_502_row(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url))
    r = proxy.post("lp=-3.0 fbreak patient John Doe", stream=True)
    events = sse_events(r.text)
    assert r.status_code == 200 and "choices" in events[0]
    assert events[-1] != "[DONE]" and events[-1]["error"]["code"] == "upstream_error", events
    assert events[-1]["error"]["message"].startswith("frontier stream cut: ")
    (row,) = proxy.rows()
    assert row["status"] == 502 and row["error"].startswith("frontier stream cut: ")
    assert "John Doe" not in row["error"]  # the task stores no text: the ledger keeps the error's kind


def test_a_stream_that_ends_in_time_is_unchanged(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url))
    events = sse_events(proxy.post("lp=-3.0", stream=True).text)
    assert events[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in events)
    (row,) = proxy.rows()
    assert row["status"] == 200 and row["error"] is None


# --- 5: /health tells the truth about the upstreams -------------------------------------------------------
def test_health_is_ok_with_every_upstream(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url))
    r = proxy.client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["reasons"] == []


def test_health_is_degraded_with_the_slm_down_or_the_frontier_key_unset(slm, frontier, make_proxy, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = make_proxy(make_config(dead, frontier.url))
    r = proxy.client.get("/health")
    body = r.json()
    assert r.status_code == 200 and body["status"] == "degraded"
    assert any("small model" in x and "unreachable" in x for x in body["reasons"]), body
    monkeypatch.delenv("FAKE_FRONTIER_KEY")
    proxy2 = make_proxy(make_config(slm.url, frontier.url))
    body = proxy2.client.get("/health").json()
    assert body["status"] == "degraded" and any("FAKE_FRONTIER_KEY" in x for x in body["reasons"]), body


def test_health_is_503_when_nothing_can_answer(frontier, make_proxy, monkeypatch):
    monkeypatch.delenv("FAKE_FRONTIER_KEY")
    proxy = make_proxy(make_config(f"http://127.0.0.1:{free_port()}", frontier.url))
    r = proxy.client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "down" and len(r.json()["reasons"]) == 2
    # Without a key, a probe learns the state and not the reasons (task names, addresses).
    monkeypatch.setenv("FD_TEST_KEYS", "k1")
    proxy = make_proxy(with_proxy(make_config(f"http://127.0.0.1:{free_port()}", None), api_keys_env="FD_TEST_KEYS"))
    r = proxy.client.get("/health")
    assert r.status_code == 503 and r.json() == {"status": "down"}


# --- 6: property tests over the HTTP surface ---------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_proxy(slm, frontier, frontier_key, tmp_path_factory):
    """One proxy for every example: a task with a live small model, and one whose small model is down
    (every request escalates: the SLM-failed path to the frontier)."""
    live = make_config(slm.url, frontier.url).task[0]
    dead = live.model_copy(update={"name": "deadslm", "slm_base_url": f"http://127.0.0.1:{free_port()}/v1"})
    cfg = RouterConfig.model_validate({"proxy": {"api_keys_env": None, "max_body_bytes": 64 * 1024},
                                       "task": [live.model_dump(), dead.model_dump()]})
    proxy = Proxy(cfg, tmp_path_factory.mktemp("fuzz") / "fd.db")
    yield proxy
    proxy.stop()


names = st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True)
words = st.text(max_size=30)
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": words})
image_part = st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
    {"url": st.sampled_from(["https://example.invalid/a.png", "data:image/png;base64,iVBORw0KGgo="])},
    optional={"detail": st.sampled_from(["auto", "low", "high"])})})
audio_part = st.fixed_dictionaries({"type": st.just("input_audio"), "input_audio": st.fixed_dictionaries(
    {"data": st.just("UklGRiQAAABXQVZF"), "format": st.sampled_from(["wav", "mp3"])})})
file_part = st.fixed_dictionaries({"type": st.just("file"), "file": st.one_of(
    st.fixed_dictionaries({"file_data": st.just("JVBERi0xLjQ="), "filename": st.just("a.pdf")}),
    st.fixed_dictionaries({"file_id": st.just("file-abc123")}))})
text_content = words | st.lists(text_part, min_size=1, max_size=3)
user_content = words | st.lists(st.one_of(text_part, image_part, audio_part, file_part), min_size=1, max_size=3)
tool_call = st.fixed_dictionaries({"id": names, "type": st.just("function"),
                                   "function": st.fixed_dictionaries({"name": names, "arguments": st.just("{}")})})
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer"]), "content": text_content}, optional={"name": names}),
    st.fixed_dictionaries({"role": st.just("user"), "content": user_content}, optional={"name": names}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": words}, optional={"tool_calls": st.lists(tool_call, max_size=2)}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.none(), "tool_calls": st.lists(tool_call, min_size=1, max_size=2)}),
    st.fixed_dictionaries({"role": st.just("tool"), "content": text_content, "tool_call_id": names}),
)
tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": names}, optional={"description": words, "parameters": st.fixed_dictionaries(
        {"type": st.just("object"), "properties": st.dictionaries(names, st.builds(lambda: {"type": "string"}), max_size=3)})})})
response_format = st.one_of(
    st.builds(lambda: {"type": "text"}), st.builds(lambda: {"type": "json_object"}),
    st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries(
        {"name": names}, optional={"schema": st.builds(lambda: {"type": "object"}), "strict": st.booleans()})}))
PARAMS = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "max_tokens": st.integers(1, 4096),
    "max_completion_tokens": st.integers(1, 4096), "n": st.integers(1, 3), "seed": st.integers(-(2**63), 2**63 - 1),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": words | st.lists(words, max_size=4), "response_format": response_format,
    "logit_bias": st.dictionaries(st.from_regex(r"[0-9]{1,6}", fullmatch=True),
                                  st.integers(-100, 100) | st.floats(-100, 100), max_size=3),
    "user": st.text(max_size=50),
}


@st.composite
def openai_bodies(draw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": draw(st.sampled_from(["tickets", "deadslm"])),
                            "messages": draw(st.lists(message, min_size=1, max_size=4))}
    body["messages"].append({"role": "user", "content": draw(user_content)})
    for key in draw(st.sets(st.sampled_from(sorted(PARAMS)), max_size=6)):
        body[key] = draw(PARAMS[key])
    # Valid as OpenAI has it: each option with the switch it belongs to.
    if "stream_options" in body:
        body["stream"] = True
    if body.get("top_logprobs"):
        body["logprobs"] = True
    if draw(st.booleans()):
        tools = draw(st.lists(tool, min_size=1, max_size=3, unique_by=lambda t: t["function"]["name"]))
        body["tools"] = tools
        body["tool_choice"] = draw(st.sampled_from(["none", "auto", "required"]) | st.sampled_from(
            [{"type": "function", "function": {"name": t["function"]["name"]}} for t in tools]))
    return body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    stack = [(value, path)]
    while stack:  # iterative: the bodies here are small, but the test should not need the limit either
        node, at = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            out.append(at + (k,))
            stack.append((v, at + (k,)))
    return out


def _replace(body: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = new
    return body


@st.composite
def mutated_bodies(draw: Any) -> bytes:
    body = json.loads(json.dumps(draw(openai_bodies())))  # a copy of its own: mutated in place below
    kind = draw(st.sampled_from(["wrong_type", "deep", "size", "utf16", "bad_utf8", "surrogate", "duplicate", "truncate"]))
    if kind == "wrong_type":
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(_paths(body)[1:]))
            body = _replace(body, path, draw(json_values))
        return json.dumps(body).encode()
    if kind == "deep":
        depth = draw(st.sampled_from([MAX_DEPTH - 8, MAX_DEPTH, MAX_DEPTH + 1, 500, 990, 3000]))
        path = draw(st.sampled_from(_paths(body)[1:]))
        marker = "\u0000DEEP\u0000"
        text = json.dumps(_replace(body, path, marker))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"k":', "}")]))
        return text.replace(json.dumps(marker), opener * depth + "1" + closer * depth).encode()
    if kind == "size":
        body["messages"][-1] = {"role": "user", "content": "x" * draw(st.integers(60_000, 200_000))}
        return json.dumps(body).encode()
    if kind == "utf16":
        return json.dumps(body, ensure_ascii=False).encode(draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32"])))
    if kind == "bad_utf8":
        raw = json.dumps(body, ensure_ascii=False).encode()
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"])) + raw[at:]
    if kind == "surrogate":
        body["messages"][-1] = {"role": "user", "content": "SURR"}
        return json.dumps(body).replace("SURR", draw(st.sampled_from(["\\ud800", "\\udfff", "a\\udc80b"]))).encode()
    if kind == "duplicate":
        key = draw(st.sampled_from(sorted(body)))
        text = json.dumps(body)
        return (text[:-1] + f', {json.dumps(key)}: {json.dumps(draw(json_values))}}}').encode()
    raw = json.dumps(body).encode()
    return raw[:draw(st.integers(0, max(0, len(raw) - 1)))]


ROUTES = st.sampled_from([{}, FORCE])
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.function_scoped_fixture])


def _check_answer(proxy: Proxy, r: httpx.Response, slm_calls: list, frontier_calls: list, before: tuple[int, int]) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["type"] == "invalid_request_error" and "param" in err, err
        if err["code"] != "upstream_rejected":  # the proxy's own refusal: nothing went upstream
            assert (len(slm_calls), len(frontier_calls)) == before
    else:
        assert r.status_code == 200, r.text[:300]
        if r.headers["content-type"].startswith("text/event-stream"):
            events = sse_events(r.text)
            assert events[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in events), events
        else:
            assert r.json()["choices"]
    # The proxy keeps serving.
    assert proxy.post("lp=-0.01").status_code == 200


@settings(FUZZ, max_examples=60)
@given(body=openai_bodies(), headers=ROUTES)
def test_any_body_from_the_openai_schema_is_answered(fuzz_proxy, slm, frontier, body, headers):
    before = len(slm.app.state.calls), len(frontier.app.state.calls)
    r = fuzz_proxy.client.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text[:300]  # valid by construction, on every route
    _check_answer(fuzz_proxy, r, slm.app.state.calls, frontier.app.state.calls, before)


@settings(FUZZ, max_examples=120)
@given(raw=mutated_bodies(), headers=ROUTES)
def test_any_mutated_body_is_a_4xx_in_openais_shape_or_a_200_never_a_5xx(fuzz_proxy, slm, frontier, raw, headers):
    before = len(slm.app.state.calls), len(frontier.app.state.calls)
    r = fuzz_proxy.client.post("/v1/chat/completions", content=raw,
                               headers={"content-type": "application/json", **headers})
    _check_answer(fuzz_proxy, r, slm.app.state.calls, frontier.app.state.calls, before)
