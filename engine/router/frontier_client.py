"""Asking the frontier model through litellm: one attempt, bounded by `[proxy] frontier_timeout_s`, whole or
streamed. A failure is a FrontierFailed carrying the error twice: in full for the client, and as its kind
only (no upstream text, which can quote the prompt) for a ledger that does not store text.

litellm itself is imported once at startup (engine/router/pricing.py's import_litellm) and handed in here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from engine.router.config import Task
from engine.router.slm_client import passed_through

log = logging.getLogger("fleetdeck.proxy")


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}"


def error_kind(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    return f"{type(exc).__name__}" + (f" (HTTP {status})" if isinstance(status, int) else "")


class FrontierFailed(Exception):
    """The frontier gave no answer: `error` for the client, `summary` for the ledger, its HTTP `status` if any."""

    def __init__(self, error: str, summary: str, status: int | None = None) -> None:
        super().__init__(error)
        self.error, self.summary, self.status = error, summary, status

    @classmethod
    def said(cls, text: str) -> FrontierFailed:
        """A failure in fleetdeck's own words (no upstream text): the same for the client and the ledger."""
        return cls(text, text)

    @classmethod
    def of(cls, exc: BaseException) -> FrontierFailed:
        status = getattr(exc, "status_code", None)
        return cls(short_error(exc), error_kind(exc), status if isinstance(status, int) else None)


class StreamCut(Exception):
    """A frontier stream that outlived its bound; the message is the ledger's and the client's."""


def frontier_kwargs(task: Task, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = passed_through(body)
    # One attempt: litellm's own retries would multiply the timeout the operator set.
    kwargs.update(model=task.frontier_model, messages=body["messages"], timeout=timeout_s, num_retries=0, max_retries=0)
    if body.get("logprobs"):
        kwargs["logprobs"] = True
        if body.get("top_logprobs"):
            kwargs["top_logprobs"] = body["top_logprobs"]
    if task.frontier_api_base:
        kwargs["api_base"] = task.frontier_api_base
    if task.frontier_api_key_env:
        kwargs["api_key"] = os.environ.get(task.frontier_api_key_env, "")
    return kwargs


async def ask_frontier(litellm: Any, task: Task, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """The frontier's whole chat.completion, as a dict; FrontierFailed when there is none within timeout_s."""
    if litellm is None:
        raise FrontierFailed.said("litellm is not loaded")
    try:
        resp = await asyncio.wait_for(litellm.acompletion(**frontier_kwargs(task, body, timeout_s)), timeout=timeout_s)
    except asyncio.TimeoutError:
        raise FrontierFailed.said(f"no answer within {timeout_s:g} s") from None
    except Exception as exc:
        raise FrontierFailed.of(exc) from exc
    return resp.model_dump() if hasattr(resp, "model_dump") else dict(resp)


@dataclass
class FrontierStream:
    """An open frontier stream whose first chunk has come (`first`; None and no iterator for an empty
    stream). One bound for the whole stream, opening included: a frontier that sends a chunk and then only
    keep-alive comments (which litellm reads past, so no read ever times out) is cut at `deadline` too."""

    iterator: Any
    first: Any
    deadline: float  # on the loop's clock
    limit_s: float
    started: float  # time.perf_counter() when it was asked for: the ledger's frontier latency

    async def next_chunk(self) -> Any:
        """The next chunk, None at the end; StreamCut past the deadline."""
        if self.iterator is None:
            return None
        remaining = self.deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(self.iterator.__anext__(), timeout=max(remaining, 0.0))
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            raise StreamCut(f"the stream did not end within frontier_timeout_s = {self.limit_s:g} s") from None

    async def aclose(self) -> None:
        # A stream cut mid-read still holds its upstream connection until it is closed.
        close = getattr(self.iterator, "aclose", None)
        if close is None:
            return
        try:
            await asyncio.wait_for(close(), timeout=5)
        except Exception:  # closing is best effort; the ledger row is what matters here
            log.debug("closing a frontier stream failed", exc_info=True)


async def open_frontier_stream(litellm: Any, task: Task, body: dict[str, Any], limit_s: float) -> FrontierStream:
    """The frontier's stream, opened and its first chunk read, so a failure fails over before the client has
    been sent a byte; FrontierFailed when that does not happen within limit_s."""
    if litellm is None:
        raise FrontierFailed.said("litellm is not loaded")
    started = time.perf_counter()
    deadline = asyncio.get_running_loop().time() + limit_s
    kwargs = frontier_kwargs(task, body, limit_s)
    kwargs.update(stream=True, stream_options={"include_usage": True})

    async def open_stream() -> tuple[Any, Any]:
        stream = await litellm.acompletion(**kwargs)
        iterator = stream.__aiter__()
        try:
            return iterator, await iterator.__anext__()
        except StopAsyncIteration:
            return None, None

    try:
        iterator, first = await asyncio.wait_for(open_stream(), timeout=limit_s)
    except asyncio.TimeoutError:
        raise FrontierFailed.said(f"no first chunk within {limit_s:g} s") from None
    except Exception as exc:
        raise FrontierFailed.of(exc) from exc
    return FrontierStream(iterator, first, deadline, limit_s, started)
