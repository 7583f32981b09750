"""Proxy overhead and ledger throughput. Prints figures; never part of the test run.

One run measures, against the same fast local fake upstream (a vLLM-shaped SLM answering at once
with confident log-probabilities), each in its own process on loopback:
  (a) clients calling the upstream directly;
  (b) a bare pass-through proxy (Starlette + httpx forwarding the body, nothing else): the floor;
  (c) fleetdeck proxy (`fleetdeck proxy`, SLM route, ledger on);
  (d) LiteLLM's own proxy (`litellm --config`, one worker), if `litellm[proxy]` is installed.
Throughput: 16 concurrent clients for --seconds; latency: sequential requests, p50 and p99.
Then the ledger: rows/s the batched writer sustains, and that a burst of 20,000 rows ends with 20,000.

Streaming mode (--stream): a paced streaming upstream (--tokens tokens, --pace-ms apart, each with its
log-probability), clients sending `stream: true` at 16, 64 and 256 concurrent streams (--concurrency), each
client on its own connection (so the load generator's own pool is not what is measured); per target and
concurrency: time to first byte (p50, p99) and streams/s, against the bare streaming relay in the same run.
--also-fleetdeck ROOT benches a second checkout's proxy (a baseline commit, say: `git worktree add`) beside
this one in the same run. --profile runs each fleetdeck proxy under cProfile (from the end of the first
warm-up to the end, so start-up is left out) and prints, per stream it served in that time,
the calls and CPU (process time) of its top functions: figures the machine's load does not change (cProfile
inflates the CPU; take CPU ms/stream from a run without --profile).

Usage: python bench/bench_proxy.py [--seconds 8] [--sequential 400] [--litellm-cli PATH]
       python bench/bench_proxy.py --stream [--seconds 4] [--concurrency 16,64,256] [--tokens 32] [--pace-ms 4]
                                   [--profile] [--also-fleetdeck /tmp/base-checkout]
  e.g. python3 -m venv /tmp/llvenv && /tmp/llvenv/bin/pip install 'litellm[proxy]==1.80.15'
       python bench/bench_proxy.py --litellm-cli /tmp/llvenv/bin/litellm
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pstats
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PY = sys.executable

UPSTREAM = textwrap.dedent('''
    import json, sys, uvicorn
    BODY = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "tickets-v3",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "billing"}, "finish_reason": "stop",
                     "logprobs": {"content": [{"token": "billing", "logprob": -0.01, "bytes": [98],
                                               "top_logprobs": [{"token": "billing", "logprob": -0.01, "bytes": [98]}]}]}}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 1, "total_tokens": 41}}).encode()
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        more = True
        while more:
            msg = await receive()
            more = msg.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": BODY})
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error", access_log=False)
''')

PASSTHROUGH = textwrap.dedent('''
    import sys, httpx, uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route
    UP = sys.argv[2]
    client = None
    async def chat(request):
        global client
        if client is None:
            client = httpx.AsyncClient(limits=httpx.Limits(max_connections=512, max_keepalive_connections=128), trust_env=False)
        r = await client.post(UP + "/v1/chat/completions", content=await request.body(),
                              headers={"content-type": "application/json"})
        return Response(r.content, status_code=r.status_code, media_type="application/json")
    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error", access_log=False)
''')

STREAM_UPSTREAM = textwrap.dedent('''
    import asyncio, json, sys, uvicorn
    TOKENS, PACE = int(sys.argv[2]), float(sys.argv[3]) / 1000
    BODY = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "tickets-v3",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "billing"}, "finish_reason": "stop",
                     "logprobs": {"content": [{"token": "billing", "logprob": -0.01, "bytes": [98],
                                               "top_logprobs": []}]}}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 1, "total_tokens": 41}}).encode()
    def chunk(choice):
        return b"data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0,
                                       "model": "tickets-v3", "choices": [dict(index=0, **choice)]}).encode() + b"\\n\\n"
    TOKEN = chunk({"delta": {"content": " tok"}, "finish_reason": None,
                   "logprobs": {"content": [{"token": " tok", "logprob": -0.01, "bytes": [32], "top_logprobs": []}]}})
    USAGE = b"data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "tickets-v3",
        "choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": TOKENS,
                                 "total_tokens": 40 + TOKENS}}).encode() + b"\\n\\n"
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        raw, more = b"", True
        while more:
            msg = await receive()
            raw += msg.get("body", b"")
            more = msg.get("more_body", False)
        body = json.loads(raw or b"{}")
        if not body.get("stream"):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": BODY})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": chunk({"delta": {"role": "assistant", "content": ""},
                                                                  "finish_reason": None}), "more_body": True})
        for i in range(TOKENS):
            await asyncio.sleep(PACE)  # a model writing a token every PACE seconds
            await send({"type": "http.response.body", "body": TOKEN, "more_body": True})
        tail = chunk({"delta": {}, "finish_reason": "stop"})
        if (body.get("stream_options") or {}).get("include_usage"):
            tail += USAGE
        await send({"type": "http.response.body", "body": tail + b"data: [DONE]\\n\\n"})
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error", access_log=False)
''')

STREAM_RELAY = textwrap.dedent('''
    import sys, httpx, uvicorn
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route
    UP = sys.argv[2]
    client = None
    async def chat(request):
        global client
        if client is None:
            client = httpx.AsyncClient(limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
                                       trust_env=False, timeout=60)
        req = client.build_request("POST", UP + "/v1/chat/completions", content=await request.body(),
                                   headers={"content-type": "application/json"})
        resp = await client.send(req, stream=True)
        async def gen():
            try:
                async for b in resp.aiter_raw():
                    yield b
            finally:
                await resp.aclose()
        return StreamingResponse(gen(), status_code=resp.status_code, media_type="text/event-stream")
    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error", access_log=False)
''')

# `python -m fleetdeck ...` with cProfile on a CPU clock (the machine's load does not stretch it), switched on
# by SIGUSR1 (after the warm-up: start-up's imports and first connections are not per-stream costs); the
# profile is written when the proxy stops (SIGTERM: it finishes its requests and returns).
PROFILED = textwrap.dedent('''
    import cProfile, runpy, signal, sys, time
    out = sys.argv.pop(1)
    sys.argv[0] = "fleetdeck"
    prof = cProfile.Profile(time.process_time)
    signal.signal(signal.SIGUSR1, lambda signum, frame: prof.enable())  # the event loop's thread: the main one
    try:
        runpy.run_module("fleetdeck", run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    finally:
        prof.disable()
        prof.dump_stats(out)
''')

PAYLOAD = {"model": "tickets", "messages": [{"role": "user", "content": "Route this ticket: my invoice is wrong"}], "max_tokens": 4}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            r = httpx.post(url + "/v1/chat/completions", json=PAYLOAD, timeout=5, trust_env=False,
                           headers={"Authorization": "Bearer sk-bench"})
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready")


async def throughput(url: str, seconds: float, clients: int = 16) -> float:
    done = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=30, trust_env=False, headers={"Authorization": "Bearer sk-bench"}) as c:
        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                r = await c.post(url + "/v1/chat/completions", json=PAYLOAD)
                if r.status_code == 200:
                    done += 1
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return done / elapsed


def latencies(url: str, n: int) -> tuple[float, float]:
    times = []
    with httpx.Client(timeout=30, trust_env=False, headers={"Authorization": "Bearer sk-bench"}) as c:
        for _ in range(20):
            c.post(url + "/v1/chat/completions", json=PAYLOAD)
        for _ in range(n):
            t = time.perf_counter()
            r = c.post(url + "/v1/chat/completions", json=PAYLOAD)
            times.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200, r.text
    times.sort()
    return statistics.median(times), times[int(0.99 * (len(times) - 1))]


STREAM_PAYLOAD = {**PAYLOAD, "stream": True, "max_tokens": 64}


async def stream_load(url: str, seconds: float, clients: int) -> tuple[list[float], int, float]:
    """`clients` workers streaming for `seconds`: (time to first content byte of each stream in ms,
    streams completed, elapsed). Each worker has its own connection: the load generator's pool stays out of it."""
    ttfb: list[float] = []
    done = 0
    deadline = time.perf_counter() + seconds
    headers = {"Authorization": "Bearer sk-bench"}

    async def worker() -> None:
        nonlocal done
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(limits=limits, timeout=60, trust_env=False, headers=headers) as c:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                first = None
                async with c.stream("POST", url + "/v1/chat/completions", json=STREAM_PAYLOAD) as r:
                    async for line in r.aiter_lines():
                        if first is None and '"content":" tok"' in line.replace(": ", ":"):
                            first = (time.perf_counter() - t) * 1000
                    ok = r.status_code == 200 and first is not None
                if ok and first is not None:
                    done += 1
                    ttfb.append(first)

    start_t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return ttfb, done, time.perf_counter() - start_t


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[int(q * (len(v) - 1))] if v else float("nan")


