"""The small model's streamed answer, read under its two bounds (issue 28).

The proxy asks the SLM with `stream: true` and log-probabilities, reads chunks until the task's decision
window is full (see Task.window_tokens), and holds them: nothing is sent to the client before the decision.
After a confident decision the held chunks and then the rest of the stream are relayed as they come.

Bounds: `slm_first_token_timeout_s` for the first token, `slm_total_timeout_s` for the whole answer; both
clocks start when the request is handed to the HTTP client, so time a request spent waiting inside
fleetdeck before that does not count against the model. A bound that fires raises SlmCut naming it.

A client that did not ask for a stream is served the same way upstream (so the first-token bound guards it
too): `read_all()` reads the whole stream and `assemble_completion()` makes the one chat.completion from
the chunks `_next()` parsed. A server that ignores `stream` and answers JSON is read whole (`sends_json`).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import httpx

from engine.router.request_check import json_depth_over
from store.ledger_row import Reason

FIRST_TOKEN = "first_token"
TOTAL = "total"
# The ledger's reason for each bound, when it decides the route.
BOUND_REASON = {FIRST_TOKEN: Reason.SLM_FIRST_TOKEN_TIMEOUT, TOTAL: Reason.SLM_TOTAL_TIMEOUT}
BOUND_KEY = {FIRST_TOKEN: "slm_first_token_timeout_s", TOTAL: "slm_total_timeout_s"}
# After `data: [DONE]`, how long the end of the HTTP body may take before the connection is dropped instead.
DRAIN_S = 1.0
# A JSON escape of a UTF-16 surrogate: only text holding one can decode to a lone surrogate (checked then).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_USAGE_MAX = 2**53  # token counts past this are not counts (and a float would lose them)
# A request body past this many bytes is parsed (engine/router/app.py) and encoded for the small model in a
# thread: 5 MB of messages take ~60 ms to encode, which on the event loop would stall every stream.
OFF_LOOP_BYTES = 64 * 1024


def encode_payload(payload: dict[str, Any]) -> bytes:
    """The request body, as httpx's `json=` would encode it."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def clean_usage(usage: Any) -> dict[str, Any]:
    """An upstream's `usage`, with only what the ledger and the cost can take: each count a non-negative
    int, others dropped (a string or a list there once failed the request's pricing and every later ledger
    write). Nested details (prompt_tokens_details...) are kept as they came, for the client."""
    if not isinstance(usage, dict):
        return {}
    out: dict[str, Any] = {}
    for key, value in usage.items():
        if key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _USAGE_MAX:
                out[key] = value
        else:
            out[key] = value
    return out


def lone_surrogate(text: str, value: Any) -> bool:
    """Whether JSON `text`, parsed as `value`, holds a lone surrogate (\\ud800): text that cannot be encoded
    for the client or the ledger. Parsed only when the text has such an escape."""
    if _SURROGATE_ESCAPE.search(text) is None:
        return False
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def chunk_problem(chunk: dict[str, Any]) -> str | None:
    """What makes a parsed chunk no OpenAI chat-completion chunk a client can read, or None. The SDKs index
    `chunk.choices[i].delta.content` without looking: a chunk whose `choices` is not a list of objects, a
    `delta` that is not an object, content that is not text, would crash the client's loop or be read as
    garbage. Checked on every chunk (a few isinstance calls), before the decision and after it; a chunk that
    fails is a broken small-model stream (SlmStreamError), never relayed. The choice's other fields are not
    judged: servers differ there (vLLM's finish reasons, extra keys) and clients read them as given."""
    choices = chunk.get("choices")
    if choices is None:
        # A usage-only chunk may leave `choices` out (OpenAI sends `[]`); any other chunk without it is not one.
        return None if isinstance(chunk.get("usage"), dict) else "no `choices`"
    if not isinstance(choices, list):
        return "`choices` is not a list"
    for choice in choices:
        if not isinstance(choice, dict):
            return "a choice is not an object"
        index = choice.get("index", 0)
        if not isinstance(index, int) or isinstance(index, bool):
            return "a choice's `index` is not an integer"
        delta = choice.get("delta")
        if not isinstance(delta, dict):  # missing or null too: the SDKs read `choice.delta.content` regardless
            return "a choice's `delta` is not an object"
        content = delta.get("content")
        if content is not None and not isinstance(content, str):
            return "a delta's `content` is not text"
        if choice.get("logprobs") is not None and not isinstance(choice.get("logprobs"), dict):
            return "a choice's `logprobs` is not an object"
        tool_calls = delta.get("tool_calls")
        if tool_calls is not None and not (isinstance(tool_calls, list) and all(isinstance(t, dict) for t in tool_calls)):
            return "a delta's `tool_calls` is not a list of objects"
    usage = chunk.get("usage")
    if usage is not None and not isinstance(usage, dict):
        return "`usage` is not an object"
    return None


