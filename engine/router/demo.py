"""The demo's router traffic: simulated SLM and frontier servers, a back-filled history, live requests.

`fleetdeck demo` starts `run_backend` as its own process (`fleetdeck demo-backend`): it back-fills the
rollups with months of history (one task drifting in the last hours), serves a simulated vLLM-shaped
SLM and a simulated frontier on loopback (labelled simulated in every answer), starts the real
`fleetdeck proxy` in front of them, and sends a few requests a second through it, so the ledger fills
the way it does in production. It also starts the demo's three simulated servers and its fine-tune
(engine/vllm/demo.py), and on its way out ends all of it (see `run_backend`). Nothing here is imported
by the dashboard.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route as HttpRoute

from engine import managed
from engine.demo.home import DemoHome, DemoProcesses, forget_earlier_runs, stop_everything
from engine.vllm.demo import DEMO_NODE, start_demo_job, start_demo_servers
from fleet.procs import stop_child
from fleet.simulated import demo_fleet
from store.analytics import TaskPolicy
from store.db import Store, open_store
from store.ledger import CONFIDENCE_BINS, LATENCY_BUCKETS_MS, confidence_bin, latency_bucket, put_rollups
from store.ledger_row import Route
from store.schema import ROLLUP_TABLES
from store.rollup import ROLLUP_FIELDS

GPT4O_IN, GPT4O_OUT = 2.5e-6, 10e-6


@dataclass(frozen=True)
class DemoTask:
    name: str
    requests_per_hour: float
    escalation: float  # baseline escalation rate
    threshold: float
    prompt_tokens: int
    completion_tokens: int
    drifts: bool = False


DEMO_TASKS = (
    DemoTask("ticket-routing", 6000, 0.08, 0.85, 180, 4),
    DemoTask("summarise-notes", 2500, 0.15, 0.70, 900, 120),
    DemoTask("extract-fields", 4000, 0.05, 0.80, 400, 60),
    DemoTask("triage-alerts", 1500, 0.10, 0.85, 250, 8, drifts=True),
)


def escalation_at(task: DemoTask, ts: float, now: float) -> float:
    """The task's escalation rate at a time: daily rhythm, and for the drifting task a climb in the last 3 h."""
    day = 0.02 * math.sin(2 * math.pi * ((ts / 3600) % 24) / 24)
    rate = task.escalation + day
    if task.drifts and now - ts < 3 * 3600:
        rate += 0.25 * (1 - (now - ts) / (3 * 3600))
    return max(0.0, min(0.95, rate))


