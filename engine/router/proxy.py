"""The OpenAI-compatible routing proxy: the Router, which holds its config, clients and ledger, and routes.

For each chat completion: ask the task's small model with log-probabilities (engine/router/slm_client.py),
`decide` (engine/router/decide.py, pure) whether its answer stands or the task's frontier model is asked
through litellm (engine/router/frontier_client.py), and send the answer, whole or streamed
(engine/router/relay.py). Every request, answered or failed, becomes one ledger row, queued off the request
path. The HTTP side (routes, body parsing, errors, /health, /metrics, /admin/reload) is engine/router/app.py;
`create_app` is named here too because this module is where the proxy is made from (server.py, the tests).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.responses import JSONResponse, Response, StreamingResponse

from engine.audit import trail as audit
from engine.router.app import CLIENT_GONE, create_app, openai_error
from engine.router.call import Call
from engine.router.config import RouterConfig, Task, api_keys, load_router_config
from engine.router.decide import Decision, Failure, Force, after_frontier_failure, decide
from engine.router.frontier_client import FrontierFailed, ask_frontier, open_frontier_stream
from engine.router.metrics import ProxyMetrics
from engine.router.pricing import Price, estimated_prompt_tokens, frontier_price, import_litellm
from engine.router.relay import relay_frontier, relay_slm, sse_from_answer
from engine.router.slm_client import ask_slm, probe_slm, stream_slm
from engine.router.slm_stream import clean_usage
from engine.router.upstream_pool import UpstreamClients
from store.config_files import ConfigError
from store.ledger import LedgerWriter
from store.ledger_row import LedgerRow, Reason, Route

__all__ = ["REFUSAL_RECORD_S", "Router", "UpstreamHealth", "create_app"]

log = logging.getLogger("fleetdeck.proxy")

# Frontier calls that go on after their client left (each bounded by frontier_timeout_s): past this many, a
# leaving client's call is closed like a stream's, its cost estimated; a client cannot pile up calls it no
# longer holds a connection for.
MAX_LEFT_BEHIND = 256
REFUSAL_RECORD_S = 10.0  # at most one audit record per this many seconds of reloads refused at the door
MAX_CONFIG_BYTES = 1024 * 1024  # a router config is a few KiB; a reload reads no more (a path at /dev/zero, say)
UNKNOWN_PRICE = Price(0, 0, "unknown")


@dataclass
class UpstreamHealth:
    status: str  # ok | degraded (some task cannot use an upstream) | down (no task can answer)
    reasons: list[str] = field(default_factory=list)


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
        self.handlers: set[asyncio.Task[Any]] = set()  # requests being handled (app.RequestTasks adds them)
        # Frontier calls whose client left, run to their end for their usage (the cost the frontier bills).
        self.left_behind: set[asyncio.Task[None]] = set()

    # -- lifecycle ------------------------------------------------------------------------------
    async def startup(self) -> None:
        # Small pools per upstream host, not one big one: see engine/router/upstream_pool.py.
        self.upstreams = UpstreamClients()
        if self._load_litellm and any(t.frontier_model for t in self.config.task):
            # Importing litellm takes seconds; do it once, off the event loop.
            self.litellm = await asyncio.to_thread(import_litellm)
        for task in self.config.task:
            self.prices[task.name] = frontier_price(task, self.litellm)

    async def reload(self) -> dict[str, Any]:
        """Read the config file again and use it for every request from now on; a request already
        routed keeps the task it started with. A config that does not load changes nothing (ValueError)."""
        if self.config_path is None:
            raise ValueError("this proxy was started without a config file; restart it to change its config")
        async with self._reload_lock:
            try:
                _check_config_file(self.config_path)
                new = await asyncio.to_thread(load_router_config, self.config_path)
            except ConfigError as exc:
                # One line: the client's error message and the SIGHUP log line (pydantic lists one key a line).
                raise ValueError(_one_line(str(exc))) from exc
            if self._load_litellm and self.litellm is None and any(t.frontier_model for t in new.task):
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

    def _reload_target(self) -> str:
        return str(self.config_path) if self.config_path is not None else "(no config file)"

    async def record_refused_reload(self, origin: str, reason: str) -> None:
        """A reload refused at the door is recorded too, but at most one record per REFUSAL_RECORD_S: a
        client that is refused cannot fill the disk with records; the next record counts those held back."""
        now = time.monotonic()
        if now - self._refusal_recorded_at < REFUSAL_RECORD_S:
            self._refusals_held += 1
            return
        held, self._refusals_held, self._refusal_recorded_at = self._refusals_held, 0, now
        if held:
            reason += f" (and {held} more reload request(s) refused at the door since the last such record)"
        target = self._reload_target()

        def write() -> None:
            with audit.on_behalf_of({"source": "proxy", "origin": origin}):
                audit.record("router.reload", target, "refused", reason, config=target, via="http")

        await asyncio.to_thread(write)

    async def audited_reload(self, via: str, origin: str) -> dict[str, Any]:
        """A reload is a change to this node: refused when read-only or when its audit record cannot be
        written (fail closed), and recorded with its outcome. The trail's store I/O runs off the loop."""
        target = self._reload_target()
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

    def start_reload(self, loop: asyncio.AbstractEventLoop) -> None:
        """SIGHUP's reload, run as a task of the loop; a config that does not load is logged, the old one stays."""
        async def reload_logged() -> None:
            try:
                await self.audited_reload("SIGHUP", "local")
            except (ValueError, audit.ReadOnlyError) as exc:
                log.error("SIGHUP: config not reloaded, keeping the current one: %s", exc)

        task = loop.create_task(reload_logged())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

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
        if self.left_behind:
            # Frontier calls of clients that left: waited for within the grace, then cancelled (their rows say
            # the cost is estimated), so every one is recorded before the ledger closes.
            await asyncio.wait(set(self.left_behind), timeout=max(self.ledger_close_bound(), 0.1))
            for t in list(self.left_behind):
                t.cancel()
            if self.left_behind:
                await asyncio.wait(set(self.left_behind), timeout=1.0)
        if self.upstreams is not None:
            await self.upstreams.aclose()
        if self.ledger is not None:
            await asyncio.to_thread(self.ledger.close, self.ledger_close_bound())

    async def upstream_health(self) -> UpstreamHealth:
        """Whether each task's small model answers now (one short probe per distinct server) and whether
        its frontier model could be asked (litellm loaded, its key's environment variable set)."""
        config = self.config
        urls = {t.slm_base_url: t for t in config.task}
        probes = await asyncio.gather(*(probe_slm(self.upstreams, t) for t in urls.values()))
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

    # -- routing --------------------------------------------------------------------------------
    async def handle(self, call: Call) -> Response:
        """Route one checked request; the proxy never dies on a request, and every request gets its row."""
        try:
            return await self._route(call)
        except asyncio.CancelledError as exc:
            gone = bool(exc.args and exc.args[0] == CLIENT_GONE)
            if call.frontier_asked is not None:
                # The frontier was asked and had not answered: its row says so (route frontier, its cost).
                self._frontier_cut_off(call, gone)
                raise
            if gone:
                # The client left while its answer was being made (app.py watches): the small model's stream
                # and any frontier call were closed as this unwound; the row says why nothing was sent.
                self.record(self.row(call, Route.NONE, False, Reason.CLIENT_DISCONNECTED, 499,
                                     error="the client disconnected before its answer began"))
                raise
            # The proxy is stopping and this request outlived the grace period: it still gets its row.
            self.record(self.row(call, Route.NONE, False, Reason.SHUTDOWN, 503,
                                 error="the proxy stopped before this request was answered"))
            raise
        except Exception as exc:
            what = _one_line(f"{type(exc).__name__}: {exc}")[:300]
            self.record(self.row(call, Route.NONE, False, Reason.INTERNAL_ERROR, 500, error=what))
            return openai_error(500, f"fleetdeck proxy error: {what}", "server_error")

    async def _route(self, call: Call) -> Response:
        try:
            if call.force != Force.ALWAYS:
                assert self.upstreams is not None
                ask = stream_slm if call.stream else ask_slm
                call.slm = await ask(self.upstreams, call.task, call.body, call.size)
            decision = call.decision = decide(call.task, call.slm, call.force)
            if decision.route == Route.FRONTIER:
                return await (self._stream_frontier(call, decision) if call.stream else self._answer_frontier(call, decision))
            return self._answer(call, decision)
        finally:
            # A streamed SLM answer that no relay took (escalated, failed, cancelled) is closed here.
            if call.slm.stream is not None and not call.slm.stream.claimed:
                await call.slm.stream.aclose()

    def _answer(self, call: Call, decision: Decision) -> Response:
        """A decision that needs no frontier: the small model's answer, or the failure."""
        if decision.failure is not None:
            return self._fail(call, decision, decision.failure)
        return self._answer_slm(call, decision)

    def _answer_slm(self, call: Call, d: Decision) -> Response:
        price = self.price_of(call)
        headers = self.headers(call, Route.SLM, d.escalated)
        if call.slm.stream is not None:
            call.slm.stream.claimed = True  # the relay closes it, once the response has been sent
            row = self.row(call, Route.SLM, d.escalated, d.reason, 200, forced=d.forced, error=d.error)
            return StreamingResponse(relay_slm(call, call.slm.stream, row, price, self.record),
                                     media_type="text/event-stream", headers=headers)
        answer = call.slm.answer
        assert answer is not None
        if not call.body.get("logprobs"):
            for choice in answer.get("choices", []):
                if isinstance(choice, dict):
                    choice.pop("logprobs", None)
        usage = clean_usage(answer.get("usage"))
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
        row = self.row(call, Route.SLM, d.escalated, d.reason, 200, forced=d.forced, error=d.error,
                       prompt_tokens=pt, completion_tokens=ct, all_frontier_cost_usd=price.cost(pt or 0, ct or 0),
                       completion_text=_answer_text(answer))
        if call.stream:
            return StreamingResponse(sse_from_answer(call, answer, row, self.record), media_type="text/event-stream",
                                     headers=headers)
        response = JSONResponse(answer, headers=headers)  # rendered first: a row is recorded once, for what is sent
        self.record(row)
        return response

    def _frontier_failed(self, call: Call, d: Decision, exc: FrontierFailed) -> Response:
        return self._answer(call, after_frontier_failure(call.task, call.slm, d.reason, exc.error, exc.summary, exc.status))

    async def _answer_frontier(self, call: Call, d: Decision) -> Response:
        t = call.frontier_asked = time.perf_counter()
        call.frontier_call = asyncio.ensure_future(
            ask_frontier(self.litellm, call.task, call.body, self.config.proxy.frontier_timeout_s))
        try:
            answer = await asyncio.shield(call.frontier_call)
        except FrontierFailed as exc:
            call.frontier_asked = None
            return self._frontier_failed(call, d, exc)
        call.frontier_asked = None
        response = JSONResponse(answer, headers=self.headers(call, Route.FRONTIER, True))
        self.record(self._frontier_row(call, d, answer, t, 200))
        return response

    def _frontier_row(self, call: Call, d: Decision, answer: dict[str, Any], asked: float, status: int,
                      **kw: Any) -> LedgerRow:
        """The row of a whole frontier answer: its tokens and cost as the frontier's usage says."""
        usage = clean_usage(answer.get("usage"))
        pt, ct = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
        cost = self.price_of(call).cost(pt, ct)
        return self.row(call, Route.FRONTIER, True, d.reason, status, forced=d.forced, prompt_tokens=pt,
                        completion_tokens=ct, frontier_prompt_tokens=pt, frontier_completion_tokens=ct,
                        frontier_latency_ms=(time.perf_counter() - asked) * 1000, cost_usd=cost,
                        all_frontier_cost_usd=cost, completion_text=_answer_text(answer), **kw)

    def _estimated_row(self, call: Call, d: Decision, asked: float, status: int, reason: Reason, error: str) -> LedgerRow:
        """The row of a frontier call whose usage never came: the prompt's cost, estimated and marked so."""
        slm_usage = clean_usage((call.slm.answer or {}).get("usage")) or (call.slm.stream.usage if call.slm.stream else {})
        pt = estimated_prompt_tokens(call.body.get("messages"), slm_usage)
        cost = self.price_of(call).cost(pt, 0)
        return self.row(call, Route.FRONTIER, True, reason, status, forced=d.forced, prompt_tokens=pt,
                        frontier_latency_ms=(time.perf_counter() - asked) * 1000, cost_usd=cost,
                        all_frontier_cost_usd=cost, cost_estimated=True, error=error)

    def _frontier_cut_off(self, call: Call, gone: bool) -> None:
        """The request was cancelled while the frontier was being asked: the client left (`gone`) or the proxy
        is stopping. A whole answer's call goes on without the client, its row made when it ends (the cost
        as billed); a stream's opening was closed with the request, so its row is made now, its cost estimated
        from the prompt."""
        d, asked, pending = call.decision, call.frontier_asked, call.frontier_call
        assert d is not None and asked is not None
        call.frontier_asked = None
        room = len(self.left_behind) < MAX_LEFT_BEHIND
        if pending is not None and ((gone and room) or (pending.done() and not pending.cancelled())):
            # Gone: it goes on. Stopping, with the answer already in: its usage is there to record.
            waiter = asyncio.get_running_loop().create_task(
                self._after_client_left(call, d, asked, pending, 499 if gone else 503))
            self.left_behind.add(waiter)
            waiter.add_done_callback(self.left_behind.discard)
            return
        if pending is not None:
            pending.cancel()
        if gone:
            self.record(self._estimated_row(call, d, asked, 499, d.reason, (
                "the client disconnected while the frontier's stream was opening; it was closed, and its cost is "
                "estimated from the prompt")))
        else:
            self.record(self._estimated_row(call, d, asked, 503, Reason.SHUTDOWN, (
                "the proxy stopped before the frontier answered; its cost is estimated from the prompt")))

    async def _after_client_left(self, call: Call, d: Decision, asked: float, pending: asyncio.Task[dict[str, Any]],
                                 status: int = 499) -> None:
        """A whole frontier answer whose client left: the frontier generates (and bills) it anyway, so it is
        waited for (within frontier_timeout_s, or the proxy's stop) and the row keeps what it cost."""
        left = ("the client disconnected while the frontier was answering" if status == 499 else
                "the proxy stopped while the frontier was answering")
        try:
            answer = await pending
        except FrontierFailed as exc:
            self.record(self._estimated_row(call, d, asked, status, d.reason, (
                f"{left}; the frontier then failed ({exc.error if call.task.store_text else exc.summary}); its "
                "cost is estimated from the prompt")))
        except asyncio.CancelledError:
            pending.cancel()
            self.record(self._estimated_row(call, d, asked, status, d.reason, (
                f"{left}; the proxy stopped before its answer came; its cost is estimated from the prompt")))
            raise
        except Exception as exc:  # nothing above foresaw it: the row still says what is known
            self.record(self._estimated_row(call, d, asked, status, d.reason, (
                f"{left}; then {type(exc).__name__}; its cost is estimated from the prompt")))
        else:
            self.record(self._frontier_row(call, d, answer, asked, status, error=(
                f"{left}; the answer came after it left (not sent; its cost as the frontier's usage says)")))

    async def _stream_frontier(self, call: Call, d: Decision) -> Response:
        call.frontier_asked = time.perf_counter()
        try:
            stream = await open_frontier_stream(self.litellm, call.task, call.body, self.config.proxy.frontier_timeout_s)
        except FrontierFailed as exc:
            call.frontier_asked = None
            return self._frontier_failed(call, d, exc)
        call.frontier_asked = None  # from here the relay records the row, whatever happens
        row = self.row(call, Route.FRONTIER, True, d.reason, 200, forced=d.forced)
        return StreamingResponse(relay_frontier(call, stream, row, self.price_of(call), self.record),
                                 media_type="text/event-stream", headers=self.headers(call, Route.FRONTIER, True))

    # -- ledger ---------------------------------------------------------------------------------
    def _fail(self, call: Call, d: Decision, failure: Failure) -> Response:
        self.record(self.row(call, Route.NONE, d.escalated, d.reason, failure.status, forced=d.forced, error=failure.stored))
        return openai_error(failure.status, failure.message, failure.type, failure.code,
                            headers=self.headers(call, Route.NONE, d.escalated))

    def row(self, call: Call, route: Route, escalated: bool, reason: Reason, status: int, **kw: Any) -> LedgerRow:
        task = call.task
        slm = call.slm
        usage = clean_usage((slm.answer or {}).get("usage"))
        store_text = task.store_text
        completion_text = kw.pop("completion_text", None)
        return LedgerRow(
            id=call.rid, ts=time.time(), task=task.name, route=route, escalated=escalated, reason=reason,
            status=status, confidence=slm.confidence, slm_model=task.slm_model,
            frontier_model=task.frontier_model if route == Route.FRONTIER or escalated else None,
            slm_prompt_tokens=usage.get("prompt_tokens"), slm_completion_tokens=usage.get("completion_tokens"),
            slm_latency_ms=slm.latency_ms, latency_ms=(time.perf_counter() - call.t0) * 1000, stream=call.stream,
            slm_ttft_ms=slm.ttft_ms, decision_window=slm.window, slm_bound=slm.bound,
            prompt_text=json.dumps(call.body["messages"]) if store_text else None,
            completion_text=completion_text if store_text else None,
            **kw,
        )

    def record(self, row: LedgerRow) -> None:
        self.metrics.observe(row)
        if self.ledger is not None:
            self.ledger.put(row)

    def headers(self, call: Call, route: Route, escalated: bool) -> dict[str, str]:
        conf = call.slm.confidence
        return {
            "x-fleetdeck-route": route,
            "x-fleetdeck-confidence": "" if conf is None else f"{conf:.4f}",
            "x-fleetdeck-escalated": "true" if escalated else "false",
            "x-fleetdeck-request-id": call.rid,
        }

    def price_of(self, call: Call) -> Price:
        """The frontier price of the task the request started with: a reload that changed or removed the task
        meanwhile (this proxy's prices are the new config's) changes nothing for it. Before, a reload that removed
        the task while its streamed frontier request opened made a 500."""
        if self.config.task_by_name(call.task.name) is call.task:
            return self.prices.get(call.task.name, UNKNOWN_PRICE)
        return frontier_price(call.task, self.litellm)

    def task_for(self, name: object) -> Task | None:
        return self.config.task_by_name(name) if isinstance(name, str) and name else None


def _check_config_file(path: Path) -> None:
    """A reload reads a regular file of a config's size, or refuses: reading a FIFO or /dev/zero would hang the
    reload or fill memory until the kernel kills the proxy."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: not a regular file; name the router config's TOML file")
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {st.st_size} bytes, over the {MAX_CONFIG_BYTES}-byte limit for a router config")


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def _answer_text(answer: dict[str, Any]) -> str | None:
    try:
        text = answer["choices"][0]["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    return text if isinstance(text, str) else None