class SlmCut(Exception):
    """A bound fired: `bound` is first_token or total; the message is the ledger's and the client's."""

    def __init__(self, bound: str, limit_s: float) -> None:
        what = "no first token" if bound == FIRST_TOKEN else "the answer did not end"
        super().__init__(f"{what} within {BOUND_KEY[bound]} = {limit_s:g} s")
        self.bound = bound


class SlmStreamError(Exception):
    """The stream broke or is not an OpenAI chat stream (fleetdeck's words; no upstream text)."""


@dataclass
class SlmStream:
    """One open streamed answer. `open()` then `fill_window()`; then `relay()` or `aclose()`."""

    client: httpx.AsyncClient
    url: str
    payload: dict[str, Any]
    headers: dict[str, str]
    first_token_s: float
    total_s: float
    size: int = 0  # the client's body in bytes: past OFF_LOOP_BYTES the payload is encoded in a thread
    response: httpx.Response | None = None
    held: list[dict[str, Any]] = field(default_factory=list)  # chunks read, not yet sent
    logprobs: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    ttft_ms: float | None = None
    missing_logprobs: bool = False  # a token came without its log-probability
    ended: bool = False
    done: bool = False  # `data: [DONE]` came: the answer is whole (the HTTP body may still have its end to come)
    claimed: bool = False  # a relay owns the stream (and closes it)
    began: bool = False  # a chunk came: the body must then go on to `data: [DONE]`
    _sent_at: float = 0.0
    _lines: AsyncIterator[str] | None = None

    async def open(self) -> httpx.Response:
        """Send the request; the answer's status and headers must come within the first-token bound."""
        loop = asyncio.get_running_loop()
        timeout = httpx.Timeout(self.total_s, connect=self.first_token_s)
        if self.size > OFF_LOOP_BYTES:
            body = await asyncio.to_thread(encode_payload, self.payload)
            request = self.client.build_request("POST", self.url, content=body, timeout=timeout,
                                                headers={**self.headers, "Content-Type": "application/json"})
        else:
            request = self.client.build_request("POST", self.url, json=self.payload, headers=self.headers,
                                                timeout=timeout)
        self._sent_at = loop.time()
        try:
            async with asyncio.timeout_at(self._sent_at + self.first_token_s):
                self.response = await self.client.send(request, stream=True)
        except TimeoutError:
            raise SlmCut(FIRST_TOKEN, self.first_token_s) from None
        if self.response.status_code == 200:
            self._lines = self.response.aiter_lines()
        return self.response

    def _deadline(self) -> tuple[float, str, float]:
        total = self._sent_at + self.total_s
        if self.ttft_ms is None:
            first = self._sent_at + self.first_token_s
            if first <= total:
                return first, FIRST_TOKEN, self.first_token_s
        return total, TOTAL, self.total_s

    async def _next(self) -> dict[str, Any] | None:
        """The next chunk (None at the end), read under whichever bound applies now."""
        assert self._lines is not None
        deadline, bound, limit = self._deadline()
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    try:
                        line = await self._lines.__anext__()
                    except StopAsyncIteration:
                        if self.began:
                            # A body that ends without `data: [DONE]` is an answer cut short, not a whole one.
                            raise SlmStreamError("the small model's stream ended before `data: [DONE]`") from None
                        return None
                    if not line.startswith("data:"):
                        continue  # blank separators and ": keep-alive" comments
                    data = line[5:].strip()
                    if data == "[DONE]":
                        self.done = True
                        return None
                    if json_depth_over(data):
                        raise SlmStreamError("a chunk of the small model's stream is nested too deeply")
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise SlmStreamError("the small model's stream is not an OpenAI chat stream") from None
                    if not isinstance(chunk, dict):
                        raise SlmStreamError("the small model's stream is not an OpenAI chat stream")
                    if lone_surrogate(data, chunk):
                        raise SlmStreamError("the small model's stream holds text that is not valid Unicode "
                                             "(a lone surrogate)")
                    self.began = True
                    if "error" in chunk:
                        raise SlmStreamError("the small model reported an error in its stream")
                    if (problem := chunk_problem(chunk)) is not None:
                        raise SlmStreamError(f"a chunk of the small model's stream is not an OpenAI chat chunk "
                                             f"({problem})")
                    if chunk.get("choices") is None:
                        chunk["choices"] = []  # a usage-only chunk as OpenAI sends it: clients iterate `choices`
                    return chunk
        except TimeoutError:
            raise SlmCut(bound, limit) from None
        except httpx.HTTPError as exc:
            raise SlmStreamError(f"the small model's stream broke ({type(exc).__name__})") from None

    def _take(self, chunk: dict[str, Any], score: bool = True) -> None:
        """Note what a chunk carries: its tokens' log-probabilities (`score`: only until the decision, which
        is all that reads them), its text, the usage."""
        if isinstance(chunk.get("usage"), dict):
            self.usage = clean_usage(chunk["usage"])
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = _dict(choice.get("delta"))
            piece = delta.get("content")
            if not score and self.ttft_ms is not None:
                if isinstance(piece, str) and piece:
                    self.text.append(piece)
                continue
            lp = choice.get("logprobs")
            content = lp.get("content") if isinstance(lp, dict) else None
            items = [item.get("logprob") for item in content if isinstance(item, dict)] if isinstance(content, list) else []
            values = [float(v) for v in items if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)]
            if (piece or values or delta.get("tool_calls")) and self.ttft_ms is None:
                self.ttft_ms = (asyncio.get_running_loop().time() - self._sent_at) * 1000
            if isinstance(piece, str) and piece:
                self.text.append(piece)
                if not values:
                    self.missing_logprobs = True
            self.logprobs.extend(values)

    async def fill_window(self, tokens: int | None) -> None:
        """Read and hold chunks until `tokens` log-probabilities are in (None: the whole answer) or the
        answer ends. Raises SlmCut or SlmStreamError."""
        while not self.ended and (tokens is None or len(self.logprobs) < tokens) and not self.missing_logprobs:
            chunk = await self._next()
            if chunk is None:
                if not self.held:  # a 200 with no chunk at all (a server that ignored `stream`, say)
                    raise SlmStreamError("the small model's answer is not an OpenAI chat stream")
                self.ended = True
                break
            self._take(chunk)
            self.held.append(chunk)

    async def read_all(self) -> None:
        """Read and hold every chunk to the end of the answer (a client that wants one JSON answer), tokens
        without log-probabilities included. Raises SlmCut or SlmStreamError."""
        while True:
            chunk = await self._next()
            if chunk is None:
                if not self.held:  # a 200 with no chunk at all
                    raise SlmStreamError("the small model's answer is not an OpenAI chat stream")
                self.ended = True
                return
            self._take(chunk)
            self.held.append(chunk)

    @property
    def sends_json(self) -> bool:
        """The server answered the streamed request with one JSON body (it ignored `stream`)."""
        kind = self.response.headers.get("content-type", "") if self.response is not None else ""
        return "json" in kind.lower() and "event-stream" not in kind.lower()

    async def read_body(self) -> bytes:
        """The whole body of a JSON answer, under the total bound (its headers came under the first-token
        bound in open())."""
        assert self.response is not None
        try:
            async with asyncio.timeout_at(self._sent_at + self.total_s):
                return await self.response.aread()
        except TimeoutError:
            raise SlmCut(TOTAL, self.total_s) from None
        except httpx.HTTPError as exc:
            raise SlmStreamError(f"the small model's answer broke ({type(exc).__name__})") from None

    async def relay(self) -> AsyncIterator[dict[str, Any]]:
        """The held chunks, then the rest as it comes (under the total bound)."""
        self.claimed = True
        for held in self.held:
            yield held
        self.held = []
        while not self.ended:
            chunk = await self._next()
            if chunk is None:
                self.ended = True
                break
            self._take(chunk, score=False)  # decided: the relay needs the text and usage, not the scores
            yield chunk

    def elapsed_ms(self) -> float:
        """Since the request was sent upstream."""
        return (asyncio.get_running_loop().time() - self._sent_at) * 1000

    async def aclose(self) -> None:
        """Give the connection back: to its pool when the answer was whole, else closed."""
        if self.response is None:
            return
        try:
            if self.done and self._lines is not None:
                # `[DONE]` is read before the end of the HTTP body; a response closed before its body ended is
                # a connection httpcore drops, so every request would open a new one (a TCP handshake and a
                # new connection's setup on both sides, per request: issue 28). Read to the body's end, briefly.
                try:
                    async with asyncio.timeout(DRAIN_S):
                        async for _ in self._lines:
                            pass
                except (TimeoutError, httpx.HTTPError):
                    pass  # the end did not come: the connection is closed below, as for a cut stream
        finally:  # cancelled while reading the end, too
            # An abandoned stream holds its upstream connection (and the SLM keeps generating) until closed.
            try:
                async with asyncio.timeout(5):
                    await self.response.aclose()
            except Exception:  # closing is best effort
                pass