async def pool_checks(upstream: str, streams: int, rounds: int = 3) -> dict[str, tuple[float, float, float, int]]:
    """The HTTP client's own bookkeeping, which the machine's load does not change: per stream, how many
    connection checks (httpcore's is_idle) and new connections, and the seconds spent admitting and releasing
    requests, for `streams` concurrent streams x `rounds`: one pool as the proxy had (512 connections, 128 kept
    alive) against engine/router/upstream_pool.UpstreamClients."""
    import httpcore

    from engine.router.upstream_pool import UpstreamClients

    counts = {"is_idle": 0, "connect": 0, "assign_s": 0.0, "errors": 0}
    real_idle = httpcore.AsyncHTTPConnection.is_idle
    real_connect = httpcore.AsyncHTTPConnection._connect
    real_assign = httpcore.AsyncConnectionPool._assign_requests_to_connections

    def is_idle(self):  # type: ignore[no-untyped-def]
        counts["is_idle"] += 1
        return real_idle(self)

    async def connect(self, request):  # type: ignore[no-untyped-def]
        counts["connect"] += 1
        return await real_connect(self, request)

    def assign(self):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return real_assign(self)
        finally:
            counts["assign_s"] += time.perf_counter() - t

    httpcore.AsyncHTTPConnection.is_idle = is_idle  # type: ignore[method-assign]
    httpcore.AsyncHTTPConnection._connect = connect  # type: ignore[method-assign]
    httpcore.AsyncConnectionPool._assign_requests_to_connections = assign  # type: ignore[method-assign]
    url = upstream + "/v1/chat/completions"
    out = {}
    try:
        for name in ("one pool (512, 128 kept alive)", "UpstreamClients (32 x 16)"):
            single = httpx.AsyncClient(limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
                                       trust_env=False, timeout=60)
            sharded = UpstreamClients(timeout=60)

            async def one() -> None:
                client = single if name.startswith("one") else sharded.for_url(url)
                try:
                    async with client.stream("POST", url, json=STREAM_PAYLOAD) as r:
                        async for _ in r.aiter_raw():
                            pass
                except httpx.TransportError:
                    # A kept-alive connection the upstream closed as it was reused (or a reset under 256 opens at
                    # once): counted and shown, not a reason to lose the run's figures.
                    counts["errors"] += 1

            counts.update(is_idle=0, connect=0, assign_s=0.0, errors=0)
            for _ in range(rounds):
                await asyncio.gather(*(one() for _ in range(streams)))
            total = streams * rounds
            out[name] = (counts["is_idle"] / total, counts["connect"] / total, counts["assign_s"] * 1000 / total,
                         int(counts["errors"]))
            await single.aclose()
            await sharded.aclose()
    finally:
        httpcore.AsyncHTTPConnection.is_idle = real_idle  # type: ignore[method-assign]
        httpcore.AsyncHTTPConnection._connect = real_connect  # type: ignore[method-assign]
        httpcore.AsyncConnectionPool._assign_requests_to_connections = real_assign  # type: ignore[method-assign]
    return out


