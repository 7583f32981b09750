"""The OpenAI-compatible routing proxy (an ASGI app).

For each chat completion: pick the task (`model`, or the X-Fleetdeck-Task header), ask the task's
small model with log-probabilities, and answer with it when its confidence is at or above the task's
threshold; otherwise (or when the small model errors or times out) escalate to the task's frontier
model through litellm. Every request, answered or failed, becomes one ledger row, queued off the
request path. Errors use OpenAI's error shape; a bad request never takes the proxy down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine.io.http_auth import bearer_from_env
from engine.router.confidence import answer_confidence, confidence, slm_request
from engine.router.config import RouterConfig, Task, api_keys
from engine.router.pricing import Price, frontier_price
from engine.router.request_check import BadRequest, check_request, json_depth_over, parse_body
from engine.router.slm_stream import BOUND_REASON, SlmCut, SlmStream, SlmStreamError, assemble_completion
from engine.router.upstream_pool import UpstreamClients
from store.ledger import LedgerWriter
from store.ledger_row import LedgerRow

log = logging.getLogger("fleetdeck.proxy")

# Parameters passed through to the models, as checked by request_check (never as the client sent them);
# anything else in the body is dropped.
PASS_THROUGH = {
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "n", "presence_penalty",
    "frequency_penalty", "seed", "tools", "tool_choice", "response_format", "user", "logit_bias",
}


REFUSAL_RECORD_S = 10.0  # at most one audit record per this many seconds of reloads refused at the door


def openai_error(status: int, message: str, type_: str, code: str | None = None, headers: dict | None = None,
                 param: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code or type_}},
        status_code=status,
        headers=headers,
    )


class _LedgerCollector:
    """The ledger writer's own counts, read at scrape time: a row held, made safe or lost is never silent.
    Every row the proxy recorded is in exactly one of stored, journaled, unjournaled (memory only), lost."""

    def __init__(self, ledger: LedgerWriter) -> None:
        self.ledger = ledger

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        w = self.ledger
        c = w.counts()
        yield CounterMetricFamily("fleetdeck_ledger_rows_recorded", "Ledger rows this run recorded (answered requests)",
                                  value=c.recorded)
        yield CounterMetricFamily("fleetdeck_ledger_rows_written", "Ledger rows of this run stored", value=c.stored)
        yield GaugeMetricFamily("fleetdeck_ledger_rows_journaled",
                                "Rows not yet stored whose whole line is in the journal", value=c.journaled)
        yield GaugeMetricFamily("fleetdeck_ledger_rows_unjournaled",
                                "Rows not yet stored and not in the journal (memory only)", value=c.unjournaled)
        yield CounterMetricFamily("fleetdeck_ledger_rows_lost", "Rows in neither the store nor the journal",
                                  value=c.lost)
        yield CounterMetricFamily("fleetdeck_ledger_rows_sanitized", "Rows stored with unstorable fields made safe",
                                  value=w.sanitized)
        yield CounterMetricFamily("fleetdeck_ledger_rows_replayed", "Rows written from an earlier run's journal",
                                  value=c.replayed)
        yield CounterMetricFamily("fleetdeck_ledger_journal_lines_unreadable",
                                  "Lines of an earlier run's journal that were not a row (torn), skipped",
                                  value=c.unreadable)
        yield CounterMetricFamily("fleetdeck_ledger_write_failures", "Failed ledger writes", value=w.write_failures)
        yield CounterMetricFamily("fleetdeck_ledger_journal_failures", "Failed journal writes, truncates and syncs",
                                  value=w.journal_failures)
        yield GaugeMetricFamily("fleetdeck_ledger_rows_pending", "Rows held while the store cannot be written",
                                value=c.pending)


class ProxyMetrics:
    def __init__(self, ledger: LedgerWriter | None = None) -> None:
        self.registry = CollectorRegistry()
        if ledger is not None:
            self.registry.register(_LedgerCollector(ledger))  # type: ignore[arg-type]
        self.requests = Counter("fleetdeck_requests", "Requests by task and route", ["task", "route"], registry=self.registry)
        self.escalations = Counter("fleetdeck_escalations", "Escalations by task and reason", ["task", "reason"], registry=self.registry)
        self.cost = Counter("fleetdeck_cost_usd", "Frontier spend in USD", ["task", "route"], registry=self.registry)
        self.errors = Counter("fleetdeck_errors", "Requests answered with an error status", ["task", "status"], registry=self.registry)
        self.latency = Histogram(
            "fleetdeck_request_latency_seconds", "End-to-end latency", ["task", "route"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )

    def observe(self, row: LedgerRow) -> None:
        self.requests.labels(row.task, row.route).inc()
        if row.escalated:
            self.escalations.labels(row.task, row.reason).inc()
        if row.cost_usd:
            self.cost.labels(row.task, row.route).inc(row.cost_usd)
        if row.status >= 400:
            self.errors.labels(row.task, str(row.status)).inc()
        if row.latency_ms is not None:
            self.latency.labels(row.task, row.route).observe(row.latency_ms / 1000.0)


@dataclass
class SlmOutcome:
    answer: dict[str, Any] | None = None
    confidence: float | None = None
    error_reason: str | None = None  # slm_first_token_timeout | slm_total_timeout | slm_error | no_logprobs | client_error
    status: int | None = None  # the small model's own HTTP status when it refused the request
    error: str | None = None  # what failed, in fleetdeck's words (no upstream text: it can quote the prompt)
    detail: str | None = None  # the upstream's own error text, for the client
    latency_ms: float | None = None
    stream: SlmStream | None = None  # a streamed answer, held open until it is relayed or dropped
    window: str | None = None  # streamed: the window confidence was decided on
    ttft_ms: float | None = None  # streamed: the first token, ms after the request was sent upstream
    bound: str | None = None  # the bound that fired: first_token | total

    @property
    def has_answer(self) -> bool:
        """An answer the client could be given (whole, or a stream held open)."""
        return self.answer is not None or self.stream is not None

    @property
    def full_error(self) -> str | None:
        return f"{self.error}: {self.detail}" if self.detail else self.error


@dataclass
class UpstreamHealth:
    status: str  # ok | degraded (some task cannot use an upstream) | down (no task can answer)
    reasons: list[str] = field(default_factory=list)


@dataclass
class Call:
    """What one request learned on its way through, for the ledger row."""

    rid: str
    task: Task
    t0: float
    stream: bool
    force: str | None
    body: dict[str, Any]
    slm: SlmOutcome = field(default_factory=SlmOutcome)


class Router:
    def __init__(self, config: RouterConfig, ledger: LedgerWriter | None = None, load_litellm: bool = True,
                 config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path  # what a reload reads; None: the proxy cannot reload
        self.ledger = ledger
        self.metrics = ProxyMetrics(ledger)
        self.keys = api_keys(config.proxy)
        self.upstreams: UpstreamClients | None = None  # the small models' HTTP clients, made at startup
        self.litellm: Any = None
        self.prices: dict[str, Price] = {}
        self._load_litellm = load_litellm
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[None]] = set()  # SIGHUP reloads running (the loop keeps weak references)
        self._refusal_recorded_at = float("-inf")  # reloads refused at the door: when one was last recorded
        self._refusals_held = 0
        self.started_at = time.time()
        self.stop_deadline: float | None = None  # time.monotonic() by which a stop must be done
        self.handlers: set[asyncio.Task[Any]] = set()  # requests being handled (RequestTasks adds them)

    # -- lifecycle ------------------------------------------------------------------------------
    async def startup(self) -> None:
        # Small pools per upstream host, not one big one: see engine/router/upstream_pool.py.
        self.upstreams = UpstreamClients()
        if self._load_litellm and any(t.frontier_model for t in self.config.task):
            from engine.router.pricing import import_litellm

            # Importing litellm takes seconds; do it once, off the event loop.
            self.litellm = await asyncio.to_thread(import_litellm)
        for task in self.config.task:
            self.prices[task.name] = frontier_price(task, self.litellm)

    async def reload(self) -> dict[str, Any]:
        """Read the config file again and use it for every request from now on; a request already
        routed keeps the task it started with. A config that does not load changes nothing (ValueError)."""
        from engine.router.config import load_router_config
        from store.config_files import ConfigError

        if self.config_path is None:
            raise ValueError("this proxy was started without a config file; restart it to change its config")
        async with self._reload_lock:
            try:
                new = await asyncio.to_thread(load_router_config, self.config_path)
            except ConfigError as exc:
                raise ValueError(str(exc)) from exc
            if self._load_litellm and self.litellm is None and any(t.frontier_model for t in new.task):
                from engine.router.pricing import import_litellm

                self.litellm = await asyncio.to_thread(import_litellm)
            prices = {t.name: frontier_price(t, self.litellm) for t in new.task}
            old = {t.name: t for t in self.config.task}
            changed = sorted(t.name for t in new.task if old.get(t.name) != t)
            restart = [k for k in ("host", "port", "journal_dir") if getattr(new.proxy, k) != getattr(self.config.proxy, k)]
            # One assignment each, no await between them: a request sees the old config or the new one.
            self.config, self.prices, self.keys = new, prices, api_keys(new.proxy)
        log.warning("config reloaded from %s: %s", self.config_path, ", ".join(changed) or "no task changed")
        return {"reloaded": True, "changed_tasks": changed, "tasks": [t.name for t in new.task],
                "needs_restart": restart}

    async def reload_endpoint(self, request: Request) -> Response:
        # An operator's action on this host only: never from the network, and with a key where keys are set.
        from engine.audit import trail as audit
        from engine.router.config import is_loopback

        client = request.client.host if request.client else ""
        origin = f"{client}:{request.client.port}" if request.client else "local"
        if not is_loopback(client):
            await self._record_refused_reload(origin, "not from this host's loopback")
            return openai_error(403, "Reload is accepted from this host's loopback only.", "permission_error")
        if (err := self._auth_error(request)) is not None:
            await self._record_refused_reload(origin, "missing or invalid API key")
            return err
        try:
            return JSONResponse(await self.audited_reload("http", origin))
        except audit.AuditUnavailable as exc:
            return openai_error(503, f"config not reloaded: {exc}", "server_error", "audit_unavailable")
        except audit.ReadOnlyError as exc:
            return openai_error(403, f"config not reloaded: {exc}", "permission_error", "read_only")
        except ValueError as exc:
            return openai_error(409, f"config not reloaded, the proxy keeps its current one: {exc}",
                                "invalid_request_error", "invalid_config")

    async def _record_refused_reload(self, origin: str, reason: str) -> None:
        """A reload refused at the door is recorded too, but at most one record per REFUSAL_RECORD_S: a
        client that is refused cannot fill the disk with records; the next record counts those held back."""
        from engine.audit import trail as audit

        now = time.monotonic()
        if now - self._refusal_recorded_at < REFUSAL_RECORD_S:
            self._refusals_held += 1
            return
        held, self._refusals_held, self._refusal_recorded_at = self._refusals_held, 0, now
        if held:
            reason += f" (and {held} more reload request(s) refused at the door since the last such record)"
        target = str(self.config_path) if self.config_path is not None else "(no config file)"

        def write() -> None:
            with audit.on_behalf_of({"source": "proxy", "origin": origin}):
                audit.record("router.reload", target, "refused", reason, config=target, via="http")

        await asyncio.to_thread(write)

    async def audited_reload(self, via: str, origin: str) -> dict[str, Any]:
        """A reload is a change to this node: refused when read-only or when its audit record cannot be
        written (fail closed), and recorded with its outcome. The trail's store I/O runs off the loop."""
        from engine.audit import trail as audit

        target = str(self.config_path) if self.config_path is not None else "(no config file)"
        who = {"source": "proxy", "origin": origin}

        def begin() -> audit.Entry:
            with audit.on_behalf_of(who):
                return audit.begin("router.reload", target, config=target, via=via)

        def finish(entry: audit.Entry, outcome: str, reason: str | None) -> None:
            with audit.on_behalf_of(who):
                audit.finish(entry, outcome, reason)

        entry = await asyncio.to_thread(begin)
        try:
            result = await self.reload()
        except ValueError as exc:
            await asyncio.to_thread(finish, entry, "refused", str(exc))
            raise
        except BaseException as exc:
            await asyncio.to_thread(finish, entry, "failed", f"{type(exc).__name__}: {exc}")
            raise
        entry.params["changed"] = ",".join(result["changed_tasks"])
        await asyncio.to_thread(finish, entry, "done", None)
        return result

    def stop_requested(self, now: float) -> None:
        """A stop signal came (called from the signal handler): the whole stop is bounded from here."""
        if self.stop_deadline is None:
            self.stop_deadline = now + self.config.proxy.shutdown_grace_s

    def ledger_close_bound(self) -> float:
        """What is left of the grace for storing the ledger (the writer still makes one last attempt)."""
        if self.stop_deadline is None:
            return self.config.proxy.shutdown_grace_s
        return max(0.0, self.stop_deadline - time.monotonic())

    async def shutdown(self) -> None:
        # uvicorn has cancelled the requests that outlived the grace, but they record their rows (503,
        # `shutdown`) only when they next run: the ledger closes after they have, or its count would miss them.
        running = {t for t in self.handlers if not t.done()}
        if running:
            await asyncio.wait(running, timeout=max(self.ledger_close_bound(), 1.0))
        if self.upstreams is not None:
            await self.upstreams.aclose()
        if self.ledger is not None:
            await asyncio.to_thread(self.ledger.close, self.ledger_close_bound())

    # -- endpoints ------------------------------------------------------------------------------
    def _auth_error(self, request: Request) -> Response | None:
        if not self.keys:
            return None
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if token not in self.keys:
            return openai_error(401, "Missing or invalid API key: send Authorization: Bearer <key>.",
                                "invalid_request_error", "invalid_api_key")
        return None

    async def health(self, request: Request) -> Response:
        upstreams = await self.upstream_health()
        # 503 only when no task can answer at all: a load balancer takes the proxy out of rotation then,
        # and keeps it while some upstream still answers ("degraded", 200).
        code = 503 if upstreams.status == "down" else 200
        # A load balancer's probe carries no key: it learns whether the proxy can answer, not why.
        if self.keys and self._auth_error(request) is not None:
            return JSONResponse({"status": upstreams.status}, status_code=code)
        ledger = self.ledger
        body: dict[str, Any] = {"status": upstreams.status, "reasons": upstreams.reasons, "tasks": len(self.config.task),
                                "ledger_error": (ledger.last_error or ledger.prune_error) if ledger else None,
                                "ledger_pending": ledger.pending if ledger else 0}
        if ledger is not None:
            # Where every row this run recorded is: recorded = stored + journaled + unjournaled + lost.
            c = ledger.counts()
            body.update(ledger_recorded=c.recorded, ledger_stored=c.stored, ledger_journaled=c.journaled,
                        ledger_unjournaled=c.unjournaled, ledger_lost=c.lost, ledger_replayed=c.replayed,
                        ledger_journal=str(ledger.journal), ledger_journal_error=ledger.journal_error)
        return JSONResponse(body, status_code=code)

    async def upstream_health(self) -> "UpstreamHealth":
        """Whether each task's small model answers now (one short probe per distinct server) and whether
        its frontier model could be asked (litellm loaded, its key's environment variable set)."""
        config = self.config
        urls = {t.slm_base_url: t for t in config.task}
        probes = await asyncio.gather(*(self._probe_slm(t) for t in urls.values()))
        slm_down = {url: why for url, why in zip(urls, probes) if why is not None}
        reasons: list[str] = []
        answering = 0
        for task in config.task:
            slm_ok = task.slm_base_url not in slm_down
            if not slm_ok:
                reasons.append(f"task {task.name}: small model at {task.slm_base_url} unreachable "
                               f"({slm_down[task.slm_base_url]})")
            frontier_ok = False
            if task.frontier_model:
                env = task.frontier_api_key_env
                if self._load_litellm and self.litellm is None:
                    reasons.append(f"task {task.name}: litellm is not loaded, the frontier model cannot be asked")
                elif env and not os.environ.get(env):
                    reasons.append(f"task {task.name}: the frontier key's environment variable {env} is not set")
                else:
                    frontier_ok = True
            answering += slm_ok or frontier_ok
        status = "ok" if not reasons else ("degraded" if answering else "down")
        return UpstreamHealth(status, reasons)

    async def _probe_slm(self, task: Task) -> str | None:
        """None when the small model's server answers HTTP below 500; otherwise what went wrong."""
        if self.upstreams is None:
            return "the proxy is not started"
        timeout = min(task.slm_first_token_timeout_s, 2.0)
        try:
            resp = await asyncio.wait_for(
                self.upstreams.for_url(task.slm_base_url).get(
                    f"{task.slm_base_url}/models", headers=bearer_from_env(task.slm_api_key_env), timeout=timeout),
                timeout=timeout)
        except (httpx.HTTPError, asyncio.TimeoutError) as exc:
            return "no answer" if isinstance(exc, (asyncio.TimeoutError, httpx.TimeoutException)) else type(exc).__name__
        return f"HTTP {resp.status_code}" if resp.status_code >= 500 else None

    async def models(self, request: Request) -> Response:
        if (err := self._auth_error(request)) is not None:
            return err
        data = [{"id": t.name, "object": "model", "created": int(self.started_at), "owned_by": "fleetdeck"}
                for t in self.config.task]
        return JSONResponse({"object": "list", "data": data})

    async def metrics_endpoint(self, request: Request) -> Response:
        if (err := self._auth_error(request)) is not None:  # task names and volumes are the site's business
            return err
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def _read_body(self, request: Request) -> bytes | Response:
        limit = self.config.proxy.max_body_bytes
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

        deadline = self.config.proxy.body_timeout_s
        try:
            too_big = await asyncio.wait_for(read(), timeout=deadline)
        except asyncio.TimeoutError:
            # A body that never finishes would hold a connection (and a file descriptor) forever.
            log.warning("request body not complete after %g s (%d bytes read); answered 408", deadline, size)
            return openai_error(408, f"The request body did not arrive within {deadline:g} s.",
                                "invalid_request_error", "request_timeout")
        return too_big if too_big is not None else b"".join(chunks)

    async def chat(self, request: Request) -> Response:
        t0 = time.perf_counter()
        if (err := self._auth_error(request)) is not None:
            return err
        try:
            raw = await self._read_body(request)
        except ClientDisconnect:
            log.info("client disconnected before its request body was complete")
            return Response(status_code=499)  # nobody is listening; uvicorn drops it
        if isinstance(raw, Response):
            self.metrics.errors.labels("", str(raw.status_code)).inc()
            return raw
        try:
            body = parse_body(raw)
        except BadRequest as exc:
            self.metrics.errors.labels("", "400").inc()
            return openai_error(400, str(exc), "invalid_request_error", exc.code, param=exc.param)
        name = request.headers.get("x-fleetdeck-task") or body.get("model")
        task = self.config.task_by_name(name) if isinstance(name, str) and name else None
        if task is None:
            known = ", ".join(t.name for t in self.config.task)
            self.metrics.errors.labels("", "404").inc()
            return openai_error(404, f"Unknown task {str(name)[:100]!r}. Known tasks: {known}. Name one as `model` "
                                     "or in the X-Fleetdeck-Task header.", "invalid_request_error", "model_not_found")
        force = request.headers.get("x-fleetdeck-escalate")
        if force is not None:
            force = force.strip().lower()
            if force not in ("always", "never"):
                return openai_error(400, "X-Fleetdeck-Escalate must be `always` or `never`.", "invalid_request_error")
        call = Call(uuid.uuid4().hex, task, t0, body.get("stream") is True, force, body)
        try:
            # From here on the body is the typed request's own dump: nothing unchecked goes upstream.
            call.body = check_request(body).forwarded()
        except BadRequest as exc:
            # The task is known, so the refusal is a ledger row like any other answer.
            call.body = {"messages": body["messages"] if isinstance(body.get("messages"), list) else []}
            self._record(self._row(call, route="none", escalated=False, reason="bad_request", status=400, error=str(exc)))
            return openai_error(400, str(exc), "invalid_request_error", exc.code, param=exc.param,
                                headers=self._headers(call, "none", False))
        try:
            return await self._route(call)
        except asyncio.CancelledError:
            # The proxy is stopping and this request outlived the grace period: it still gets its row.
            self._record(self._row(call, route="none", escalated=False, reason="shutdown", status=503,
                                   error="the proxy stopped before this request was answered"))
            raise
        except Exception as exc:  # the proxy never dies on a request
            row = self._row(call, route="none", escalated=False, reason="internal_error", status=500,
                            error=f"{type(exc).__name__}: {exc}")
            self._record(row)
            return openai_error(500, f"fleetdeck proxy error: {type(exc).__name__}: {exc}", "server_error")

    # -- routing --------------------------------------------------------------------------------
    async def _route(self, call: Call) -> Response:
        try:
            return await self._decide(call)
        finally:
            # A streamed SLM answer that no relay took (escalated, failed, cancelled) is closed here.
            if call.slm.stream is not None and not call.slm.stream.claimed:
                await call.slm.stream.aclose()

    async def _decide(self, call: Call) -> Response:
        task = call.task
        if call.force != "always":
            call.slm = await (self._stream_slm(call) if call.stream else self._ask_slm(call))
        slm = call.slm
        if slm.error_reason == "client_error":
            return self._fail(call, slm.status or 400, f"the small model refused the request ({slm.full_error})",
                              reason="client_error", client_error=True,
                              summary=f"the small model refused the request ({slm.error})")
        if call.force == "never":
            if not slm.has_answer:
                return self._fail(call, 502, f"the small model failed ({slm.full_error}) and X-Fleetdeck-Escalate: never forbids escalation",
                                  reason=slm.error_reason or "slm_error", forced=True,
                                  summary=f"the small model failed ({slm.error}) and X-Fleetdeck-Escalate: never forbids escalation")
            return self._answer_slm(call, escalated=False, reason="forced_slm", forced=True)
        if call.force is None and slm.has_answer and slm.confidence is not None and slm.confidence >= task.threshold:
            return self._answer_slm(call, escalated=False, reason="confident")

        reason = "forced_frontier" if call.force == "always" else (
            slm.error_reason or ("low_confidence" if slm.has_answer else "slm_error"))
        if not task.frontier_model:
            if slm.has_answer:  # nothing to escalate to: the small model's answer stands
                return self._answer_slm(call, escalated=False, reason=reason, error="no frontier model configured")
            why = f"and task {task.name!r} has no frontier_model to escalate to"
            return self._fail(call, 503, f"the small model is unavailable ({slm.full_error}) {why}", reason=reason,
                              summary=f"the small model is unavailable ({slm.error}) {why}")
        if call.stream:
            return await self._stream_frontier(call, reason)
        return await self._answer_frontier(call, reason)

    def _open_slm(self, call: Call) -> SlmStream:
        """The small model's request, streamed whatever the client asked: both bounds watch it."""
        task = call.task
        payload = slm_request(task, call.body["messages"], _passed_through(call.body),
                              int(call.body.get("top_logprobs") or 0))
        # Usage always: the ledger's token counts; a streaming client gets the usage chunk only if it asked.
        payload.update(stream=True, stream_options={"include_usage": True})
        assert self.upstreams is not None
        return SlmStream(self.upstreams.for_url(task.slm_base_url), f"{task.slm_base_url}/chat/completions", payload,
                         bearer_from_env(task.slm_api_key_env), task.slm_first_token_timeout_s,
                         task.slm_total_timeout_s)

    async def _read_slm(self, stream: SlmStream, read: Callable[[], Awaitable[None]],
                        failed: Callable[..., SlmOutcome]) -> SlmOutcome | None:
        """Open the stream and `read` it; None when that went well, else the failure's outcome (the stream
        closed). The same failures, and the same reasons, for a streamed and a whole answer."""
        try:
            resp = await stream.open()
            if resp.status_code != 200:
                await resp.aread()
                await stream.aclose()
                reason = "client_error" if resp.status_code in CLIENT_ERRORS else "slm_error"
                return failed(reason, f"HTTP {resp.status_code}", detail=_upstream_message(resp),
                              status=resp.status_code if reason == "client_error" else None)
            await read()
        except SlmCut as exc:
            await stream.aclose()
            return failed(BOUND_REASON[exc.bound], str(exc), bound=exc.bound)
        except SlmStreamError as exc:
            await stream.aclose()
            return failed("slm_error", str(exc))
        except httpx.HTTPError as exc:
            await stream.aclose()
            return failed("slm_error", f"{type(exc).__name__}: {exc}")
        except BaseException:
            await stream.aclose()
            raise
        return None

    async def _ask_slm(self, call: Call) -> SlmOutcome:
        """A client that wants one JSON answer: the small model is still asked for a stream, so an SLM that
        has not started is cut at slm_first_token_timeout_s (not after the whole slm_total_timeout_s);
        the whole stream is read and assembled into the chat.completion the client gets. A server that
        ignored `stream` and sent one JSON body is read as before."""
        task = call.task
        stream = self._open_slm(call)
        t = time.perf_counter()
        body: list[bytes] = []

        def failed(reason: str, error: str, **kw: Any) -> SlmOutcome:
            return SlmOutcome(error_reason=reason, error=error, ttft_ms=stream.ttft_ms,
                              latency_ms=(time.perf_counter() - t) * 1000, **kw)

        async def read() -> None:
            if stream.sends_json:
                body.append(await stream.read_body())
            else:
                await stream.read_all()

        if (outcome := await self._read_slm(stream, read, failed)) is not None:
            return outcome
        await stream.aclose()  # read to its end (or whole): the connection goes back to the pool
        latency = (time.perf_counter() - t) * 1000
        try:
            if body:
                # The same depth bound as a client's body: the answer is encoded again for the client.
                if json_depth_over(body[0].decode("utf-8", "replace")):
                    raise ValueError("nested too deeply")
                answer = json.loads(body[0])
            else:
                answer = assemble_completion(stream.held, stream.usage, stream.missing_logprobs)
            _, conf = answer_confidence(task, answer)
        except ValueError:
            return failed("slm_error", "the small model's answer is not a chat completion")
        if conf is None:
            return SlmOutcome(answer=answer, error_reason="no_logprobs", error="no token log-probabilities in the answer",
                              latency_ms=latency, ttft_ms=stream.ttft_ms)
        return SlmOutcome(answer=answer, confidence=conf, latency_ms=latency, ttft_ms=stream.ttft_ms)

    def _answer_slm(self, call: Call, escalated: bool, reason: str, forced: bool = False, error: str | None = None) -> Response:
        if call.slm.stream is not None:
            call.slm.stream.claimed = True  # the relay below closes it, once the response has been sent
            row = self._row(call, route="slm", escalated=escalated, reason=reason, status=200, forced=forced, error=error)
            return StreamingResponse(self._relay_slm(call, call.slm.stream, row), media_type="text/event-stream",
                                     headers=self._headers(call, "slm", escalated))
        answer = call.slm.answer
        assert answer is not None
        if not call.body.get("logprobs"):
            for choice in answer.get("choices", []):
                if isinstance(choice, dict):
                    choice.pop("logprobs", None)
        usage = answer.get("usage") or {}
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
        price = self.prices.get(call.task.name, Price(0, 0, "unknown"))
        row = self._row(call, route="slm", escalated=escalated, reason=reason, status=200, forced=forced, error=error,
                        prompt_tokens=pt, completion_tokens=ct,
                        all_frontier_cost_usd=price.cost(pt or 0, ct or 0),
                        completion_text=_answer_text(answer))
        headers = self._headers(call, "slm", escalated)
        if call.stream:
            return StreamingResponse(self._sse_from_answer(answer, call, row), media_type="text/event-stream", headers=headers)
        self._record(row)
        return JSONResponse(answer, headers=headers)

    async def _stream_slm(self, call: Call) -> SlmOutcome:
        """Ask the small model for a streamed answer and read it up to the task's decision window."""
        task = call.task
        stream = self._open_slm(call)
        window = task.window_label()
        t = time.perf_counter()

        def failed(reason: str, error: str, **kw: Any) -> SlmOutcome:
            return SlmOutcome(error_reason=reason, error=error, window=window, ttft_ms=stream.ttft_ms,
                              latency_ms=(time.perf_counter() - t) * 1000, **kw)

        if (outcome := await self._read_slm(stream, lambda: stream.fill_window(task.window_tokens()), failed)) is not None:
            return outcome
        n = task.window_tokens()
        lps = stream.logprobs if n is None else stream.logprobs[:n]
        outcome = SlmOutcome(stream=stream, window=window, ttft_ms=stream.ttft_ms,
                             latency_ms=(time.perf_counter() - t) * 1000)
        if stream.missing_logprobs or not lps:
            outcome.error_reason, outcome.error = "no_logprobs", "no token log-probabilities in the answer"
        else:
            outcome.confidence = confidence(task.confidence, lps)
        return outcome

    async def _relay_slm(self, call: Call, stream: SlmStream, row: LedgerRow) -> AsyncIterator[bytes]:
        """The held window, then the rest of the small model's stream as it comes; a cut ends the stream
        with an error event in OpenAI's shape that says what the ledger row says."""
        wants_logprobs = bool(call.body.get("logprobs"))
        wants_usage = bool((call.body.get("stream_options") or {}).get("include_usage"))
        try:
            async for chunk in stream.relay():
                if not wants_logprobs:
                    for choice in chunk.get("choices") or []:
                        if isinstance(choice, dict):
                            choice.pop("logprobs", None)
                if chunk.get("usage") is not None and not wants_usage:
                    chunk.pop("usage")
                    if not chunk.get("choices"):
                        continue
                yield _sse(chunk)
            yield b"data: [DONE]\n\n"
        except (SlmCut, SlmStreamError) as exc:
            if isinstance(exc, SlmCut):
                row.slm_bound = exc.bound
                row.reason = BOUND_REASON[exc.bound]
            row.status = 502
            row.error = f"small model stream cut: {exc}"
            yield _sse({"error": {"message": row.error, "type": "server_error", "param": None,
                                  "code": "upstream_error"}})
        finally:
            usage = stream.usage
            pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
            price = self.prices.get(call.task.name, Price(0, 0, "unknown"))
            row.slm_prompt_tokens, row.slm_completion_tokens = pt, ct
            row.prompt_tokens, row.completion_tokens = pt, ct
            row.all_frontier_cost_usd = price.cost(pt or 0, ct or 0)
            row.slm_ttft_ms = stream.ttft_ms
            if call.task.store_text:
                row.completion_text = "".join(stream.text)
            row.slm_latency_ms = stream.elapsed_ms()
            row.latency_ms = (time.perf_counter() - call.t0) * 1000
            self._record(row)
            await stream.aclose()

    async def _sse_from_answer(self, answer: dict[str, Any], call: Call, row: LedgerRow) -> AsyncIterator[bytes]:
        """A whole answer, sent as OpenAI's stream of chunks."""
        base = {"id": answer.get("id", f"chatcmpl-{call.rid}"), "object": "chat.completion.chunk",
                "created": answer.get("created", int(time.time())), "model": answer.get("model", call.task.name)}
        try:
            for i, choice in enumerate(answer.get("choices", [])):
                msg = choice.get("message") or {}
                delta: dict[str, Any] = {"role": "assistant", "content": msg.get("content") or ""}
                if msg.get("tool_calls"):
                    delta["tool_calls"] = msg["tool_calls"]
                first = {**base, "choices": [{"index": choice.get("index", i), "delta": delta, "finish_reason": None}]}
                if call.body.get("logprobs") and choice.get("logprobs"):
                    first["choices"][0]["logprobs"] = choice["logprobs"]
                yield _sse(first)
                yield _sse({**base, "choices": [{"index": choice.get("index", i), "delta": {},
                                                 "finish_reason": choice.get("finish_reason", "stop")}]})
            if (call.body.get("stream_options") or {}).get("include_usage") and answer.get("usage"):
                yield _sse({**base, "choices": [], "usage": answer["usage"]})
            yield b"data: [DONE]\n\n"
        finally:
            row.latency_ms = (time.perf_counter() - call.t0) * 1000
            self._record(row)

    def _frontier_kwargs(self, call: Call) -> dict[str, Any]:
        task = call.task
        kwargs: dict[str, Any] = _passed_through(call.body)
        # One attempt: litellm's own retries would multiply the timeout the operator set.
        kwargs.update(model=task.frontier_model, messages=call.body["messages"], timeout=self.config.proxy.frontier_timeout_s,
                      num_retries=0, max_retries=0)
        if call.body.get("logprobs"):
            kwargs["logprobs"] = True
            if call.body.get("top_logprobs"):
                kwargs["top_logprobs"] = call.body["top_logprobs"]
        if task.frontier_api_base:
            kwargs["api_base"] = task.frontier_api_base
        if task.frontier_api_key_env:
            kwargs["api_key"] = os.environ.get(task.frontier_api_key_env, "")
        return kwargs

    def _frontier_failed(self, call: Call, reason: str, exc: BaseException | str) -> Response:
        error, summary = (exc, exc) if isinstance(exc, str) else (_short_error(exc), _error_kind(exc))
        if call.slm.has_answer:
            # The frontier failed after a low-confidence answer: the small model's answer is returned.
            return self._answer_slm(call, escalated=True, reason=reason,
                                    error=f"frontier failed: {error if call.task.store_text else summary}")
        status = getattr(exc, "status_code", None)
        if status in CLIENT_ERRORS:
            # The frontier refused the request itself: the client's 4xx, not a gateway failure.
            return self._fail(call, 400, f"the frontier model refused the request ({error})", reason=reason,
                              escalated=True, client_error=True, summary=f"the frontier model refused the request ({summary})")
        return self._fail(call, 502, f"both the small model ({call.slm.full_error or 'not asked'}) and the frontier model "
                                     f"({error}) failed", reason=reason, escalated=True,
                          summary=f"both the small model ({call.slm.error or 'not asked'}) and the frontier model "
                                  f"({summary}) failed")

    async def _answer_frontier(self, call: Call, reason: str) -> Response:
        if self.litellm is None:
            return self._frontier_failed(call, reason, "litellm is not loaded")
        t = time.perf_counter()
        try:
            resp = await asyncio.wait_for(self.litellm.acompletion(**self._frontier_kwargs(call)),
                                          timeout=self.config.proxy.frontier_timeout_s)
        except asyncio.TimeoutError:
            return self._frontier_failed(call, reason, f"no answer within {self.config.proxy.frontier_timeout_s:g} s")
        except Exception as exc:
            return self._frontier_failed(call, reason, exc)
        latency = (time.perf_counter() - t) * 1000
        answer = resp.model_dump() if hasattr(resp, "model_dump") else dict(resp)
        usage = answer.get("usage") or {}
        pt, ct = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
        cost = self.prices[call.task.name].cost(pt, ct)
        row = self._row(call, route="frontier", escalated=True, reason=reason, status=200,
                        forced=call.force == "always", prompt_tokens=pt, completion_tokens=ct,
                        frontier_prompt_tokens=pt, frontier_completion_tokens=ct, frontier_latency_ms=latency,
                        cost_usd=cost, all_frontier_cost_usd=cost, completion_text=_answer_text(answer))
        self._record(row)
        return JSONResponse(answer, headers=self._headers(call, "frontier", True))

    async def _stream_frontier(self, call: Call, reason: str) -> Response:
        if self.litellm is None:
            return self._frontier_failed(call, reason, "litellm is not loaded")
        t = time.perf_counter()
        limit = self.config.proxy.frontier_timeout_s
        # One bound for the whole stream, opening included: a frontier that sends a chunk and then only
        # keep-alive comments (which litellm reads past, so no read ever times out) is cut here too.
        deadline = asyncio.get_running_loop().time() + limit
        kwargs = self._frontier_kwargs(call)
        kwargs.update(stream=True, stream_options={"include_usage": True})
        async def open_stream() -> tuple[Any, Any]:
            stream = await self.litellm.acompletion(**kwargs)
            iterator = stream.__aiter__()
            try:
                return iterator, await iterator.__anext__()  # fail over before the first byte is sent, not after
            except StopAsyncIteration:
                return None, None

        try:
            iterator, first = await asyncio.wait_for(open_stream(), timeout=limit)
        except asyncio.TimeoutError:
            return self._frontier_failed(call, reason, f"no first chunk within {limit:g} s")
        except Exception as exc:
            return self._frontier_failed(call, reason, exc)
        row = self._row(call, route="frontier", escalated=True, reason=reason, status=200, forced=call.force == "always")
        client_wants_usage = bool((call.body.get("stream_options") or {}).get("include_usage"))
        price = self.prices[call.task.name]

        async def next_chunk() -> Any:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                return await asyncio.wait_for(iterator.__anext__(), timeout=max(remaining, 0.0))
            except StopAsyncIteration:
                return None
            except asyncio.TimeoutError:
                raise _StreamCut(f"the stream did not end within frontier_timeout_s = {limit:g} s") from None

        async def gen() -> AsyncIterator[bytes]:
            parts: list[str] = []
            usage: dict[str, Any] = {}
            try:
                chunk = first
                while chunk is not None:
                    data = chunk.model_dump(exclude_none=True) if hasattr(chunk, "model_dump") else dict(chunk)
                    if data.get("usage"):
                        usage = data["usage"]
                        if not client_wants_usage:
                            data.pop("usage")
                            if not data.get("choices"):
                                data = None  # type: ignore[assignment]
                    if data is not None:
                        for ch in data.get("choices") or []:
                            piece = (ch.get("delta") or {}).get("content")
                            if piece:
                                parts.append(piece)
                        yield _sse(data)
                    chunk = await next_chunk() if iterator is not None else None
                yield b"data: [DONE]\n\n"
            except Exception as exc:
                # The 200 and the first chunks are already sent: the client learns of the cut from an
                # error event in the stream (OpenAI's error shape), saying what the ledger row says.
                told = str(exc) if isinstance(exc, _StreamCut) else _short_error(exc)
                kept = told if isinstance(exc, _StreamCut) or call.task.store_text else _error_kind(exc)
                row.error = f"frontier stream cut: {kept}"
                row.status = 502
                yield _sse({"error": {"message": f"frontier stream cut: {told}", "type": "server_error",
                                      "param": None, "code": "upstream_error"}})
            finally:
                pt, ct = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
                row.prompt_tokens, row.completion_tokens = pt, ct
                row.frontier_prompt_tokens, row.frontier_completion_tokens = pt, ct
                row.frontier_latency_ms = (time.perf_counter() - t) * 1000
                row.cost_usd = row.all_frontier_cost_usd = price.cost(pt, ct)
                if call.task.store_text:
                    row.completion_text = "".join(parts)
                row.latency_ms = (time.perf_counter() - call.t0) * 1000
                self._record(row)
                await _close_stream(iterator)

        return StreamingResponse(gen(), media_type="text/event-stream", headers=self._headers(call, "frontier", True))

    # -- ledger ---------------------------------------------------------------------------------
    def _fail(self, call: Call, status: int, message: str, reason: str, forced: bool = False, escalated: bool = False,
              client_error: bool = False, summary: str | None = None) -> Response:
        """`message` goes to the client; the ledger keeps `summary` (no upstream text) unless the task stores text."""
        stored = message if summary is None or call.task.store_text else summary
        row = self._row(call, route="none", escalated=escalated, reason=reason, status=status, forced=forced, error=stored)
        self._record(row)
        if client_error:
            return openai_error(status, message, "invalid_request_error", "upstream_rejected",
                                headers=self._headers(call, "none", escalated))
        code = "upstream_unavailable" if status == 503 else "upstream_error"
        return openai_error(status, message, "server_error", code, headers=self._headers(call, "none", escalated))

    def _row(self, call: Call, route: str, escalated: bool, reason: str, status: int, **kw: Any) -> LedgerRow:
        task = call.task
        slm = call.slm
        usage = (slm.answer or {}).get("usage") or {}
        store_text = task.store_text
        completion_text = kw.pop("completion_text", None)
        return LedgerRow(
            id=call.rid, ts=time.time(), task=task.name, route=route, escalated=escalated, reason=reason,
            status=status, confidence=slm.confidence, slm_model=task.slm_model,
            frontier_model=task.frontier_model if route == "frontier" or escalated else None,
            slm_prompt_tokens=usage.get("prompt_tokens"), slm_completion_tokens=usage.get("completion_tokens"),
            slm_latency_ms=slm.latency_ms, latency_ms=(time.perf_counter() - call.t0) * 1000, stream=call.stream,
            slm_ttft_ms=slm.ttft_ms, decision_window=slm.window, slm_bound=slm.bound,
            prompt_text=json.dumps(call.body["messages"]) if store_text else None,
            completion_text=completion_text if store_text else None,
            **kw,
        )

    def _record(self, row: LedgerRow) -> None:
        self.metrics.observe(row)
        if self.ledger is not None:
            self.ledger.put(row)

    def _headers(self, call: Call, route: str, escalated: bool) -> dict[str, str]:
        conf = call.slm.confidence
        return {
            "x-fleetdeck-route": route,
            "x-fleetdeck-confidence": "" if conf is None else f"{conf:.4f}",
            "x-fleetdeck-escalated": "true" if escalated else "false",
            "x-fleetdeck-request-id": call.rid,
        }


