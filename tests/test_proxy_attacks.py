"""What an attack on a real proxy found, each kept fixed over real HTTP and raw sockets: the HTTP layer's own
refusals in OpenAI's shape, no redirects, one value per header that decides something, `model` that is not a
task name, requests a browser sends for a web page, an upstream that sends garbage (the request must not
become a 500, lose its row, or stop the ledger), a client that leaves before or during its answer (a 499 row,
the small model's connection closed), and a reload that must not read a file without end."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.router import app as app_module
from engine.router.config import RouterConfig
from store.db import open_store
from tests.fakes.fake_openai import ServerThread, broken_slm_app
from tests.proxy_helpers import Proxies, Proxy, frontier, make_config, slm  # noqa: F401 (fixtures)


@pytest.fixture
def make_proxy(tmp_path):
    proxies = Proxies(tmp_path)
    yield proxies
    proxies.close()


@pytest.fixture(scope="module")
def broken():
    server = ServerThread(broken_slm_app()).start()
    yield server
    server.stop()


def with_proxy(config: RouterConfig, **proxy: Any) -> RouterConfig:
    return config.model_copy(update={"proxy": config.proxy.model_copy(update=proxy)})


def one_line_error(r: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """An OpenAI-shaped error whose message is one line."""
    assert (r.status_code == status) if status else 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"] and "\r" not in err["message"]
    return err


def raw_exchange(port: int, data: bytes) -> tuple[int, dict[str, Any] | None, bytes]:
    """Send raw bytes, read to the server's close: the status, the JSON body (None if it is not JSON)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(30)
        s.sendall(data)
        out = b""
        try:
            while part := s.recv(65536):
                out += part
        except ConnectionResetError:
            pass
    head, _, body = out.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    return status, parsed, head


def wait_until(cond: Callable[[], bool], what: str) -> None:
    """Wait for something that must happen (a positive event; never asserts that something did not)."""
    deadline = time.monotonic() + 30
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def stored_rows(proxy: Proxy) -> list[dict[str, Any]]:
    return proxy.rows()


CHAT = b'{"model":"tickets","messages":[{"role":"user","content":"lp=-0.01"}]}'


# --- the HTTP layer --------------------------------------------------------------------------------------
MALFORMED = [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX Bad: v\r\nContent-Length: 2\r\n\r\n{}",  # space in a name
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n\r\n{}",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\n{}",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",  # HTTP/1.1 without Host
    b"GET /v1/mod\xffels HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",  # TLS to a plain-HTTP port
]


def test_what_the_http_parser_refuses_is_a_400_in_openais_shape(slm, frontier, make_proxy):
    # Before: uvicorn's text/plain "Invalid HTTP request received." (an OpenAI client reads error.message).
    proxy = make_proxy(make_config(slm.url, frontier.url))
    for data in MALFORMED:
        status, body, head = raw_exchange(proxy.server.port, data)
        assert status == 400 and body is not None, (data[:60], head)
        assert body["error"]["code"] == "malformed_request" and "\n" not in body["error"]["message"]
    assert proxy.post("lp=-0.01").status_code == 200


