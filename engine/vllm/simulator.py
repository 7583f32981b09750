"""A simulated vLLM server: the same command line, log lines, HTTP endpoints, errors and metric names.

`python -m engine.vllm.simulator serve MODEL --port P [vLLM flags]` behaves like `vllm serve` at the
process and HTTP level, so fleetdeck's launcher, readiness check, crash diagnosis, metrics scrape and
LoRA hot-swap run unchanged against it. `fleetdeck demo` serves its simulated servers with it and the
tests launch it (through tests/fakes/fake_vllm) via the real launcher. It never touches a GPU; every
answer and its /metrics say it is simulated.

Knobs (environment): FLEETDECK_SIM_START_DELAY seconds before the port opens (default 1.0);
FLEETDECK_SIM_CRASH = kv_blocks | max_len | free_memory | oom_weights | model_missing to die the way
vLLM does; FLEETDECK_SIM_LOAD requests/s of synthetic traffic so the figures move (demo);
FLEETDECK_SIM_CRASH_AFTER seconds after which a ready server dies (demo).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

CRASH_LOGS = {
    "kv_blocks": "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` "
                 "when initializing the engine.",
    "max_len": "ValueError: To serve at least one request with the models's max seq len (32768), (4.00 GiB KV cache "
               "is needed, which is larger than the available KV cache memory (2.24 GiB). Based on the available "
               "memory, the estimated maximum model length is 18320. Try increasing `gpu_memory_utilization` or "
               "decreasing `max_model_len` when initializing the engine.",
    "free_memory": "ValueError: Free memory on device (30.21/79.19 GiB) on startup is less than desired GPU memory "
                   "utilization (0.9, 71.27 GiB). Decrease GPU memory utilization or reduce GPU memory used by "
                   "other processes.",
    "oom_weights": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 224.00 MiB. GPU 0 has a total "
                   "capacity of 23.55 GiB of which 100.50 MiB is free. Including non-PyTorch memory, this process "
                   "has 23.44 GiB memory in use.",
    "model_missing": "ValueError: Invalid repository ID or local directory specified: '{model}'.",
}

# A server that dies while serving (FLEETDECK_SIM_CRASH_AFTER, the demo's llama-3.1-8b): its engine process
# goes, as vLLM 0.32's does, and the API server with it. It printed the start-up OOM before, on an H100 said
# to hold 23.55 GiB, and was diagnosed as dying "while loading the weights" a minute after it was ready.
ENGINE_DIED_LOG = ("RuntimeError: CUDA error: an illegal memory access was encountered\n"
                   "ERROR {stamp} [core_client.py] Engine core proc EngineCore_DP0 died unexpectedly, shutting down "
                   "client.")


class Metrics:
    """The families fleetdeck reads, under vLLM 0.32's names, labels and buckets, in a registry of their own.

    prometheus_client is what vLLM itself exposes them with, so the text (``_total``, ``_created``,
    cumulative buckets) is the same library's output, not an imitation of it."""

    def __init__(self, served: str, cache_info: dict[str, str]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        names = ["engine", "model_name"]
        values = {"engine": "0", "model_name": served}

        def family(kind: Any, name: str, doc: str, **kw: Any) -> Any:
            return kind(name, doc, names, registry=self.registry, **kw).labels(**values)

        self.running = family(Gauge, "vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = family(Gauge, "vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = family(Gauge, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prefix_queries = family(Counter, "vllm:prefix_cache_queries",
                                     "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_hits = family(Counter, "vllm:prefix_cache_hits",
                                  "Prefix cache hits, in terms of number of cached tokens.")
        self.preemptions = family(Counter, "vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prompt_tokens = family(Counter, "vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = family(Counter, "vllm:generation_tokens", "Number of generation tokens processed.")
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               [*names, "finished_reason"], registry=self.registry).labels(**values, finished_reason="stop")
        self.ttft = family(Histogram, "vllm:time_to_first_token_seconds",
                           "Histogram of time to first token in seconds.", buckets=TTFT_BUCKETS)
        self.e2e = family(Histogram, "vllm:e2e_request_latency_seconds",
                          "Histogram of e2e request latency in seconds.", buckets=E2E_BUCKETS)
        self.itl = family(Histogram, "vllm:inter_token_latency_seconds",
                          "Histogram of inter-token latency in seconds.", buckets=ITL_BUCKETS)
        info = Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", list(cache_info),
                     registry=self.registry)
        info.labels(**cache_info).set(1)

    def text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


@dataclass
class State:
    model: str
    served: str
    max_model_len: int
    num_gpu_blocks: int
    block_size: int
    gpu_util: float
    kv_dtype: str
    enable_lora: bool
    max_loras: int
    max_lora_rank: int
    api_key: str | None
    loras: dict[str, str] = field(default_factory=dict)  # name -> path
    running: int = 0
    waiting: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    figures: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.figures = Metrics(self.served, {
            "block_size": str(self.block_size), "cache_dtype": self.kv_dtype, "enable_prefix_caching": "True",
            "engine": "0", "gpu_memory_utilization": str(self.gpu_util), "num_gpu_blocks": str(self.num_gpu_blocks),
            "simulated": "true"})

    def record(self, prompt: int, gen: int, ttft: float, e2e: float, rng: random.Random) -> None:
        f = self.figures
        f.prompt_tokens.inc(prompt)
        f.generation_tokens.inc(gen)
        f.prefix_queries.inc(prompt)
        f.prefix_hits.inc(int(prompt * rng.uniform(0.3, 0.7)))
        f.success.inc()
        f.ttft.observe(ttft)
        f.e2e.observe(e2e)
        for _ in range(min(gen, 20)):
            f.itl.observe(max(0.001, (e2e - ttft) / max(gen, 1) * rng.uniform(0.8, 1.2)))
        if rng.random() < 0.002:
            f.preemptions.inc()

    def metrics(self) -> str:
        with self.lock:
            running, waiting = self.running, self.waiting
        self.figures.running.set(running)
        self.figures.waiting.set(waiting)
        self.figures.kv_usage.set(min(0.99, (running * 600) / max(1, self.num_gpu_blocks * self.block_size)))
        return self.figures.text()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllm (simulated)")
    p.add_argument("command", choices=["serve"])
    p.add_argument("model")
    p.add_argument("--host", default="127.0.0.1")  # the demo's stand-in never listens beyond this host
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--quantization")
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--max-loras", type=int, default=1)
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--lora-modules", nargs="+", default=[])
    p.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY") or None)  # as vLLM: the flag, else VLLM_API_KEY
    p.add_argument("--num-gpu-blocks-override", type=int)
    args, _unknown = p.parse_known_args(argv)  # vLLM has hundreds of flags; the rest are accepted
    return args


def log(msg: str, level: str = "INFO") -> None:
    stamp = time.strftime("%m-%d %H:%M:%S")
    print(f"{level} {stamp} [simulated vllm] {msg}", flush=True)


def build_app(state: State) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    rng = random.Random(7)

    def error(status: int, message: str, type_: str) -> JSONResponse:
        # vLLM 0.32's ErrorResponse (vllm/entrypoints/serve/engine/protocol.py); the contract test holds it
        return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": status}},
                            status_code=status)

    def unauthorised(request: Request) -> Response | None:
        if state.api_key and request.headers.get("authorization") != f"Bearer {state.api_key}":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return None

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def models(request: Request) -> Response:
        if (r := unauthorised(request)) is not None:
            return r
        created = int(time.time())
        data = [{"id": state.served, "object": "model", "created": created, "owned_by": "vllm", "root": state.model,
                 "parent": None, "max_model_len": state.max_model_len}]
        for name, path in state.loras.items():
            data.append({"id": name, "object": "model", "created": created, "owned_by": "vllm", "root": path,
                         "parent": state.served, "max_model_len": None})
        return JSONResponse({"object": "list", "data": data})

    async def chat(request: Request) -> Response:
        if (r := unauthorised(request)) is not None:
            return r
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return error(400, "Invalid JSON body", "BadRequestError")
        model = body.get("model")
        if model not in (state.served, *state.loras):
            return error(404, f"The model `{model}` does not exist.", "NotFoundError")
        n = int(body.get("max_tokens") or 16)
        n = max(1, min(n, 64))
        start = time.perf_counter()
        with state.lock:
            state.running += 1
        await asyncio.sleep(0.005 + 0.001 * n)
        with state.lock:
            state.running -= 1
        prompt = sum(len(str(m.get("content", ""))) for m in body.get("messages", [])) // 4 + 8
        e2e = time.perf_counter() - start
        state.record(prompt, n, e2e * 0.3, e2e, rng)
        tokens = [f" tok{i}" for i in range(n)]
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": "".join(tokens).strip(),
                                                         "tool_calls": []}, "finish_reason": "length", "stop_reason": None}
        if body.get("logprobs"):
            top = int(body.get("top_logprobs") or 0)
            choice["logprobs"] = {"content": [
                {"token": t, "logprob": -abs(rng.gauss(0.05, 0.1)), "bytes": list(t.encode()),
                 "top_logprobs": [{"token": t, "logprob": -0.05, "bytes": list(t.encode())}] * top}
                for t in tokens]}
        return JSONResponse({"id": f"chatcmpl-sim-{rng.randrange(1 << 40):x}", "object": "chat.completion",
                             "created": int(time.time()), "model": model, "choices": [choice],
                             "usage": {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n},
                             "system_fingerprint": "fleetdeck-simulated-vllm"})

    async def load_lora(request: Request) -> Response:
        if (r := unauthorised(request)) is not None:
            return r
        body = await request.json()
        name, path = body.get("lora_name"), body.get("lora_path")
        if not state.enable_lora:
            return error(400, "LoRA is not enabled. Please start the server with --enable-lora.", "BadRequestError")
        if not name or not path:
            return error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if name in state.loras:
            return error(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
        cfg = Path(path) / "adapter_config.json"
        if not cfg.is_file():
            return error(400, f"Loading lora {name} failed: No adapter found for {path}", "BadRequestError")
        try:
            rank = int(json.loads(cfg.read_text()).get("r", 0))
        except (ValueError, json.JSONDecodeError):
            return error(400, f"Loading lora {name} failed: invalid adapter_config.json", "BadRequestError")
        if rank > state.max_lora_rank:  # vLLM 0.32's worker refuses it, and the API answers 500
            return error(500, f"Call to add_lora method failed: Worker failed with error 'LoRA rank {rank} is greater "
                              f"than max_lora_rank {state.max_lora_rank}.', please check the stack trace above for the "
                              "root cause", "InternalServerError")
        if len(state.loras) >= max(state.max_loras, 1) * 8:
            return error(400, "Too many LoRA adapters loaded.", "BadRequestError")
        state.loras[name] = path
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(request: Request) -> Response:
        if (r := unauthorised(request)) is not None:
            return r
        body = await request.json()
        name = body.get("lora_name")
        if name not in state.loras:
            return error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del state.loras[name]
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics(), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[
        Route("/health", health), Route("/v1/models", models), Route("/metrics", metrics),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/load_lora_adapter", load_lora, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload_lora, methods=["POST"]),
    ])


