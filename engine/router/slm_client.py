"""Asking the small model: one streamed request under the task's two bounds, read whole (a client that wants
one JSON answer) or up to the decision window (a streaming client); and the /health probe of its server.

Each call ends in an SlmOutcome, what `decide` reads: an answer (or a stream held open) with its confidence,
or the failure's Reason, in fleetdeck's words, with the upstream's own text kept apart for the client.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import httpx

from engine.io.http_auth import bearer_from_env
from engine.router.confidence import answer_confidence, confidence, slm_request
from engine.router.config import Task
from engine.router.decide import CLIENT_ERRORS
from engine.router.request_check import json_depth_over
from engine.router.slm_stream import (BOUND_REASON, SlmCut, SlmStream, SlmStreamError, assemble_completion, clean_usage,
                                      lone_surrogate)
from engine.router.upstream_pool import UpstreamClients
from store.ledger_row import Reason

# Parameters passed through to the models, as checked by request_check (never as the client sent them);
# anything else in the body is dropped.
PASS_THROUGH = {
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "n", "presence_penalty",
    "frequency_penalty", "seed", "tools", "tool_choice", "response_format", "user", "logit_bias",
}


def passed_through(body: dict[str, Any]) -> dict[str, Any]:
    """The client's model parameters (from the checked request); a null is the parameter not given."""
    return {k: v for k, v in body.items() if k in PASS_THROUGH and v is not None}


@dataclass
class SlmOutcome:
    answer: dict[str, Any] | None = None
    confidence: float | None = None
    error_reason: Reason | None = None  # a bound's timeout | slm_error | no_logprobs | client_error
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


def upstream_message(resp: httpx.Response) -> str:
    """The upstream's own error text (OpenAI's shape or a bare message), at most 300 characters."""
    text: Any = None
    try:
        data = resp.json()
        err = data.get("error") if isinstance(data, dict) else None
        text = err.get("message") if isinstance(err, dict) else (data.get("message") if isinstance(data, dict) else None)
    except ValueError:
        pass
    if not isinstance(text, str):
        text = resp.text
    # One line (an HTML error page, a traceback): it becomes part of the client's one-line error message.
    return " ".join(text[:2000].split())[:300]


def open_slm(upstreams: UpstreamClients, task: Task, body: dict[str, Any], size: int = 0) -> SlmStream:
    """The small model's request, streamed whatever the client asked: both bounds watch it."""
    payload = slm_request(task, body["messages"], passed_through(body), int(body.get("top_logprobs") or 0))
    # Usage always: the ledger's token counts; a streaming client gets the usage chunk only if it asked.
    payload.update(stream=True, stream_options={"include_usage": True})
    return SlmStream(upstreams.for_url(task.slm_base_url), f"{task.slm_base_url}/chat/completions", payload,
                     bearer_from_env(task.slm_api_key_env), task.slm_first_token_timeout_s, task.slm_total_timeout_s,
                     size)


Failed = Callable[..., SlmOutcome]


async def _read(stream: SlmStream, read: Callable[[], Awaitable[None]], failed: Failed) -> SlmOutcome | None:
    """Open the stream and `read` it; None when that went well, else the failure's outcome (the stream
    closed). The same failures, and the same reasons, for a streamed and a whole answer."""
    try:
        resp = await stream.open()
        if resp.status_code != 200:
            await resp.aread()
            await stream.aclose()
            reason = Reason.CLIENT_ERROR if resp.status_code in CLIENT_ERRORS else Reason.SLM_ERROR
            return failed(reason, f"HTTP {resp.status_code}", detail=upstream_message(resp),
                          status=resp.status_code if reason == Reason.CLIENT_ERROR else None)
        await read()
    except SlmCut as exc:
        await stream.aclose()
        return failed(BOUND_REASON[exc.bound], str(exc), bound=exc.bound)
    except SlmStreamError as exc:
        await stream.aclose()
        return failed(Reason.SLM_ERROR, str(exc))
    except httpx.HTTPError as exc:
        await stream.aclose()
        return failed(Reason.SLM_ERROR, f"{type(exc).__name__}: {exc}")
    except BaseException:
        await stream.aclose()
        raise
    return None


