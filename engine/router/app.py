"""The proxy's HTTP side (Starlette): routes, the API key, the body read under its size and time bounds and
parsed through request_check/chat_schema, OpenAI-shaped errors, /health, /v1/models, /metrics and
/admin/reload. Routing itself is the Router's (engine/router/proxy.py); a bad request never takes the proxy
down.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator, Mapping

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as HttpRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.audit import trail as audit
from engine.router.call import Call
from engine.router.config import is_loopback
from engine.router.decide import Force
from engine.router.request_check import BadRequest, check_request, parse_body
from engine.router.slm_stream import OFF_LOOP_BYTES
from store.ledger_row import Reason, Route

if TYPE_CHECKING:  # the Router makes the app from this module: a type only, or the two would import each other
    from engine.router.proxy import Router

log = logging.getLogger("fleetdeck.proxy")

# The cancel message that tells Router.handle its client left (any other cancel is the proxy stopping).
CLIENT_GONE = "fleetdeck: the client disconnected"
# A body larger than OFF_LOOP_BYTES is parsed and validated in a thread: a 4 MiB body of 140,000 empty
# messages takes about a second of parsing and validation, which on the event loop would stall every stream.
# (The same bound has its forward to the small model encoded in a thread: engine/router/slm_stream.py.)


def openai_error(status: int, message: str, type_: str, code: str | None = None,
                 headers: Mapping[str, str] | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code or type_}},
        status_code=status,
        headers=headers,
    )


class Endpoints:
    """The handlers, each reading the Router's current config (a reload swaps it between requests)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def _auth_error(self, request: Request) -> Response | None:
        keys = self.router.keys
        if not keys:
            return None
        sent = request.headers.getlist("authorization")
        if len(sent) > 1:
            # Two keys are two answers to "who is this": which one a hop in front checked is unknowable.
            return openai_error(401, f"{len(sent)} Authorization headers: send exactly one, Authorization: Bearer <key>.",
                                "invalid_request_error", "invalid_api_key")
        header = sent[0] if sent else ""
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if token not in keys:
            return openai_error(401, "Missing or invalid API key: send Authorization: Bearer <key>.",
                                "invalid_request_error", "invalid_api_key")
        return None

    async def health(self, request: Request) -> Response:
        router = self.router
        upstreams = await router.upstream_health()
        # 503 only when no task can answer at all: a load balancer takes the proxy out of rotation then,
        # and keeps it while some upstream still answers ("degraded", 200).
        code = 503 if upstreams.status == "down" else 200
        # A load balancer's probe carries no key: it learns whether the proxy can answer, not why.
        if router.keys and self._auth_error(request) is not None:
            return JSONResponse({"status": upstreams.status}, status_code=code)
        ledger = router.ledger
        body: dict[str, Any] = {"status": upstreams.status, "reasons": upstreams.reasons, "tasks": len(router.config.task),
                                "ledger_error": (ledger.last_error or ledger.prune_error) if ledger else None,
                                "ledger_pending": ledger.pending if ledger else 0}
        if ledger is not None:
            # Where every row this run recorded is: recorded = stored + journaled + unjournaled + lost.
            c = ledger.counts()
            body.update(ledger_recorded=c.recorded, ledger_stored=c.stored, ledger_journaled=c.journaled,
                        ledger_unjournaled=c.unjournaled, ledger_lost=c.lost, ledger_replayed=c.replayed,
                        ledger_journal=str(ledger.journal), ledger_journal_error=ledger.journal_error)
        return JSONResponse(body, status_code=code)

    async def models(self, request: Request) -> Response:
        if (err := self._auth_error(request)) is not None:
            return err
        data = [{"id": t.name, "object": "model", "created": int(self.router.started_at), "owned_by": "fleetdeck"}
                for t in self.router.config.task]
        return JSONResponse({"object": "list", "data": data})

    async def metrics(self, request: Request) -> Response:
        if (err := self._auth_error(request)) is not None:  # task names and volumes are the site's business
            return err
        return Response(generate_latest(self.router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def reload(self, request: Request) -> Response:
        # An operator's action on this host only: never from the network, and with a key where keys are set.
        router = self.router
        client = request.client.host if request.client else ""
        origin = f"{client}:{request.client.port}" if request.client else "local"
        if not is_loopback(client):
            await router.record_refused_reload(origin, "not from this host's loopback")
            return openai_error(403, "Reload is accepted from this host's loopback only.", "permission_error")
        if (err := self._auth_error(request)) is not None:
            await router.record_refused_reload(origin, "missing or invalid API key")
            return err
        try:
            return JSONResponse(await router.audited_reload("http", origin))
        except audit.AuditUnavailable as exc:
            return openai_error(503, f"config not reloaded: {exc}", "server_error", "audit_unavailable")
        except audit.ReadOnlyError as exc:
            return openai_error(403, f"config not reloaded: {exc}", "permission_error", "read_only")
        except ValueError as exc:
            return openai_error(409, f"config not reloaded, the proxy keeps its current one: {exc}",
                                "invalid_request_error", "invalid_config")

    async def _read_body(self, request: Request) -> bytes | Response:
        limit = self.router.config.proxy.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return openai_error(413, f"Request body of {declared} bytes is over the {limit}-byte limit.",
                                "invalid_request_error", "request_too_large")
        chunks = []
        size = 0

        async def read() -> Response | None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    return openai_error(413, f"Request body is over the {limit}-byte limit.",
                                        "invalid_request_error", "request_too_large")
                chunks.append(chunk)
            return None

        deadline = self.router.config.proxy.body_timeout_s
        try:
            too_big = await asyncio.wait_for(read(), timeout=deadline)
        except asyncio.TimeoutError:
            # A body that never finishes would hold a connection (and a file descriptor) forever.
            log.warning("request body not complete after %g s (%d bytes read); answered 408", deadline, size)
            return openai_error(408, f"The request body did not arrive within {deadline:g} s.",
                                "invalid_request_error", "request_timeout")
        return too_big if too_big is not None else b"".join(chunks)

    async def chat(self, request: Request) -> Response:
        router = self.router
        t0 = time.perf_counter()
        if (err := self._auth_error(request)) is not None:
            return err
        if (err := _json_content_type_error(request)) is not None:
            router.metrics.errors.labels("", "415").inc()
            return err
        try:
            raw = await self._read_body(request)
        except ClientDisconnect:
            log.info("client disconnected before its request body was complete")
            return Response(status_code=499)  # nobody is listening; uvicorn drops it
        if isinstance(raw, Response):
            router.metrics.errors.labels("", str(raw.status_code)).inc()
            return raw
        big = len(raw) > OFF_LOOP_BYTES
        try:
            body = await asyncio.to_thread(parse_body, raw) if big else parse_body(raw)
        except BadRequest as exc:
            router.metrics.errors.labels("", "400").inc()
            return openai_error(400, str(exc), "invalid_request_error", exc.code, param=exc.param)
        try:
            task_header = _one_header(request, "x-fleetdeck-task")
        except BadRequest as exc:
            router.metrics.errors.labels("", "400").inc()
            return openai_error(400, str(exc), "invalid_request_error", exc.code, param=exc.param)
        name = task_header or body.get("model")
        if not isinstance(name, str) or not name:
            # Not a task name at all: the client's malformed request (400), not an unknown task (404).
            known = ", ".join(t.name for t in router.config.task)
            router.metrics.errors.labels("", "400").inc()
            what = "is required" if name is None or name == "" else f"must be a string, got {type(name).__name__}"
            return openai_error(400, f"`model` {what}: name a task ({known}) as `model` or in the X-Fleetdeck-Task "
                                     "header.", "invalid_request_error", "invalid_value", param="model")
        task = router.task_for(name)
        if task is None:
            known = ", ".join(t.name for t in router.config.task)
            router.metrics.errors.labels("", "404").inc()
            return openai_error(404, f"Unknown task {name[:100]!r}. Known tasks: {known}. Name one as `model` "
                                     "or in the X-Fleetdeck-Task header.", "invalid_request_error", "model_not_found")
        call = Call(uuid.uuid4().hex, task, t0, body.get("stream") is True, None, body, size=len(raw))
        try:
            call.force = _force(_one_header(request, "x-fleetdeck-escalate"))
            # From here on the body is the typed request's own dump: nothing unchecked goes upstream.
            call.body = await asyncio.to_thread(_checked, body) if big else _checked(body)
        except BadRequest as exc:
            # The task is known, so the refusal is a ledger row like any other answer.
            call.body = {"messages": body["messages"] if isinstance(body.get("messages"), list) else []}
            router.record(router.row(call, Route.NONE, False, Reason.BAD_REQUEST, 400, error=str(exc)))
            return openai_error(400, str(exc), "invalid_request_error", exc.code, param=exc.param,
                                headers=router.headers(call, Route.NONE, False))
        return await self._route_while_connected(request, call)

    async def _route_while_connected(self, request: Request, call: Call) -> Response:
        """Route the call; a client that disconnects before its answer starts cancels it (the small model's
        stream is closed, the frontier call dropped) and the ledger row says the client left (499).
        Once a streamed answer has begun, Starlette watches for the disconnect and the relay records it."""
        me = asyncio.current_task()
        assert me is not None

        async def watch() -> None:
            # The body has been read whole, so the next message is the disconnect (or nothing, ever).
            try:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
            except Exception:  # a server that cannot say: the request is routed to its end as before
                return
            me.cancel(CLIENT_GONE)

        watcher = asyncio.ensure_future(watch())
        try:
            return await self.router.handle(call)
        except asyncio.CancelledError as exc:
            if not (exc.args and exc.args[0] == CLIENT_GONE):
                raise  # the proxy is stopping: Router.handle recorded the row
            me.uncancel()
            return Response(status_code=499)  # nobody is listening; uvicorn drops it
        finally:
            watcher.cancel()


def _json_content_type_error(request: Request) -> Response | None:
    """OpenAI's chat API takes a JSON body, and every OpenAI client says so (`Content-Type: application/json`:
    both SDKs, litellm, httpx's json=, curl with -H). A body of any other type, or of none, is refused (415)
    before it is read: a web page can make a browser POST text/plain, a form, or a Blob with no type to
    127.0.0.1 without asking first (no CORS preflight), so with the Origin and Host checks this is a third
    wall against a page spending the frontier budget from an operator's browser; a page that sets
    application/json must ask first, and the proxy answers no preflight. Parameters (charset) are allowed."""
    sent = request.headers.getlist("content-type")
    kind = sent[0].split(";", 1)[0].strip().lower() if len(sent) == 1 else ""
    if kind == "application/json":
        return None
    got = "none" if not sent else f"{len(sent)} Content-Type headers" if len(sent) > 1 else repr(sent[0][:60])
    return openai_error(415, f"Content-Type must be application/json (got {got}): send the request as JSON, as the "
                             "OpenAI SDKs do (with curl: -H 'Content-Type: application/json').", "invalid_request_error",
                        "unsupported_media_type", param="Content-Type")


def _checked(body: dict[str, Any]) -> dict[str, Any]:
    return check_request(body).forwarded()


def _one_header(request: Request, name: str) -> str | None:
    """A header that must come at most once: two values would be two answers (which task? which route?)."""
    values = request.headers.getlist(name)
    if len(values) > 1:
        raise BadRequest(f"{len(values)} {_HEADER_NAMES[name]} headers: send it at most once.", _HEADER_NAMES[name],
                         "invalid_header")
    return values[0] if values else None


_HEADER_NAMES = {"x-fleetdeck-task": "X-Fleetdeck-Task", "x-fleetdeck-escalate": "X-Fleetdeck-Escalate"}


def _force(header: str | None) -> Force | None:
    if header is None:
        return None
    try:
        return Force(header.strip().lower())
    except ValueError:
        raise BadRequest(f"X-Fleetdeck-Escalate must be `always` or `never`, got {header[:40]!r}.",
                         "X-Fleetdeck-Escalate", "invalid_header") from None


class BrowserGuard:
    """ASGI middleware: a request a web browser sends on a page's behalf is refused (403). The proxy serves
    no page and answers no CORS preflight, yet a page can still make a browser *send* a POST (a form, or
    fetch with text/plain) to 127.0.0.1, where the proxy needs no key: it would spend the frontier budget
    or reload the config from any site the operator visits. Browsers mark such requests with Origin or
    Sec-Fetch-Site; API clients (SDKs, curl, load balancers) send neither."""

    def __init__(self, app: ASGIApp, router: Router) -> None:
        self.app = app
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") == "http":
            headers = dict(scope.get("headers") or [])
            site = headers.get(b"sec-fetch-site", b"none")
            response = None
            if b"origin" in headers or site != b"none":
                response = openai_error(403, "Requests from a web page are refused: fleetdeck's proxy is an API for "
                                             "programs (no Origin or Sec-Fetch-Site header).", "permission_error",
                                        "browser_request_refused")
            elif not self.router.keys and not _names_loopback(headers.get(b"host")):
                # DNS rebinding: a page whose own name the attacker points at 127.0.0.1 is, to an older browser,
                # the page's own origin (no Origin, no Sec-Fetch-Site), and its Host is that name. Without keys
                # the proxy answers only requests addressed to this host by a loopback name.
                response = openai_error(403, "Without API keys the proxy answers only requests addressed to "
                                             "127.0.0.1, ::1 or localhost (the Host header names another host).",
                                        "permission_error", "host_not_allowed")
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _names_loopback(host: bytes | None) -> bool:
    """A Host header naming this host by a loopback name or address (any port); none at all (HTTP/1.0) too."""
    if host is None:
        return True
    name = host.decode("latin-1").strip().lower()
    if name.startswith("["):
        name = name[1:name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    return is_loopback(name) or name == "localhost" or name.endswith(".localhost")


class RequestTasks:
    """ASGI middleware: the task of each HTTP request is in `router.handlers` while it runs (a stream's
    included), so the stop can wait for the rows of the requests it cancelled."""

    def __init__(self, app: ASGIApp, router: Router) -> None:
        self.app = app
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task() if scope.get("type") == "http" else None
        if task is None:
            await self.app(scope, receive, send)
            return
        self.router.handlers.add(task)
        try:
            await self.app(scope, receive, send)
        finally:
            self.router.handlers.discard(task)


def create_app(router: Router) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await router.startup()
        loop = asyncio.get_running_loop()
        hup = False
        if router.config_path is not None:
            try:  # `kill -HUP` reloads, as daemons do; errors are logged, the old config stays
                loop.add_signal_handler(signal.SIGHUP, lambda: router.start_reload(loop))
                hup = True
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests), or no SIGHUP
                pass
        try:
            yield
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            await router.shutdown()

    async def not_found(request: Request, exc: Exception) -> Response:
        return openai_error(404, f"No route {request.url.path}; fleetdeck serves /v1/chat/completions, /v1/models, "
                                 "/health and /metrics.", "invalid_request_error", "not_found")

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return openai_error(405, f"{request.method} is not allowed on {request.url.path}.", "invalid_request_error",
                            "method_not_allowed")

    endpoints = Endpoints(router)
    app = Starlette(
        routes=[
            HttpRoute("/v1/chat/completions", endpoints.chat, methods=["POST"]),
            HttpRoute("/chat/completions", endpoints.chat, methods=["POST"]),
            HttpRoute("/v1/models", endpoints.models, methods=["GET"]),
            HttpRoute("/health", endpoints.health, methods=["GET"]),
            HttpRoute("/metrics", endpoints.metrics, methods=["GET"]),
            HttpRoute("/admin/reload", endpoints.reload, methods=["POST"]),
        ],
        lifespan=lifespan,
        exception_handlers={404: not_found, 405: method_not_allowed},
        middleware=[Middleware(RequestTasks, router=router), Middleware(BrowserGuard, router=router)],
    )
    # No 307 to the same path with(out) a slash: its Location is built from the client's Host header, and
    # an OpenAI client would replay the body there. A path that is not a route is a 404 in OpenAI's shape.
    app.router.redirect_slashes = False
    app.state.router = router
    return app