def test_header_bounds_answer_in_openais_shape(slm, frontier, make_proxy):
    # Before: 431 and 408 were text/plain.
    proxy = make_proxy(with_proxy(make_config(slm.url, frontier.url), max_header_bytes=4096, header_timeout_s=1.0))
    status, body, _ = raw_exchange(proxy.server.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n")
    assert status == 431 and body is not None and body["error"]["code"] == "headers_too_large"
    status, body, _ = raw_exchange(proxy.server.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # and no more
    assert status == 408 and body is not None and body["error"]["code"] == "request_timeout"
    assert proxy.post("lp=-0.01").status_code == 200


@pytest.mark.parametrize("method, path", [("POST", "/v1/chat/completions/"), ("GET", "/v1/models/"),
                                          ("GET", "/health/"), ("POST", "/admin/reload/")])
def test_a_path_with_a_trailing_slash_is_a_404_not_a_redirect_to_the_hosts_header(slm, frontier, make_proxy, method, path):
    # Before: 307 with `location: http://<the client's Host header>/...`, which an SDK follows with the body.
    proxy = make_proxy(make_config(slm.url, frontier.url))
    calls = len(slm.app.state.calls)
    r = proxy.client.request(method, path, content=CHAT if method == "POST" else None,
                             headers={"host": "localhost:9", "content-type": "application/json"})
    assert "location" not in r.headers
    assert one_line_error(r, 404)["code"] == "not_found"
    assert len(slm.app.state.calls) == calls


def test_a_websocket_upgrade_is_served_as_the_http_request_it_is(slm, frontier, make_proxy):
    # Before: a bare 403 with no body, from uvicorn's WebSocket handshake.
    proxy = make_proxy(make_config(slm.url, frontier.url))
    status, body, _ = raw_exchange(proxy.server.port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                                   b"Connection: Upgrade, close\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                   b"Sec-WebSocket-Version: 13\r\n\r\n")
    assert status == 200 and body is not None and body["data"][0]["id"] == "tickets"


def test_a_method_that_is_not_allowed_names_itself_in_the_code(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url))
    for method in ("PUT", "DELETE", "OPTIONS", "GET"):
        assert one_line_error(proxy.client.request(method, "/v1/chat/completions"), 405)["code"] == "method_not_allowed"


# --- headers that decide something come once ---------------------------------------------------------------
def test_two_authorization_headers_are_refused_whichever_comes_first(slm, frontier, make_proxy, monkeypatch):
    # Before: the first one counted, so a valid key first and anything after it passed (and a hop in front
    # that reads the last one would check another key than the proxy).
    monkeypatch.setenv("DOOR_KEYS", "k1")
    proxy = make_proxy(with_proxy(make_config(slm.url, frontier.url), api_keys_env="DOOR_KEYS"))
    proxy.router.keys = {"k1"}
    for pair in ((b"Bearer k1", b"Bearer nope"), (b"Bearer nope", b"Bearer k1"), (b"Bearer k1", b"Bearer k1")):
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Authorization: %s\r\nAuthorization: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                % (pair[0], pair[1], len(CHAT)))
        status, body, _ = raw_exchange(proxy.server.port, head + CHAT)
        assert status == 401 and body is not None and body["error"]["code"] == "invalid_api_key", body
    assert proxy.post("lp=-0.01", headers={"Authorization": "Bearer k1"}).status_code == 200
    assert len(stored_rows(proxy)) == 1  # refused at the door: no row


def test_two_task_or_escalate_headers_are_refused_and_a_known_tasks_refusal_is_a_row(slm, frontier, make_proxy):
    proxy = make_proxy(make_config(slm.url, frontier.url))
    calls = len(slm.app.state.calls), len(frontier.app.state.calls)
    for name, values, row in (("X-Fleetdeck-Task", (b"nope", b"tickets"), False),
                              ("X-Fleetdeck-Escalate", (b"always", b"never"), True),
                              ("X-Fleetdeck-Escalate", (b"sometimes",), True)):
        lines = b"".join(b"%s: %s\r\n" % (name.encode(), v) for v in values)
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + lines +
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(CHAT))
        status, body, _ = raw_exchange(proxy.server.port, head + CHAT)
        assert status == 400 and body is not None, body
        assert body["error"]["param"] == name and body["error"]["code"] == "invalid_header", body
    assert (len(slm.app.state.calls), len(frontier.app.state.calls)) == calls  # nothing went upstream
    rows = stored_rows(proxy)
    # Before: a bad X-Fleetdeck-Escalate for a known task left no row, unlike every other refusal.
    assert [(x["status"], x["reason"]) for x in rows] == [(400, "bad_request")] * 2