async def ask_slm(upstreams: UpstreamClients, task: Task, body: dict[str, Any], size: int = 0) -> SlmOutcome:
    """A client that wants one JSON answer: the small model is still asked for a stream, so an SLM that
    has not started is cut at slm_first_token_timeout_s (not after the whole slm_total_timeout_s);
    the whole stream is read and assembled into the chat.completion the client gets. A server that
    ignored `stream` and sent one JSON body is read as before. `size`: the client's body in bytes."""
    stream = open_slm(upstreams, task, body, size)
    t = time.perf_counter()
    whole: list[bytes] = []

    def failed(reason: Reason, error: str, **kw: Any) -> SlmOutcome:
        return SlmOutcome(error_reason=reason, error=error, ttft_ms=stream.ttft_ms,
                          latency_ms=(time.perf_counter() - t) * 1000, **kw)

    async def read() -> None:
        if stream.sends_json:
            whole.append(await stream.read_body())
        else:
            await stream.read_all()

    if (outcome := await _read(stream, read, failed)) is not None:
        return outcome
    await stream.aclose()  # read to its end (or whole): the connection goes back to the pool
    latency = (time.perf_counter() - t) * 1000
    try:
        if whole:
            # The same depth bound as a client's body: the answer is encoded again for the client.
            text = whole[0].decode("utf-8", "replace")
            if json_depth_over(text):
                raise ValueError("nested too deeply")
            answer = json.loads(text)
            if lone_surrogate(text, answer):
                raise ValueError("text that is not valid Unicode")  # it could be sent to no client, stored nowhere
            if isinstance(answer, dict) and "usage" in answer:
                answer["usage"] = clean_usage(answer["usage"])
        else:
            answer = assemble_completion(stream.held, stream.usage, stream.missing_logprobs)
        _, conf = answer_confidence(task, answer)
    except ValueError:
        return failed(Reason.SLM_ERROR, "the small model's answer is not a chat completion")
    if conf is None:
        return SlmOutcome(answer=answer, error_reason=Reason.NO_LOGPROBS, error="no token log-probabilities in the answer",
                          latency_ms=latency, ttft_ms=stream.ttft_ms)
    return SlmOutcome(answer=answer, confidence=conf, latency_ms=latency, ttft_ms=stream.ttft_ms)


async def stream_slm(upstreams: UpstreamClients, task: Task, body: dict[str, Any], size: int = 0) -> SlmOutcome:
    """Ask the small model for a streamed answer and read it up to the task's decision window; the outcome
    holds the stream open for the relay (engine/router/relay.py) or for the Router to close."""
    stream = open_slm(upstreams, task, body, size)
    window = task.window_label()
    t = time.perf_counter()

    def failed(reason: Reason, error: str, **kw: Any) -> SlmOutcome:
        return SlmOutcome(error_reason=reason, error=error, window=window, ttft_ms=stream.ttft_ms,
                          latency_ms=(time.perf_counter() - t) * 1000, **kw)

    if (outcome := await _read(stream, lambda: stream.fill_window(task.window_tokens()), failed)) is not None:
        return outcome
    n = task.window_tokens()
    lps = stream.logprobs if n is None else stream.logprobs[:n]
    outcome = SlmOutcome(stream=stream, window=window, ttft_ms=stream.ttft_ms, latency_ms=(time.perf_counter() - t) * 1000)
    if stream.missing_logprobs or not lps:
        outcome.error_reason, outcome.error = Reason.NO_LOGPROBS, "no token log-probabilities in the answer"
    else:
        outcome.confidence = confidence(task.confidence, lps)
    return outcome


async def probe_slm(upstreams: UpstreamClients | None, task: Task) -> str | None:
    """None when the small model's server answers HTTP below 500; otherwise what went wrong."""
    if upstreams is None:
        return "the proxy is not started"
    timeout = min(task.slm_first_token_timeout_s, 2.0)
    try:
        resp = await asyncio.wait_for(
            upstreams.for_url(task.slm_base_url).get(
                f"{task.slm_base_url}/models", headers=bearer_from_env(task.slm_api_key_env), timeout=timeout),
            timeout=timeout)
    except (httpx.HTTPError, asyncio.TimeoutError) as exc:
        return "no answer" if isinstance(exc, (asyncio.TimeoutError, httpx.TimeoutException)) else type(exc).__name__
    return f"HTTP {resp.status_code}" if resp.status_code >= 500 else None
