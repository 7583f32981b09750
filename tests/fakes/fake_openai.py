"""Fake OpenAI-compatible servers on loopback: a vLLM-shaped small model and a frontier model.

The last user message steers the fake, so a test says what it wants in the prompt:
  SLM:      "lp=-0.01,-0.9"  token log-probabilities of the answer (default two tokens at -0.05)
            "sleep=1.5"      answer after that many seconds
            "fail=500"       answer with that HTTP status (the error quotes the prompt, as vLLM's do)
            "nolp"           answer without log-probabilities
          with `stream: true` the answer comes as OpenAI chunks, one token each ("slm ", "answer", " w2", ...):
            "tokens=40"      that many tokens (log-probability -0.05 each unless lp= says)
            "pace=0.05"      seconds between tokens
            "firstwait=1.5"  seconds between the headers and the first token
            "hold"           after the first token, wait for `app.state.release` (a threading.Event) to be set
            "stallafter=2"   after that many tokens, send nothing more (for a minute)
            "nostream"       answer a streamed request with a JSON body (a server that ignores `stream`)
            "donestall"      after `data: [DONE]`, hold the HTTP body open (for a minute) instead of ending it
          `app.state.events` records ("first_token", n) / ("finished", n) for the n-th request, in order,
          and ("closed", n) when the client closed the connection before the end.
  frontier: "ffail"          answer 500; "f400" answer 400 (both quote the prompt); "fsleep=2" answer late
            "fkeepalive"     stream one chunk, then only SSE keep-alive comments (for a minute)
            "fstall"         stream one chunk, then nothing (for a minute)
            "fbreak"         stream one chunk, then drop the connection mid-stream
`broken_slm_app()`: a small model that answers what a broken server sends, by the prompt's first word: "usage"
(token counts that are a string and a list), "hugelp" (a log-probability of 1e308), "surrogate" (a lone
\ud800 in the text), "nodone" (the body ends without `data: [DONE]`), "multiline400" (a 400 whose message
spans lines), "html500" (an HTML error page); with "json" before it, one JSON body instead of a stream.
Both count the requests they got in `app.state.calls`; the SLM keeps each request's client address (host,
port: one per TCP connection) in `app.state.peers`.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

SLM_PROMPT_TOKENS = 50
FRONTIER_PROMPT_TOKENS = 52
FRONTIER_COMPLETION_TOKENS = 20


def _last_user(body: dict[str, Any]) -> str:
    for m in reversed(body.get("messages", [])):
        if m.get("role") == "user":
            c = m.get("content")
            return c if isinstance(c, str) else json.dumps(c)
    return ""


def slm_app() -> Starlette:
    async def chat(request: Request) -> Any:
        body = await request.json()
        request.app.state.calls.append(body)
        request.app.state.peers.append(tuple(request.client) if request.client else None)
        text = _last_user(body)
        if m := re.search(r"sleep=([\d.]+)", text):
            await asyncio.sleep(float(m.group(1)))
        if m := re.search(r"fail=(\d+)", text):
            return JSONResponse({"object": "error", "message": f"fake failure for {text!r}", "type": "BadRequestError",
                                 "code": int(m.group(1))},
                                status_code=int(m.group(1)))
        lps = [-0.05, -0.05]
        if m := re.search(r"tokens=(\d+)", text):
            lps = [-0.05] * int(m.group(1))
        if m := re.search(r"lp=([-\d.,]+)", text):
            lps = [float(x) for x in m.group(1).split(",") if x]
        if body.get("stream") and "nostream" in text:  # a server that ignores `stream`: a JSON body, no chunks
            return JSONResponse({"object": "chat.completion", "choices": []})
        if body.get("stream") and "jsononly" not in text:  # jsononly: a server that ignores `stream`, answering whole
            return StreamingResponse(_slm_stream(request.app.state, body, text, lps), media_type="text/event-stream")
        tokens = [f"tok{i}" for i in range(len(lps))]
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": "slm answer", "tool_calls": []},
            "finish_reason": "stop",
        }
        if "nolp" not in text and body.get("logprobs"):
            choice["logprobs"] = {"content": [
                {"token": t, "logprob": lp, "bytes": list(t.encode()),
                 "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}]}
                for t, lp in zip(tokens, lps)
            ]}
        return JSONResponse({
            "id": "chatcmpl-slm", "object": "chat.completion", "created": int(time.time()), "model": body.get("model"),
            "choices": [choice],
            "usage": {"prompt_tokens": SLM_PROMPT_TOKENS, "completion_tokens": len(lps), "total_tokens": SLM_PROMPT_TOKENS + len(lps)},
        })

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    app.state.calls = []
    app.state.peers = []
    app.state.events = []
    app.state.release = threading.Event()
    return app


def _piece(i: int) -> str:
    return ("slm ", "answer")[i] if i < 2 else f" w{i}"


async def _slm_stream(state: Any, body: dict[str, Any], text: str, lps: list[float]) -> Any:
    """A vLLM-shaped streamed answer: a role chunk, one chunk per token, a finish chunk, usage, [DONE]."""
    n = len(state.calls)
    pace = float(m.group(1)) if (m := re.search(r"pace=([\d.]+)", text)) else 0.0
    stall = int(m.group(1)) if (m := re.search(r"stallafter=(\d+)", text)) else None
    base = {"id": "chatcmpl-slm", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": body.get("model")}

    def event(choice: dict[str, Any]) -> str:
        return f"data: {json.dumps({**base, 'choices': [{'index': 0, **choice}]})}\n\n"

    try:
        yield event({"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
        if m := re.search(r"firstwait=([\d.]+)", text):
            await asyncio.sleep(float(m.group(1)))
        for i, lp in enumerate(lps):
            if stall is not None and i == stall:
                for _ in range(600):  # a minute, far past any bound a test sets; the client's cut ends it
                    await asyncio.sleep(0.1)
                return
            if i == 1 and "hold" in text:
                await asyncio.to_thread(state.release.wait, 30)
            elif i and pace:
                await asyncio.sleep(pace)
            tok = _piece(i)
            choice: dict[str, Any] = {"delta": {"content": tok}, "finish_reason": None}
            if "nolp" not in text and body.get("logprobs"):
                choice["logprobs"] = {"content": [{"token": tok, "logprob": lp, "bytes": list(tok.encode()),
                                                   "top_logprobs": [{"token": tok, "logprob": lp, "bytes": list(tok.encode())}]}]}
            yield event(choice)
            if i == 0:
                state.events.append(("first_token", n))
        yield event({"delta": {}, "finish_reason": "stop"})
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": SLM_PROMPT_TOKENS, "completion_tokens": len(lps), "total_tokens": SLM_PROMPT_TOKENS + len(lps)}
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
        if "donestall" in text:
            for _ in range(600):  # a minute; the reader stops waiting for the body's end first
                await asyncio.sleep(0.1)
        state.events.append(("finished", n))
    except (asyncio.CancelledError, GeneratorExit):
        state.events.append(("closed", n))  # the client (the proxy) closed the connection mid-answer
        raise


def frontier_app() -> Starlette:
    async def chat(request: Request) -> Any:
        body = await request.json()
        request.app.state.calls.append(body)
        text = _last_user(body)
        if m := re.search(r"fsleep=([\d.]+)", text):
            await asyncio.sleep(float(m.group(1)))
        if "ffail" in text:
            return JSONResponse({"error": {"message": f"frontier exploded on {text!r}", "type": "server_error"}}, status_code=500)
        if "f400" in text:
            return JSONResponse({"error": {"message": f"frontier refuses {text!r}", "type": "invalid_request_error"}},
                                status_code=400)
        usage = {"prompt_tokens": FRONTIER_PROMPT_TOKENS, "completion_tokens": FRONTIER_COMPLETION_TOKENS,
                 "total_tokens": FRONTIER_PROMPT_TOKENS + FRONTIER_COMPLETION_TOKENS}
        base = {"id": "chatcmpl-frontier", "created": int(time.time()), "model": body.get("model")}
        if body.get("stream"):
            async def gen() -> Any:
                chunk = {**base, "object": "chat.completion.chunk"}
                yield f"data: {json.dumps({**chunk, 'choices': [{'index': 0, 'delta': {'role': 'assistant', 'content': ''}, 'finish_reason': None}]})}\n\n"
                if "fbreak" in text:
                    await asyncio.sleep(0.05)
                    raise ConnectionAbortedError("fake frontier drops the stream")  # uvicorn aborts the response
                if "fkeepalive" in text or "fstall" in text:
                    for _ in range(600):  # a minute, far past any bound a test sets; the client's cut ends it
                        await asyncio.sleep(0.1)
                        if "fkeepalive" in text:
                            yield ": keep-alive\n\n"
                    return
                for piece in ("frontier ", "streamed ", "answer"):
                    await asyncio.sleep(0.01)
                    yield f"data: {json.dumps({**chunk, 'choices': [{'index': 0, 'delta': {'content': piece}, 'finish_reason': None}]})}\n\n"
                yield f"data: {json.dumps({**chunk, 'choices': [{'index': 0, 'delta': {}, 'finish_reason': 'stop'}]})}\n\n"
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")
        return JSONResponse({
            **base, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "frontier answer"}, "finish_reason": "stop"}],
            "usage": usage,
        })

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    app.state.calls = []
    return app


def broken_slm_app() -> Starlette:
    def chunk(delta: dict[str, Any], logprob: str = "-0.01") -> str:
        return ('data: {"id":"b","object":"chat.completion.chunk","created":1,"model":"b","choices":[{"index":0,'
                f'"delta":{json.dumps(delta)},"finish_reason":null,'
                f'"logprobs":{{"content":[{{"token":"t","logprob":{logprob},"bytes":[116],"top_logprobs":[]}}]}}}}]}}\n\n')

    bad_usage = '{"prompt_tokens":"lots","completion_tokens":[1],"total_tokens":{"a":1}}'

    async def chat(request: Request) -> Any:
        body = await request.json()
        request.app.state.calls.append(body)
        words = _last_user(body).split()
        whole = words[:1] == ["json"]
        mode = words[1] if whole and len(words) > 1 else (words[0] if words else "")
        if mode == "multiline400":
            return JSONResponse({"error": {"message": "line one\nline two\r\nline three"}}, status_code=400)
        if mode == "html500":
            return Response("<html>\n<body>\nInternal error\n</body>\n</html>", status_code=500, media_type="text/html")
        if whole:  # a server that ignores `stream`: one chat.completion, with the same fault in it
            content = "a\\ud800" if mode == "surrogate" else "a"
            lp = "1e308" if mode == "hugelp" else "-0.01"
            usage = bad_usage if mode == "usage" else '{"prompt_tokens":3,"completion_tokens":1}'
            text = ('{"id":"b","object":"chat.completion","created":1,"model":"b","choices":[{"index":0,'
                    f'"message":{{"role":"assistant","content":"{content}"}},"finish_reason":"stop",'
                    f'"logprobs":{{"content":[{{"token":"t","logprob":{lp},"bytes":[116],"top_logprobs":[]}}]}}}}],'
                    f'"usage":{usage}}}')
            return Response(text, media_type="application/json")

        async def gen() -> Any:
            yield chunk({"role": "assistant", "content": "a"}, "1e308" if mode == "hugelp" else "-0.01")
            if mode == "surrogate":
                yield chunk({"content": "b\\ud800"}).replace("\\\\ud800", "\\ud800")
            else:
                yield chunk({"content": "b"})
            if mode == "nodone":
                return  # the body ends here: half an answer
            yield 'data: {"id":"b","object":"chat.completion.chunk","created":1,"model":"b","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
            if mode == "usage":
                yield f'data: {{"id":"b","object":"chat.completion.chunk","created":1,"model":"b","choices":[],"usage":{bad_usage}}}\n\n'
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    app.state.calls = []
    return app


class ServerThread:
    """A real uvicorn server on 127.0.0.1 in a thread; port 0 picks a free port."""

    def __init__(self, app: Any, port: int = 0, **config: Any) -> None:
        """`config`: more uvicorn.Config arguments (the proxy's header limits, say)."""
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                                    lifespan="on", access_log=False, **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.port = 0

    def start(self) -> "ServerThread":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