def stream_main(args: argparse.Namespace) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp())
    levels = [int(x) for x in args.concurrency.split(",")]
    profiles: dict[str, Path] = {}  # fleetdeck target -> its cProfile output (written when the proxy stops)
    served: dict[str, int] = {}  # streams each target completed (a profiled one: since its profile started)
    rows: list[tuple[int, str, float, float, float, int, float]] = []
    try:
        up_port = free_port()
        procs.append(start([PY, "-c", STREAM_UPSTREAM, str(up_port), str(args.tokens), str(args.pace_ms)]))
        upstream = f"http://127.0.0.1:{up_port}"
        wait_ready(upstream, procs[-1])
        rl_port = free_port()
        procs.append(start([PY, "-c", STREAM_RELAY, str(rl_port), upstream]))
        relay = f"http://127.0.0.1:{rl_port}"
        wait_ready(relay, procs[-1])
        fd_port = free_port()
        (tmp / "router.toml").write_text(textwrap.dedent(f'''
            [proxy]
            api_keys_env = "FD_BENCH_KEYS"
            [[task]]
            name = "tickets"
            slm_base_url = "{upstream}/v1"
            slm_model = "tickets-v3"
            confidence = "first_token"
            threshold = 0.85
        '''))
        targets = {"(a) direct upstream": upstream, "(b) bare streaming relay": relay}
        pids = {"(a) direct upstream": procs[0].pid, "(b) bare streaming relay": procs[1].pid}
        checkouts = {FLEETDECK: ROOT}
        if args.also_fleetdeck:
            checkouts[f"(c) fleetdeck @{Path(args.also_fleetdeck).name}"[:26]] = Path(args.also_fleetdeck).resolve()
        for name, root in checkouts.items():
            fd_port = free_port()
            run = ["-m", "fleetdeck"]
            if args.profile:
                profiles[name] = tmp / f"proxy-{len(profiles)}.prof"
                run = ["-c", PROFILED, str(profiles[name])]
            # Each checkout's own code (PYTHONPATH and cwd), the same interpreter and packages.
            env = dict(os.environ, FD_BENCH_KEYS="sk-bench", PYTHONPATH=str(root))
            procs.append(start([PY, *run, "proxy", "--config", str(tmp / "router.toml"),
                                "--port", str(fd_port), "--store", str(tmp / f"ledger-{fd_port}.db")], env, cwd=root))
            targets[name] = f"http://127.0.0.1:{fd_port}"
            pids[name] = procs[-1].pid
            wait_ready(targets[name], procs[-1])
        litellm_cli = args.litellm_cli or ""
        if litellm_cli and Path(litellm_cli).exists():
            ll_port = free_port()
            (tmp / "litellm.yaml").write_text(textwrap.dedent(f'''
                model_list:
                  - model_name: tickets
                    litellm_params:
                      model: openai/tickets-v3
                      api_base: {upstream}/v1
                      api_key: sk-upstream
            '''))
            ll_env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR")
            procs.append(start([litellm_cli, "--config", str(tmp / "litellm.yaml"), "--port", str(ll_port),
                                "--num_workers", "1"], ll_env))
            try:
                wait_ready(f"http://127.0.0.1:{ll_port}", procs[-1], timeout=180)
                targets["(d) LiteLLM proxy"] = f"http://127.0.0.1:{ll_port}"
                pids["(d) LiteLLM proxy"] = procs[-1].pid
            except RuntimeError as exc:
                print(f"(d) LiteLLM proxy: did not start ({exc})")
        else:
            print("(d) LiteLLM proxy: skipped (give --litellm-cli PATH to a venv with litellm[proxy])")
        import psutil

        # The process each target runs in (pids): its CPU time per stream is a figure the machine's load does not skew.
        def cpu(name: str) -> float:
            proc = psutil.Process(pids[name])
            times = [proc.cpu_times()] + [c.cpu_times() for c in proc.children(recursive=True)]
            return float(sum(t.user + t.system for t in times))

        for n in levels:
            for name, url in targets.items():
                _, warm, _ = asyncio.run(stream_load(url, min(1.0, args.seconds), min(n, 16)))  # warm connections and code paths
                if name in profiles and name not in served:
                    os.kill(pids[name], signal.SIGUSR1)  # its profile starts now
                    warm = 0
                before = cpu(name)
                ttfb, done, elapsed = asyncio.run(stream_load(url, args.seconds, n))
                served[name] = served.get(name, 0) + warm + done
                used = cpu(name) - before
                rows.append((n, name, pct(ttfb, 0.5), pct(ttfb, 0.99), done / elapsed, done, used * 1000 / max(done, 1)))
        pools = {n: asyncio.run(pool_checks(upstream, n)) for n in levels}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
    try:
        load = "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = "load average unknown"
    print(f"\nstreaming, {os.cpu_count()} cores ({load} at the end), {args.tokens} tokens {args.pace_ms:g} ms apart, "
          f"{args.seconds:g} s per level")
    print(f"{'streams':>8}  {'':26}{'TTFB p50 ms':>12}{'TTFB p99 ms':>12}{'streams/s':>11}{'vs relay':>10}"
          f"{'CPU ms/stream':>15}")
    relay_rate = {n: r for n, name, _, _, r, _, _ in rows if name == "(b) bare streaming relay"}
    for n, name, p50, p99, rate, done, cpu_ms in rows:
        print(f"{n:8d}  {name:26}{p50:12.1f}{p99:12.1f}{rate:11.1f}{rate / relay_rate[n]:9.2f}x{cpu_ms:15.1f}")
    for name, path in profiles.items():
        print_profile(name, path, served.get(name, 0))
    print("\nthe HTTP client's pool, per stream (3 rounds of N concurrent streams to the paced upstream):")
    print(f"{'streams':>8}  {'':32}{'is_idle checks':>15}{'new connections':>17}{'admit+release ms':>18}{'failed':>8}")
    for n, by_pool in pools.items():
        for name, (idle, connects, assign_ms, failed) in by_pool.items():
            print(f"{n:8d}  {name:32}{idle:15.0f}{connects:17.2f}{assign_ms:18.3f}{failed:8d}")


