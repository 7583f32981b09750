"""The streamed answers the client is sent (OpenAI's server-sent events), each finishing its ledger row.

Three sources: the small model's held window and then the rest of its stream (`relay_slm`), a whole answer
sent as chunks (`sse_from_answer`), and the frontier's stream (`relay_frontier`). The 200 and the first
chunks go out before the stream ends, so a cut mid-stream ends it with an error event in OpenAI's shape that
says what the row says; the row is recorded once, when the stream ends however it ends.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Callable

from engine.router.call import Call
from engine.router.frontier_client import FrontierStream, StreamCut, error_kind, short_error
from engine.router.pricing import Price, estimated_prompt_tokens
from engine.router.slm_stream import BOUND_REASON, SlmCut, SlmStream, SlmStreamError, clean_usage
from store.ledger_row import LedgerRow

Record = Callable[[LedgerRow], None]
DONE = b"data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _error_event(message: str) -> bytes:
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": "upstream_error"}})


def _client_left(row: LedgerRow, sent: int) -> None:
    """The stream was stopped before its end: Starlette cancels it when the client disconnects (a stop of
    the proxy past its grace too, which the row cannot tell apart). The row says the client did not get
    the whole answer; its route and reason stay what was decided."""
    row.status = 499
    row.error = f"the client disconnected mid-stream, after {sent} event(s) were sent"


def _wants_usage(call: Call) -> bool:
    return bool((call.body.get("stream_options") or {}).get("include_usage"))


async def relay_slm(call: Call, stream: SlmStream, row: LedgerRow, price: Price, record: Record) -> AsyncIterator[bytes]:
    """The held window, then the rest of the small model's stream as it comes; closes the stream at the end."""
    wants_logprobs = bool(call.body.get("logprobs"))
    wants_usage = _wants_usage(call)
    sent = 0
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
            sent += 1
            yield sse(chunk)
        sent = -1
        yield DONE
    except (asyncio.CancelledError, GeneratorExit):
        if sent >= 0:
            _client_left(row, sent)
        raise
    except (SlmCut, SlmStreamError) as exc:
        if isinstance(exc, SlmCut):
            row.slm_bound = exc.bound
            row.reason = BOUND_REASON[exc.bound]
        row.status = 502
        row.error = f"small model stream cut: {exc}"
        yield _error_event(row.error)
    except Exception as exc:  # a chunk nothing above foresaw: the client is told, as for a cut, not left hanging
        row.status = 502
        row.error = f"small model stream cut: {type(exc).__name__}"
        yield _error_event(row.error)
    finally:
        usage = stream.usage
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
        row.slm_prompt_tokens, row.slm_completion_tokens = pt, ct
        row.prompt_tokens, row.completion_tokens = pt, ct
        row.all_frontier_cost_usd = price.cost(pt or 0, ct or 0)
        row.slm_ttft_ms = stream.ttft_ms
        if call.task.store_text:
            row.completion_text = "".join(stream.text)
        row.slm_latency_ms = stream.elapsed_ms()
        row.latency_ms = (time.perf_counter() - call.t0) * 1000
        record(row)
        await stream.aclose()


async def sse_from_answer(call: Call, answer: dict[str, Any], row: LedgerRow, record: Record) -> AsyncIterator[bytes]:
    """A whole answer, sent as OpenAI's stream of chunks."""
    base = {"id": answer.get("id", f"chatcmpl-{call.rid}"), "object": "chat.completion.chunk",
            "created": answer.get("created", int(time.time())), "model": answer.get("model", call.task.name)}
    sent = 0
    try:
        for i, choice in enumerate(answer.get("choices", [])):
            msg = choice.get("message") or {}
            delta: dict[str, Any] = {"role": "assistant", "content": msg.get("content") or ""}
            if msg.get("tool_calls"):
                delta["tool_calls"] = msg["tool_calls"]
            first = {**base, "choices": [{"index": choice.get("index", i), "delta": delta, "finish_reason": None}]}
            if call.body.get("logprobs") and choice.get("logprobs"):
                first["choices"][0]["logprobs"] = choice["logprobs"]
            sent += 1
            yield sse(first)
            sent += 1
            yield sse({**base, "choices": [{"index": choice.get("index", i), "delta": {},
                                            "finish_reason": choice.get("finish_reason", "stop")}]})
        if _wants_usage(call) and answer.get("usage"):
            sent += 1
            yield sse({**base, "choices": [], "usage": answer["usage"]})
        sent = -1
        yield DONE
    except (asyncio.CancelledError, GeneratorExit):
        if sent >= 0:
            _client_left(row, sent)
        raise
    finally:
        row.latency_ms = (time.perf_counter() - call.t0) * 1000
        record(row)


async def relay_frontier(call: Call, stream: FrontierStream, row: LedgerRow, price: Price,
                         record: Record) -> AsyncIterator[bytes]:
    """The frontier's chunks as they come, under the stream's one bound; closes the stream at the end."""
    client_wants_usage = _wants_usage(call)
    parts: list[str] = []
    usage: dict[str, Any] = {}
    sent = 0
    try:
        chunk = stream.first
        while chunk is not None:
            data: dict[str, Any] | None = chunk.model_dump(exclude_none=True) if hasattr(chunk, "model_dump") else dict(chunk)
            if data is not None and data.get("usage"):
                usage = clean_usage(data["usage"])
                if not client_wants_usage:
                    data.pop("usage")
                    if not data.get("choices"):
                        data = None
            if data is not None:
                for ch in data.get("choices") or []:
                    piece = (ch.get("delta") or {}).get("content")
                    if piece:
                        parts.append(piece)
                sent += 1
                yield sse(data)
            chunk = await stream.next_chunk()
        sent = -1
        yield DONE
    except (asyncio.CancelledError, GeneratorExit):
        if sent >= 0:
            _client_left(row, sent)
        raise
    except Exception as exc:
        told = str(exc) if isinstance(exc, StreamCut) else short_error(exc)
        kept = told if isinstance(exc, StreamCut) or call.task.store_text else error_kind(exc)
        row.error = f"frontier stream cut: {kept}"
        row.status = 502
        yield _error_event(f"frontier stream cut: {told}")
    finally:
        if usage:
            pt, ct = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
            row.frontier_prompt_tokens, row.frontier_completion_tokens = pt, ct
        else:
            # No usage came (the client left or the stream was cut before its last chunk, or the frontier sent
            # none): the frontier still bills what it was sent and wrote, so the cost is estimated (a chunk of
            # text is about a token) and the row says so.
            slm_usage = clean_usage((call.slm.answer or {}).get("usage"))
            pt, ct = estimated_prompt_tokens(call.body.get("messages"), slm_usage), len(parts)
            row.cost_estimated = True
            if row.status != 502:  # a cut's row keeps the very words its error event said (cost_estimated marks it)
                note = "no usage came back from the frontier: its cost is estimated from the prompt and the chunks sent"
                row.error = f"{row.error}; {note}" if row.error else note
        row.prompt_tokens, row.completion_tokens = pt, ct
        row.frontier_latency_ms = (time.perf_counter() - stream.started) * 1000
        row.cost_usd = row.all_frontier_cost_usd = price.cost(pt, ct)
        if call.task.store_text:
            row.completion_text = "".join(parts)
        row.latency_ms = (time.perf_counter() - call.t0) * 1000
        record(row)
        await stream.aclose()