def _hist_latency(rng: random.Random, n: int, base_ms: float) -> list[int]:
    hist = [0] * len(LATENCY_BUCKETS_MS)
    for _ in range(min(n, 50)):
        hist[latency_bucket(rng.lognormvariate(math.log(base_ms), 0.4))] += max(1, n // 50)
    return hist


def _hist_conf(rng: random.Random, n: int, escalated: int, threshold: float) -> list[int]:
    hist = [0] * CONFIDENCE_BINS
    low = confidence_bin(max(0.0, threshold - 0.2))
    high = confidence_bin(min(0.999, threshold + 0.08))
    hist[low] += escalated
    hist[high] += n - escalated
    return hist


def backfill(store: Store, now: float, tasks: tuple[DemoTask, ...] = DEMO_TASKS, days: int = 30,
             daily_only_days: int = 150, minute_hours: float = 3.0, seed: int = 7, volume: float = 1.0) -> int:
    """Write history straight into the rollups: minutes for the last hours, hours for `days`, days before."""
    rng = random.Random(seed)
    rows: dict[str, list[tuple[Any, ...]]] = {t: [] for t in ROLLUP_TABLES.values()}

    def add(table: str, bucket: int, task: DemoTask, width: int) -> None:
        mid = bucket + width / 2
        n = max(0, int(rng.gauss(task.requests_per_hour * volume * width / 3600, 0.05 * task.requests_per_hour * volume * width / 3600)))
        if n == 0:
            return
        esc = min(n, int(n * escalation_at(task, mid, now) + rng.random()))
        slm_n = n - esc
        allf_per = task.prompt_tokens * GPT4O_IN + task.completion_tokens * GPT4O_OUT
        for route, count, cost, lat in ((Route.SLM, slm_n, 0.0, 60.0), (Route.FRONTIER, esc, allf_per * esc, 900.0)):
            if not count:
                continue
            escalated = esc if route == Route.FRONTIER else 0
            values: dict[str, Any] = {
                "bucket": bucket, "task": task.name, "route": route, "requests": count, "escalated": escalated,
                "esc_low_confidence": escalated, "prompt_tokens": count * task.prompt_tokens,
                "completion_tokens": count * task.completion_tokens, "cost_usd": cost,
                "all_frontier_cost_usd": allf_per * count, "latency_ms_sum": lat * count,
                "latency_hist": json.dumps(_hist_latency(rng, count, lat)),
                "confidence_hist": json.dumps(_hist_conf(rng, count, count if route == Route.FRONTIER else 0,
                                                         task.threshold)),
            }
            # By name, in ROLLUP_FIELDS order: a count the definition gains later is 0 here, not a shifted column.
            rows[table].append(tuple(values.get(name, 0) for name in ROLLUP_FIELDS))

    hour_start = int(now // 3600) * 3600
    day_start = int(now // 86400) * 86400
    for task in tasks:
        for m in range(int(minute_hours * 60), 0, -1):
            add("rollup_minute", int(now // 60) * 60 - m * 60, task, 60)
        for h in range(days * 24, 0, -1):
            add("rollup_hour", hour_start - h * 3600, task, 3600)
        for d in range(days + daily_only_days, 0, -1):
            add("rollup_day", day_start - d * 86400, task, 86400)
    with store.transaction() as conn:
        for table, data in rows.items():
            put_rollups(conn, table, data)
    return sum(len(v) for v in rows.values())


def sim_upstream_app(drift_started: float) -> Any:
    """One ASGI app serving a simulated SLM (/slm/v1) and a simulated frontier (/frontier/v1)."""
    rng = random.Random(11)
    tasks = {t.name: t for t in DEMO_TASKS}

    async def slm(request: Request) -> Any:
        body = await request.json()
        task = tasks.get(str(body.get("model", "")).removesuffix("-lora"))
        now = time.time()
        rate = escalation_at(task, now, drift_started + 3 * 3600) if task else 0.1
        low = rng.random() < rate
        lp = math.log(max(1e-6, (task.threshold if task else 0.8) - rng.uniform(0.05, 0.4))) if low else math.log(rng.uniform(0.93, 0.999))
        await asyncio.sleep(rng.uniform(0.02, 0.08))
        n = task.completion_tokens if task else 8
        content = [{"token": f"t{i}", "logprob": lp if i == 0 else -0.01, "bytes": [116], "top_logprobs": []} for i in range(min(n, 16))]
        return JSONResponse({
            "id": f"chatcmpl-sim{rng.randrange(1 << 30)}", "object": "chat.completion", "created": int(now),
            "model": body.get("model"), "system_fingerprint": "fleetdeck-simulated-slm",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "(simulated SLM answer)"},
                         "logprobs": {"content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": task.prompt_tokens if task else 100, "completion_tokens": n,
                      "total_tokens": (task.prompt_tokens if task else 100) + n},
        })

    async def frontier(request: Request) -> Any:
        body = await request.json()
        await asyncio.sleep(rng.uniform(0.3, 0.9))
        prompt = sum(len(str(m.get("content", ""))) for m in body.get("messages", [])) // 4 + 150
        usage = {"prompt_tokens": prompt, "completion_tokens": 40, "total_tokens": prompt + 40}
        answer = {"id": "chatcmpl-simfrontier", "object": "chat.completion", "created": int(time.time()),
                  "model": body.get("model"), "system_fingerprint": "fleetdeck-simulated-frontier",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "(simulated frontier answer)"},
                               "finish_reason": "stop"}], "usage": usage}
        if body.get("stream"):
            async def gen() -> Any:
                chunk = {k: answer[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
                yield f"data: {json.dumps(chunk | {'choices': [{'index': 0, 'delta': {'role': 'assistant', 'content': '(simulated frontier answer)'}, 'finish_reason': 'stop'}]})}\n\n"
                yield f"data: {json.dumps(chunk | {'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(gen(), media_type="text/event-stream")
        return JSONResponse(answer)

    return Starlette(routes=[HttpRoute("/slm/v1/chat/completions", slm, methods=["POST"]),
                             HttpRoute("/frontier/v1/chat/completions", frontier, methods=["POST"])])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def demo_router_toml(upstream: str, port: int) -> str:
    lines = [
        "# written by `fleetdeck demo`: the real proxy in front of simulated servers",
        "[proxy]", 'host = "127.0.0.1"', f"port = {port}", "api_keys_env = \"FLEETDECK_DEMO_NO_KEYS\"",
        "[pricing]", "slm_gpu_hour_usd = 1.20", "slm_gpus = 2", "",
    ]
    for t in DEMO_TASKS:
        lines += [
            "[[task]]", f'name = "{t.name}"', f'slm_base_url = "{upstream}/slm/v1"', f'slm_model = "{t.name}-lora"',
            'confidence = "first_token"', f"threshold = {t.threshold}", 'frontier_model = "openai/gpt-4o"',
            f'frontier_api_base = "{upstream}/frontier/v1"', 'frontier_api_key_env = "FLEETDECK_DEMO_FRONTIER_KEY"',
            # the defaults, written out so the demo's config shows the knobs
            f"recent_hours = {TaskPolicy.recent_hours:g}", f"baseline_days = {TaskPolicy.baseline_days:g}",
            f"drift_threshold_pp = {TaskPolicy.drift_threshold_pp:g}", "",
        ]
    return "\n".join(lines)


def run_backend(store_path: Path, home_dir: Path, rate_per_s: float = 4.0,
                owner: tuple[int, float] | None = None) -> int:
    """The demo's backend, until SIGTERM or until its dashboard (`owner`: pid and create time) is gone.

    It records the proxy it starts among the dashboard's helpers; when it ends, it ends the proxy and
    stops every server and job in the demo's store (the ones it started and the ones the operator
    started from the demo's dialogs)."""
    home = DemoHome(home_dir)
    home.prepare()
    workdir = home.backend
    workdir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: stop.set())
    if owner is not None:
        def watch_owner() -> None:  # a dashboard killed outright (SIGKILL) cannot end us: we notice
            while not stop.wait(1.0):
                if not managed.alive(*owner):
                    stop.set()
        threading.Thread(target=watch_owner, daemon=True).start()

    now = time.time()
    store = open_store(store_path)
    marker = store.execute("SELECT count(*) FROM rollup_hour")[0][0]
    if not marker:
        backfill(store, now)
    # The GPUs as the dashboard sees them (what already runs there included), for the planner.
    live = DemoProcesses(store_path, max_age_s=0.0)
    node = next(n for n in demo_fleet(live=live) if n.name == DEMO_NODE)
    proxy = None
    server = None
    try:
        if not stop.is_set():
            forget_earlier_runs(store)  # engine/demo/home.py: what earlier demos ended, not shown as this one's
            start_demo_servers(store, home, lambda i: node.snapshot().gpus[i])
        if not stop.is_set():
            start_demo_job(store, home, lambda i: node.snapshot().gpus[i])
        up_port = free_port()
        server = uvicorn.Server(uvicorn.Config(sim_upstream_app(now - 3 * 3600), host="127.0.0.1", port=up_port,
                                               log_level="error", access_log=False))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started and not stop.is_set():
            time.sleep(0.05)
        proxy_port = free_port()
        cfg = home.router_config
        cfg.write_text(demo_router_toml(f"http://127.0.0.1:{up_port}", proxy_port))
        env = dict(os.environ, FLEETDECK_DEMO_FRONTIER_KEY="simulated", LITELLM_LOCAL_MODEL_COST_MAP="True")
        if not stop.is_set():
            proxy = subprocess.Popen([sys.executable, "-m", "fleetdeck", "proxy", "--router-config", str(cfg), "--store", str(store_path)],
                                     stdout=subprocess.DEVNULL, stderr=open(workdir / "demo-proxy.log", "ab"), env=env)
            home.helpers.add(proxy.pid, "demo proxy")
        rng = random.Random(5)
        weights = [t.requests_per_hour for t in DEMO_TASKS]
        url = f"http://127.0.0.1:{proxy_port}/v1/chat/completions"
        with httpx.Client(timeout=5, trust_env=False) as client:  # short: SIGTERM is seen between requests
            while not stop.is_set() and proxy is not None and proxy.poll() is None:
                task = rng.choices(DEMO_TASKS, weights)[0]
                try:
                    client.post(url, json={"model": task.name, "messages": [{"role": "user", "content": "simulated request"}]})
                except httpx.HTTPError:
                    pass  # the proxy is still starting
                stop.wait(rng.expovariate(rate_per_s))
    finally:
        if proxy is not None:
            stop_child(proxy, timeout=15)
        if server is not None:
            server.should_exit = True
        stop_everything(store)
        live.close()
        store.close()
    return 0