FLEETDECK = "(c) fleetdeck proxy"


def print_profile(name: str, path: Path, streams: int, top: int = 25) -> None:
    """A proxy's cProfile, per stream it served: the functions that spent the most CPU themselves, then the
    most called. Calls per stream do not depend on the machine's load; the ms are CPU (process time), inflated
    by cProfile's own work."""
    if not path.exists() or not streams:
        print(f"\n{name}: no profile written ({path})")
        return
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    rows: list[tuple[float, float, float, str]] = [
        (nc / streams, tt * 1000 / streams, ct * 1000 / streams, f"{Path(f).name}:{line}({fn})")
            for (f, line, fn), (cc, nc, tt, ct, _) in stats.items()]
    total = sum(r[1] for r in rows)
    print(f"\n{name} under cProfile, per stream ({streams} streams, {total:.1f} ms of profiled CPU each):")
    for title, key in (("own time", 1), ("calls", 0)):
        print(f"  top {top} by {title}:  {'calls':>8}{'own ms':>9}{'cum ms':>9}  function")
        for nc, tt, ct, where in sorted(rows, key=lambda r: -float(r[key]))[:top]:
            print(f"  {'':20}{nc:8.1f}{tt:9.3f}{ct:9.3f}  {where}")


def start(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env or os.environ.copy(),
                            cwd=cwd)