def _synthetic_load(state: State, rate: float) -> None:
    rng = random.Random(3)
    t0 = time.time()
    while True:
        time.sleep(1.0)
        wave = 1 + 0.5 * math.sin((time.time() - t0) / 30)
        n = max(0, int(rng.gauss(rate * wave, math.sqrt(rate))))
        with state.lock:
            state.running = max(0, int(n * 0.6))
            state.waiting = max(0, int(n * 0.05 * rng.random()))
        for _ in range(n):
            ttft = rng.lognormvariate(math.log(0.05), 0.5)
            state.record(rng.randint(100, 900), rng.randint(20, 300), ttft, ttft + rng.lognormvariate(math.log(1.5), 0.5), rng)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = parse_args(sys.argv[1:] if argv is None else argv)
    served = args.served_model_name[0] if args.served_model_name else args.model
    log(f"vLLM API server version 0.32.0 (simulated by fleetdeck); args: {' '.join(sys.argv[1:])}")
    log(f"Initializing a V1 LLM engine with config: model='{args.model}', max_seq_len={args.max_model_len}, "
        f"tensor_parallel_size={args.tensor_parallel_size}, kv_cache_dtype={args.kv_cache_dtype}")
    time.sleep(float(os.environ.get("FLEETDECK_SIM_START_DELAY", "1.0")))
    crash = os.environ.get("FLEETDECK_SIM_CRASH")
    if crash == "model_missing" or (args.model.startswith("/") and not Path(args.model).exists()):
        log(CRASH_LOGS["model_missing"].format(model=args.model), "ERROR")
        return 1
    if crash in CRASH_LOGS:
        log("Traceback (most recent call last):", "ERROR")
        print(CRASH_LOGS[crash], flush=True)
        return 1
    blocks = args.num_gpu_blocks_override or int(os.environ.get("FLEETDECK_SIM_NUM_GPU_BLOCKS", "29751"))
    log(f"GPU KV cache size: {blocks * 16:,} tokens")
    log(f"Maximum concurrency for {args.max_model_len:,} tokens per request: {blocks * 16 / args.max_model_len:.2f}x")
    state = State(args.model, served, args.max_model_len, blocks, 16, args.gpu_memory_utilization, args.kv_cache_dtype,
                  args.enable_lora, args.max_loras, args.max_lora_rank, args.api_key)
    for spec in args.lora_modules:
        name, _, path = spec.partition("=")
        state.loras[name] = path
    load = float(os.environ.get("FLEETDECK_SIM_LOAD", "0") or 0)
    if load > 0:
        threading.Thread(target=_synthetic_load, args=(state, load), daemon=True).start()
    crash_after = float(os.environ.get("FLEETDECK_SIM_CRASH_AFTER", "0") or 0)
    if crash_after > 0:
        def die() -> None:
            time.sleep(crash_after)
            log("Traceback (most recent call last):", "ERROR")
            print(ENGINE_DIED_LOG.format(stamp=time.strftime("%m-%d %H:%M:%S")), flush=True)
            os._exit(1)
        threading.Thread(target=die, daemon=True).start()
    log(f"Starting vLLM API server 0 on http://{args.host}:{args.port}")
    config = uvicorn.Config(build_app(state), host=args.host, port=args.port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit as exc:
        return int(exc.code or 1)
    return 0 if server.started else 1


if __name__ == "__main__":
    raise SystemExit(main())