@pytest.mark.parametrize("raw", [
    b'{"model":"nope","model":"tickets","messages":[{"role":"user","content":"lp=-0.01"}]}',
    b'{"model":"tickets","messages":[{"role":"user","content":"lp=-0.01","role":"system"}]}',
    b'{"model":"tickets","messages":[{"role":"user","content":"lp=-0.01"}],"stream":false,"stream":true}',
])
def test_a_key_twice_in_one_object_is_refused_not_read_as_its_last_value(slm, frontier, make_proxy, raw):
    # Before: Python's last value won (`"model": "nope", "model": "tickets"` was served as tickets), where a
    # hop in front that reads the first would have seen another task, role or stream.
    proxy = make_proxy(make_config(slm.url, frontier.url))
    calls = len(slm.app.state.calls)
    r = proxy.client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    err = one_line_error(r, 400)
    assert err["code"] == "invalid_json" and "more than once" in err["message"], err
    assert len(slm.app.state.calls) == calls


# --- `model`: a task name, or the client's 400 ------------------------------------------------------------
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                           max_leaves=6)
NAMES = st.sampled_from(["tickets", "../tickets", "tickets/../x", "tickets; rm -rf /", "$(id)", "`id`", "tickets\n",
                         "%2e%2e%2f", "TICKETS", " tickets", "\u202etickets", "\x1b[31m", "a" * 5000, ""])
ESCALATE = st.none() | st.sampled_from(["always", "never", "Never", "NEVER", "sometimes", "", "always,never", "al\\x01ways"])


@pytest.fixture(scope="module")
def model_proxy(slm, frontier, tmp_path_factory):
    os.environ.setdefault("FAKE_FRONTIER_KEY", "sk-fake")
    proxy = Proxy(make_config(slm.url, frontier.url), tmp_path_factory.mktemp("model") / "fd.db")
    yield proxy
    proxy.stop()


@settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(model=NAMES | JSON_VALUES, escalate=ESCALATE, in_header=st.booleans())
def test_any_model_value_is_a_task_or_a_one_line_4xx_and_rows_are_the_known_tasks(model_proxy, slm, model, escalate, in_header):
    """Before: a missing `model` was `404 Unknown task 'None'`, a list was `404 Unknown task "['tickets']"`."""
    proxy = model_proxy
    ledger = proxy.ledger
    before = ledger.counts().recorded
    headers = {} if escalate is None else {"X-Fleetdeck-Escalate": escalate}
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "lp=-0.01"}]}
    if in_header and isinstance(model, str) and model.isprintable() and model.isascii() and model.strip() == model \
            and len(model) < 1000 and model:
        headers["X-Fleetdeck-Task"] = model
    else:
        body["model"] = model
    r = proxy.client.post("/v1/chat/completions", json=body, headers=headers)
    known = model == "tickets"
    good_escalate = escalate is None or escalate.strip().lower() in ("always", "never")
    if known and good_escalate:
        assert r.status_code == 200, r.text[:300]
    elif known:
        assert one_line_error(r, 400)["param"] == "X-Fleetdeck-Escalate"
    elif isinstance(model, str) and model:
        assert one_line_error(r, 404)["code"] == "model_not_found"
    else:
        err = one_line_error(r, 400)
        assert err["param"] == "model" and err["code"] == "invalid_value", err
    # Exactly one row for a request that named a known task, none for one that did not.
    assert ledger.counts().recorded - before == (1 if known else 0)
    assert proxy.post("lp=-0.01").status_code == 200