def bench_ledger(rows: int = 20_000) -> tuple[float, int]:
    from store.db import open_store
    from store.ledger import LedgerWriter
    from store.ledger_row import LedgerRow

    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(Path(tmp) / "ledger.db")
        writer = LedgerWriter(store)
        now = time.time()
        start_t = time.perf_counter()
        for i in range(rows):
            writer.put(LedgerRow(id=f"r{i}", ts=now + i * 0.001, task=f"task-{i % 10}", route="slm" if i % 5 else "frontier",
                                 escalated=i % 5 == 0, reason="confident" if i % 5 else "low_confidence", status=200,
                                 confidence=0.9, prompt_tokens=40, completion_tokens=5, latency_ms=12.0,
                                 cost_usd=0.0 if i % 5 else 0.0004, all_frontier_cost_usd=0.0004))
        writer.close()
        elapsed = time.perf_counter() - start_t
        count = store.execute("SELECT count(*) FROM requests")[0][0]
        rolled = store.execute("SELECT SUM(requests) FROM rollup_minute")[0][0]
        assert rolled == count
        store.close()
    return rows / elapsed, count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--sequential", type=int, default=400)
    ap.add_argument("--litellm-cli", metavar="PATH",
                    help="`litellm` executable of a venv with litellm[proxy] (fleetdeck pins a litellm whose "
                         "[proxy] extra is not on PyPI, so the benchmark's LiteLLM proxy lives in its own venv)")
    ap.add_argument("--stream", action="store_true", help="the streaming benchmark (see the module's doc)")
    ap.add_argument("--concurrency", default="16,64,256")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--pace-ms", type=float, default=4.0)
    ap.add_argument("--profile", action="store_true", help="--stream: run fleetdeck's proxy under cProfile and print "
                                                           "its top functions per stream")
    ap.add_argument("--also-fleetdeck", metavar="ROOT", help="--stream: also bench the proxy of the fleetdeck "
                                                             "checkout at ROOT (a baseline) in the same run")
    args = ap.parse_args()
    if args.stream:
        stream_main(args)
        return

    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, tuple[float, float, float]] = {}
    tmp = Path(tempfile.mkdtemp())
    try:
        up_port = free_port()
        procs.append(start([PY, "-c", UPSTREAM, str(up_port)]))
        upstream = f"http://127.0.0.1:{up_port}"
        wait_ready(upstream, procs[-1])

        pt_port = free_port()
        procs.append(start([PY, "-c", PASSTHROUGH, str(pt_port), upstream]))
        passthrough = f"http://127.0.0.1:{pt_port}"
        wait_ready(passthrough, procs[-1])

        fd_port = free_port()
        (tmp / "router.toml").write_text(textwrap.dedent(f'''
            [proxy]
            api_keys_env = "FD_BENCH_KEYS"
            [[task]]
            name = "tickets"
            slm_base_url = "{upstream}/v1"
            slm_model = "tickets-v3"
            confidence = "first_token"
            threshold = 0.85
            frontier_model = "openai/gpt-4o"
            frontier_api_base = "{upstream}/v1"
        '''))
        env = dict(os.environ, FD_BENCH_KEYS="sk-bench")
        procs.append(start([PY, "-m", "fleetdeck", "proxy", "--router-config", str(tmp / "router.toml"), "--port", str(fd_port),
                            "--store", str(tmp / "ledger.db")], env))
        fleetdeck = f"http://127.0.0.1:{fd_port}"
        wait_ready(fleetdeck, procs[-1])

        targets = {"(a) direct upstream": upstream, "(b) bare pass-through": passthrough, "(c) fleetdeck proxy": fleetdeck}

        litellm_cli = args.litellm_cli or shutil.which("litellm") or ""
        if litellm_cli and Path(litellm_cli).exists():
            ll_port = free_port()
            (tmp / "litellm.yaml").write_text(textwrap.dedent(f'''
                model_list:
                  - model_name: tickets
                    litellm_params:
                      model: openai/tickets-v3
                      api_base: {upstream}/v1
                      api_key: sk-upstream
            '''))
            ll_env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR")
            procs.append(start([litellm_cli, "--config", str(tmp / "litellm.yaml"), "--port", str(ll_port), "--num_workers", "1"], ll_env))
            try:
                wait_ready(f"http://127.0.0.1:{ll_port}", procs[-1], timeout=180)
                targets["(d) LiteLLM proxy"] = f"http://127.0.0.1:{ll_port}"
            except RuntimeError as exc:
                print(f"(d) LiteLLM proxy: did not start ({exc})")
        else:
            print("(d) LiteLLM proxy: skipped (give --litellm-cli PATH to a venv with litellm[proxy])")

        for name, url in targets.items():
            rps = asyncio.run(throughput(url, args.seconds))
            p50, p99 = latencies(url, args.sequential)
            results[name] = (rps, p50, p99)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()

    direct = results["(a) direct upstream"]
    print(f"\nproxy overhead, {os.cpu_count()} cores, 16 clients x {args.seconds:.0f} s, {args.sequential} sequential requests")
    print(f"{'':24}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'added p50':>11}{'vs pass-through req/s':>23}")
    base_rps = results["(b) bare pass-through"][0]
    base_p50 = results["(b) bare pass-through"][1]
    for name, (rps, p50, p99) in results.items():
        added = p50 - direct[1]
        print(f"{name:24}{rps:9.0f}{p50:9.2f}{p99:9.2f}{added:9.2f} ms{rps / base_rps:22.2f}x")
    fd = results["(c) fleetdeck proxy"]
    print(f"\nfleetdeck added p50 over the pass-through's: {fd[1] - base_p50:+.2f} ms (aim: within 2 ms)")
    print(f"fleetdeck throughput / pass-through:        {fd[0] / base_rps:.2f} (aim: at least 0.80)")
    if "(d) LiteLLM proxy" in results:
        ll = results["(d) LiteLLM proxy"]
        print(f"fleetdeck vs LiteLLM proxy: {fd[0] / ll[0]:.1f}x the throughput, {ll[1] - fd[1]:.2f} ms lower p50")

    rate, count = bench_ledger()
    print(f"\nledger writer: {rate:,.0f} rows/s sustained; a burst of 20,000 rows ended with {count:,} rows")


if __name__ == "__main__":
    main()