def _dict(value: Any) -> dict[str, Any]:
    """A chunk's field that should be an object: itself when it is one, else empty (an odd chunk is skipped over)."""
    return value if isinstance(value, dict) else {}


def assemble_completion(chunks: list[dict[str, Any]], usage: dict[str, Any], missing_logprobs: bool) -> dict[str, Any]:
    """The one OpenAI chat.completion a whole stream of chunks adds up to: per choice index the content
    joined, tool-call deltas merged by their index, the last finish_reason (None if the stream sent none:
    not made up), the tokens' log-probability items in order; the usage chunk's usage.
    `missing_logprobs` (a token came without one): the first choice gets no logprobs, so its confidence
    is "none", as for a whole answer without them."""
    first = chunks[0] if chunks else {}
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for ch in chunk.get("choices") or []:
            if not isinstance(ch, dict) or not isinstance(ch.get("index", 0), int):
                continue
            acc = choices.setdefault(ch.get("index", 0), {"role": "assistant", "content": [], "tools": {},
                                                          "finish_reason": None, "logprobs": []})
            delta = _dict(ch.get("delta"))
            if isinstance(delta.get("role"), str):
                acc["role"] = delta["role"]
            if isinstance(delta.get("content"), str):
                acc["content"].append(delta["content"])
            for call in delta.get("tool_calls") or []:
                if not isinstance(call, dict):
                    continue
                tool = acc["tools"].setdefault(call.get("index", len(acc["tools"])), {"function": {"arguments": ""}})
                for key in ("id", "type"):
                    if call.get(key) is not None:
                        tool[key] = call[key]
                fn = _dict(call.get("function"))
                if fn.get("name") is not None:
                    tool["function"]["name"] = fn["name"]
                if isinstance(fn.get("arguments"), str):
                    tool["function"]["arguments"] += fn["arguments"]
            if ch.get("finish_reason") is not None:
                acc["finish_reason"] = ch["finish_reason"]
            lp = ch.get("logprobs")
            if isinstance(lp, dict) and isinstance(lp.get("content"), list):
                acc["logprobs"].extend(lp["content"])
    out = []
    for index in sorted(choices):
        acc = choices[index]
        message: dict[str, Any] = {"role": acc["role"], "content": "".join(acc["content"])}
        if acc["tools"]:
            message["tool_calls"] = [acc["tools"][k] for k in sorted(acc["tools"], key=str)]
            if not message["content"]:
                message["content"] = None
        keep = acc["logprobs"] and not (missing_logprobs and index == 0)
        out.append({"index": index, "message": message, "finish_reason": acc["finish_reason"],
                    "logprobs": {"content": acc["logprobs"]} if keep else None})
    answer: dict[str, Any] = {"id": first.get("id"), "object": "chat.completion", "created": first.get("created"),
                              "model": first.get("model"), "choices": out}
    if first.get("system_fingerprint") is not None:
        answer["system_fingerprint"] = first["system_fingerprint"]
    if usage:
        answer["usage"] = usage
    return answer