def test_a_large_body_is_checked_off_the_event_loop(slm, frontier, make_proxy, monkeypatch):
    # Before: a 4 MiB body of empty messages took about a second of parsing and validation on the event
    # loop, and every other request and stream waited. Here its check is held until another request has
    # been answered: on the loop that answer could not come (the hold would block the loop).
    proxy = make_proxy(make_config(slm.url, frontier.url))
    entered, release = threading.Event(), threading.Event()
    real = app_module.check_request

    def held(body: dict[str, Any]) -> Any:
        if len(body["messages"]) > 1000:
            entered.set()
            assert release.wait(60)
        return real(body)

    monkeypatch.setattr(app_module, "check_request", held)
    big = {"model": "tickets", "messages": [{"role": "user", "content": ""}] * 5000 + [{"role": "user", "content": "lp=-0.01"}]}
    answers: dict[str, httpx.Response] = {}
    sender = threading.Thread(target=lambda: answers.update(big=httpx.post(
        f"{proxy.server.url}/v1/chat/completions", json=big, timeout=120, trust_env=False)))
    sender.start()
    try:
        assert entered.wait(60)
        assert proxy.post("lp=-0.01").status_code == 200  # served while the big body is being checked
    finally:
        release.set()
        sender.join(120)
    assert answers["big"].status_code == 200, answers["big"].text[:300]