class _StreamCut(Exception):
    """A frontier stream that outlived its bound; the message is the ledger's and the client's."""


async def _close_stream(iterator: Any) -> None:
    # A stream cut mid-read still holds its upstream connection until it is closed.
    close = getattr(iterator, "aclose", None)
    if close is None:
        return
    try:
        await asyncio.wait_for(close(), timeout=5)
    except Exception:  # closing is best effort; the ledger row is what matters here
        log.debug("closing a frontier stream failed", exc_info=True)


def _passed_through(body: dict[str, Any]) -> dict[str, Any]:
    """The client's model parameters (from the checked request); a null is the parameter not given."""
    return {k: v for k, v in body.items() if k in PASS_THROUGH and v is not None}


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _answer_text(answer: dict[str, Any]) -> str | None:
    try:
        return answer["choices"][0]["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None


CLIENT_ERRORS = (400, 422)  # an upstream saying the request itself is wrong


def _upstream_message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
        err = data.get("error") if isinstance(data, dict) else None
        text = err.get("message") if isinstance(err, dict) else (data.get("message") if isinstance(data, dict) else None)
        if isinstance(text, str):
            return text[:300]
    except ValueError:
        pass
    return resp.text[:300]


def _error_kind(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    return f"{type(exc).__name__}" + (f" (HTTP {status})" if isinstance(status, int) else "")


def _short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}"


async def _reload_logged(router: Router) -> None:
    from engine.audit import trail as audit

    try:
        await router.audited_reload("SIGHUP", "local")
    except (ValueError, audit.ReadOnlyError) as exc:
        log.error("SIGHUP: config not reloaded, keeping the current one: %s", exc)


def _start_reload(loop: asyncio.AbstractEventLoop, router: Router) -> None:
    task = loop.create_task(_reload_logged(router))
    router._reloads.add(task)
    task.add_done_callback(router._reloads.discard)


class RequestTasks:
    """ASGI middleware: the task of each HTTP request is in `router.handlers` while it runs (a stream's
    included), so the stop can wait for the rows of the requests it cancelled."""

    def __init__(self, app: Any, router: Router) -> None:
        self.app = app
        self.router = router

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
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
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        import signal

        await router.startup()
        loop = asyncio.get_running_loop()
        hup = False
        if router.config_path is not None:
            try:  # `kill -HUP` reloads, as daemons do; errors are logged, the old config stays
                loop.add_signal_handler(signal.SIGHUP, lambda: _start_reload(loop, router))
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
        return openai_error(405, f"{request.method} is not allowed on {request.url.path}.", "invalid_request_error")

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", router.chat, methods=["POST"]),
            Route("/chat/completions", router.chat, methods=["POST"]),
            Route("/v1/models", router.models, methods=["GET"]),
            Route("/health", router.health, methods=["GET"]),
            Route("/metrics", router.metrics_endpoint, methods=["GET"]),
            Route("/admin/reload", router.reload_endpoint, methods=["POST"]),
        ],
        lifespan=lifespan,
        exception_handlers={404: not_found, 405: method_not_allowed},
        middleware=[Middleware(RequestTasks, router=router)],
    )
    app.state.router = router
    return app