# --- browsers ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{"Origin": "http://evil.example"}, {"Origin": "null"},
                                     {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-origin"}])
def test_a_request_a_browser_sends_for_a_web_page_is_refused(slm, frontier, make_proxy, headers):
    # Before: a page the operator opened could POST text/plain to 127.0.0.1:4000 (no key on loopback, no
    # preflight for a "simple" request): chat requests on the frontier budget, config reloads.
    proxy = make_proxy(make_config(slm.url, frontier.url))
    calls = len(slm.app.state.calls)
    r = proxy.client.post("/v1/chat/completions", content=CHAT, headers={"content-type": "text/plain", **headers})
    assert one_line_error(r, 403)["code"] == "browser_request_refused"
    assert one_line_error(proxy.client.post("/admin/reload", headers=headers), 403)["code"] == "browser_request_refused"
    assert len(slm.app.state.calls) == calls
    assert proxy.client.get("/health").status_code == 200  # a probe or a program: no Origin, served
    assert stored_rows(proxy) == []


@pytest.mark.parametrize("host", ["evil.example", "evil.example:4000", "127.0.0.1.evil.example", "localhost.evil.example",
                                  "10.0.0.5:4000", "[2001:db8::1]:4000"])
def test_a_request_addressed_to_another_name_is_refused_when_the_proxy_has_no_keys(slm, frontier, make_proxy, host):
    # DNS rebinding: a page whose name the attacker points at 127.0.0.1 is same-origin to an older browser
    # (no Origin, no Sec-Fetch-Site); its Host header is that name. Keyless, only loopback names are served.
    proxy = make_proxy(make_config(slm.url, frontier.url))
    calls = len(slm.app.state.calls)
    for method, path in (("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        r = proxy.client.request(method, path, content=CHAT, headers={"host": host})
        assert one_line_error(r, 403)["code"] == "host_not_allowed", (method, path)
    for ok in ("127.0.0.1", "localhost:4000", "[::1]:4000", "127.0.0.2"):
        assert proxy.client.get("/health", headers={"host": ok}).status_code == 200, ok
    assert len(slm.app.state.calls) == calls and stored_rows(proxy) == []  # (stops the proxy)


def test_with_api_keys_any_host_name_is_served(slm, frontier, make_proxy, monkeypatch):
    monkeypatch.setenv("FD_TEST_KEYS", "sk-one")
    config = make_config(slm.url, frontier.url)
    config = config.model_copy(update={"proxy": config.proxy.model_copy(update={"api_keys_env": "FD_TEST_KEYS"})})
    proxy = make_proxy(config)
    r = proxy.client.get("/v1/models", headers={"host": "fleet-gw.example:4000", "authorization": "Bearer sk-one"})
    assert r.status_code == 200, r.text


# --- an upstream that sends garbage ------------------------------------------------------------------------
BROKEN = ["usage", "hugelp", "surrogate", "nodone", "multiline400", "html500",
          "json usage", "json hugelp", "json surrogate"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_broken_small_model_never_makes_a_500_a_lost_row_or_a_stuck_ledger(broken, make_proxy, stream):
    """Before: string/list token counts were a 500 (a stream was cut with no row at all), and the row's list
    value failed every later ledger write; a log-probability of 1e308 was a 500 (OverflowError); a lone
    surrogate was a 500 *and* two rows; a body without `data: [DONE]` was a whole answer; an upstream's
    multi-line message reached the client as a multi-line error."""
    config = make_config(broken.url, None, name="tickets", confidence="mean_token", threshold=0.5,
                         confidence_window_tokens=1)
    proxy = make_proxy(config)
    for mode in BROKEN:
        r = proxy.client.post("/v1/chat/completions", json={"model": "tickets", "stream": stream,
                                                            "messages": [{"role": "user", "content": mode}]})
        assert r.status_code in (200, 400, 503), (mode, r.status_code, r.text[:300])
        if r.status_code != 200:
            err = r.json()["error"]
            assert "\n" not in err["message"] and "\r" not in err["message"], (mode, err)
        elif r.headers["content-type"].startswith("text/event-stream"):
            last = [line for line in r.text.splitlines() if line.startswith("data: ")][-1]
            if mode in ("nodone", "surrogate"):  # cut after the window: half an answer is not passed off as whole
                assert json.loads(last[6:])["error"]["code"] == "upstream_error", r.text[-300:]
            else:
                assert last == "data: [DONE]", (mode, r.text[-300:])
        else:
            assert r.json()["choices"], (mode, r.text[:300])
        if mode in ("surrogate", "json surrogate", "nodone") and not stream:
            assert r.status_code == 503, (mode, r.text[:300])  # no answer a client could be given
    assert proxy.post("lp=-0.01") is not None  # still serving
    ledger = proxy.ledger
    wait_until(lambda: ledger.counts().stored == ledger.counts().recorded, "the ledger to store every row")
    assert ledger.last_error is None
    rows = stored_rows(proxy)
    assert len(rows) == len(BROKEN) + 1  # one row per request, none twice, none lost
    assert {x["status"] for x in rows} <= {200, 400, 502, 503}
    by_usage = [x for x in rows if x["slm_prompt_tokens"] is not None]
    assert all(isinstance(x["slm_prompt_tokens"], int) for x in by_usage)


# --- Content-Type -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonp", "text/json", "two"])
def test_a_body_that_is_not_sent_as_json_is_a_415_and_goes_nowhere(slm, frontier, make_proxy, content_type):
    """Before: any Content-Type (or none) was read as JSON. A page can make a browser POST text/plain, a form,
    or a Blob with no type without a CORS preflight; the Origin and Host checks stop browsers that mark
    their requests, and this stops the rest. OpenAI's clients all send application/json."""
    proxy = make_proxy(make_config(slm.url, frontier.url))
    calls = len(slm.app.state.calls)
    headers = [] if content_type is None else (
        [("content-type", "application/json"), ("content-type", "text/plain")] if content_type == "two"
        else [("content-type", content_type)])
    r = proxy.client.post("/v1/chat/completions", content=CHAT, headers=httpx.Headers(headers))
    err = one_line_error(r, 415)
    assert err["code"] == "unsupported_media_type" and err["param"] == "Content-Type"
    assert "application/json" in err["message"]
    assert len(slm.app.state.calls) == calls
    for ok in ("application/json", "Application/JSON; charset=utf-8"):  # parameters and case as HTTP allows
        assert proxy.client.post("/v1/chat/completions", content=CHAT, headers={"content-type": ok}).status_code == 200
    assert [x["status"] for x in stored_rows(proxy)] == [200, 200]  # the refusals sent nothing upstream


def test_curl_with_the_json_header_is_served_and_without_it_is_told_what_to_add(slm, frontier, make_proxy):
    import shutil
    import subprocess

    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    proxy = make_proxy(make_config(slm.url, frontier.url))
    url = f"{proxy.server.url}/v1/chat/completions"
    data = CHAT.decode()
    good = subprocess.run([curl, "-sS", "--noproxy", "*", url, "-H", "Content-Type: application/json", "-d", data],
                          capture_output=True, text=True, timeout=60)
    assert json.loads(good.stdout)["object"] == "chat.completion", good.stdout + good.stderr
    bare = subprocess.run([curl, "-sS", "--noproxy", "*", url, "-d", data], capture_output=True, text=True, timeout=60)
    message = json.loads(bare.stdout)["error"]["message"]  # curl -d sends a form's type
    assert "-H 'Content-Type: application/json'" in message and "x-www-form-urlencoded" in message


def test_a_large_body_is_encoded_for_the_small_model_off_the_event_loop(slm, frontier, make_proxy, monkeypatch):
    """Before: a body the proxy had parsed in a thread (past 64 KiB) was encoded again for the small model by
    httpx on the event loop: 5 MB of messages took ~60 ms there, every stream of the proxy stalled meanwhile."""
    from engine.router import slm_stream

    threads: list[threading.Thread] = []
    real = slm_stream.encode_payload

    def encode(payload: dict[str, Any]) -> bytes:
        threads.append(threading.current_thread())
        return real(payload)

    monkeypatch.setattr(slm_stream, "encode_payload", encode)
    proxy = make_proxy(make_config(slm.url, frontier.url, confidence="first_token", threshold=0.5))
    filler = [{"role": "user", "content": "é" * 1000} for _ in range(100)]  # ~200 KB: past the bound
    r = proxy.client.post("/v1/chat/completions", json={"model": "tickets", "messages": [*filler, {
        "role": "user", "content": "lp=-0.01"}]})
    assert r.status_code == 200, r.text
    assert threads and all(t is not proxy.server.thread for t in threads)  # encoded, and not on the loop's thread
    assert slm.app.state.calls[-1]["messages"][0]["content"] == "é" * 1000  # what the small model got is the body
    assert proxy.post("lp=-0.01").status_code == 200 and len(threads) == 1  # a small body: encoded where it was


# --- a client that leaves ------------------------------------------------------------------------------------
def _open_chat(port: int, content: str, stream: bool) -> socket.socket:
    body = json.dumps({"model": "tickets", "stream": stream, "messages": [{"role": "user", "content": content}]}).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    return s


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_client_that_leaves_before_its_answer_is_a_499_row_and_the_slm_connection_is_closed(slm, frontier, make_proxy,
                                                                                              stream):
    # Before: the proxy read the small model's whole answer for nobody and recorded a 200 "confident" row.
    proxy = make_proxy(make_config(slm.url, frontier.url))  # mean_token, no window: the whole answer decides
    s = _open_chat(proxy.server.port, "tokens=4 hold", stream)
    n = len(slm.app.state.calls) + 1
    wait_until(lambda: ("first_token", n) in slm.app.state.events, "the small model's first token")
    s.close()
    wait_until(lambda: proxy.ledger.counts().recorded == 1, "the row of the request the client left")
    wait_until(lambda: ("closed", n) in slm.app.state.events, "the proxy to close the small model's stream")
    slm.app.state.release.set()
    try:
        assert proxy.post("lp=-0.01").status_code == 200
    finally:
        slm.app.state.release.clear()
    rows = stored_rows(proxy)
    assert [(x["status"], x["route"], x["reason"]) for x in rows[:1]] == [(499, "none", "client_disconnected")]
    assert "disconnected" in rows[0]["error"] and ("finished", n) not in slm.app.state.events


def test_a_client_that_leaves_mid_stream_is_a_499_row_and_the_slm_connection_is_closed(slm, frontier, make_proxy):
    # Before: the row said 200 with no word of the client leaving.
    proxy = make_proxy(make_config(slm.url, frontier.url, confidence="first_token"))  # decided on one token
    s = _open_chat(proxy.server.port, "tokens=4 hold", True)
    n = len(slm.app.state.calls) + 1
    data = b""
    while b"slm " not in data:  # the first token's chunk has been relayed
        more = s.recv(65536)
        assert more, f"the proxy closed the connection before the first token: {data[:300]!r}"
        data += more
    s.close()
    wait_until(lambda: proxy.ledger.counts().recorded == 1, "the row of the stream the client left")
    wait_until(lambda: ("closed", n) in slm.app.state.events, "the proxy to close the small model's stream")
    rows = stored_rows(proxy)
    assert [(x["status"], x["route"], x["reason"]) for x in rows] == [(499, "slm", "confident")]
    assert rows[0]["error"].startswith("the client disconnected mid-stream")


def _leave_during_the_frontier_call(proxy: Proxy, frontier: Any, content: str, stream: bool, mid: bool = False) -> None:
    """Send a request forced to the frontier and leave once the frontier has it (`mid`: once its stream began)."""
    body = json.dumps({"model": "tickets", "stream": stream, "messages": [{"role": "user", "content": content}]}).encode()
    n = len(frontier.app.state.calls)
    s = socket.create_connection(("127.0.0.1", proxy.server.port))
    s.settimeout(30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"X-Fleetdeck-Escalate: always\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    wait_until(lambda: len(frontier.app.state.calls) > n, "the frontier to be asked")
    data = b""
    while mid and b"data: " not in data:  # the frontier's first chunk has been relayed
        more = s.recv(65536)
        assert more, f"the proxy closed the connection before the first chunk: {data[:300]!r}"
        data += more
    s.close()


@pytest.mark.parametrize("case", ["answer_came", "frontier_failed", "stream_opening", "stream_mid"])
def test_a_client_that_leaves_during_a_frontier_call_is_a_frontier_row_with_what_it_cost(slm, frontier, make_proxy,
                                                                                       monkeypatch, case):
    """Before: the row said route `none`, cost $0.00, although the frontier had the request (and bills for it).
    Now: route frontier, escalated, the decided reason, status 499; the cost as the frontier's usage says when
    its answer came after the client left, else estimated from the prompt and marked `cost_estimated`; and the
    month's report counts it."""
    from store.analytics import month_report
    from tests.fakes.fake_openai import FRONTIER_COMPLETION_TOKENS, FRONTIER_PROMPT_TOKENS

    monkeypatch.setenv("FAKE_FRONTIER_KEY", "k")
    proxy = make_proxy(make_config(slm.url, frontier.url))
    content = {"answer_came": "fsleep=1.5 q", "frontier_failed": "fsleep=1.5 ffail q",
               "stream_opening": "fsleep=30 q", "stream_mid": "fstall q"}[case]
    _leave_during_the_frontier_call(proxy, frontier, content, stream=case.startswith("stream"), mid=case == "stream_mid")
    wait_until(lambda: proxy.ledger.counts().recorded == 1, "the row of the request the client left")
    price = proxy.router.prices["tickets"]
    assert price.input_per_token > 0  # gpt-4o is in litellm's bundled price map
    store_path = proxy.store_path
    rows = stored_rows(proxy)
    assert len(rows) == 1
    r = rows[0]
    assert (r["status"], r["route"], r["escalated"], r["reason"], r["frontier_model"]) == (
        499, "frontier", 1, "forced_frontier", "openai/gpt-4o"), r
    assert "the client disconnected" in r["error"]
    if case == "answer_came":
        assert r["cost_estimated"] == 0 and "came after it left" in r["error"]
        assert r["cost_usd"] == pytest.approx(price.cost(FRONTIER_PROMPT_TOKENS, FRONTIER_COMPLETION_TOKENS))
    else:
        assert r["cost_estimated"] == 1 and "estimated from the prompt" in r["error"]
        assert r["prompt_tokens"] > 0 and r["cost_usd"] > 0
        assert r["cost_usd"] == pytest.approx(price.cost(r["prompt_tokens"], 0))
    store = open_store(store_path)
    try:
        report = month_report(store, time.strftime("%Y-%m", time.gmtime()), time.time(), 1.0, 1)
    finally:
        store.close()
    assert report.requests == 1 and report.escalated == 1
    assert report.frontier_cost_usd == pytest.approx(r["cost_usd"], abs=1e-6)
    assert report.frontier_cost_estimated_usd == pytest.approx(r["cost_usd"] if r["cost_estimated"] else 0.0, abs=1e-6)


# --- reload ----------------------------------------------------------------------------------------------------
def _router_toml(slm_url: str, model: str) -> str:
    return (f'[proxy]\napi_keys_env = ""\n[[task]]\nname = "tickets"\nslm_base_url = "{slm_url}/v1"\n'
            f'slm_model = "{model}"\nthreshold = 0.85\n')


def test_a_reload_of_a_file_without_end_or_a_broken_config_keeps_the_old_one_in_one_line(slm, make_proxy, tmp_path: Path):
    # Before: a config path at /dev/zero made a reload read until the kernel killed the proxy (22 GB, OOM);
    # a config that failed validation came back as a multi-line message.
    cfg = tmp_path / "router.toml"
    cfg.write_text(_router_toml(slm.url, "tickets-v3"))
    proxy = make_proxy(make_config(slm.url, None))
    proxy.router.config_path = cfg
    cfg.unlink()
    cfg.symlink_to("/dev/zero")
    err = one_line_error(proxy.client.post("/admin/reload"), 409)
    assert "not a regular file" in err["message"]
    cfg.unlink()
    cfg.write_bytes(b"#" * (2 * 1024 * 1024))
    assert "limit" in one_line_error(proxy.client.post("/admin/reload"), 409)["message"]
    cfg.write_text('[[task]]\nname = "x"\n')  # three keys missing: three lines from the validator
    err = one_line_error(proxy.client.post("/admin/reload"), 409)
    assert err["message"].count("required") == 3
    assert proxy.router.config.task[0].slm_model == "tickets-v3" and proxy.post("lp=-0.01").status_code == 200
    cfg.write_text(_router_toml(slm.url, "tickets-v4"))
    assert proxy.client.post("/admin/reload").status_code == 200
    assert proxy.router.config.task[0].slm_model == "tickets-v4"


def test_a_reload_that_removes_a_task_while_its_frontier_stream_opens_changes_nothing_for_it(slm, frontier, make_proxy,
                                                                                               tmp_path: Path, monkeypatch):
    """Before: the stream's price was looked up by the task's name in the new config: KeyError, a 500 and an
    internal_error row for a request the frontier answered. A request keeps the task (and price) it started with."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("FAKE_FRONTIER_KEY", "k")
    cfg = tmp_path / "router.toml"
    cfg.write_text(_router_toml(slm.url, "tickets-v3"))
    proxy = make_proxy(make_config(slm.url, frontier.url))
    proxy.router.config_path = cfg
    n = len(frontier.app.state.calls)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(proxy.post, "fsleep=3 q", {"X-Fleetdeck-Escalate": "always"}, stream=True)
        wait_until(lambda: len(frontier.app.state.calls) > n, "the frontier to be asked")
        cfg.write_text(_router_toml(slm.url, "tickets-v3").replace('name = "tickets"', 'name = "other"'))
        assert proxy.client.post("/admin/reload").json()["tasks"] == ["other"]
        r = pending.result()
    assert r.status_code == 200 and r.headers["x-fleetdeck-route"] == "frontier", r.text
    (row,) = stored_rows(proxy)
    assert (row["status"], row["route"], row["task"]) == (200, "frontier", "tickets")
    assert row["cost_usd"] > 0  # priced as its own task's frontier model
