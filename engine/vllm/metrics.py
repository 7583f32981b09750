"""vLLM's Prometheus metrics: parsed with prometheus_client, rates from counter deltas between two
scrapes, quantiles from histogram bucket deltas. Current and older metric names are both accepted."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# Each figure: the names vLLM has used for it, newest first.
NAMES = {
    "running": ("vllm:num_requests_running",),
    "waiting": ("vllm:num_requests_waiting",),
    "kv_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "prompt_tokens": ("vllm:prompt_tokens", "vllm:prompt_tokens_total"),
    "generation_tokens": ("vllm:generation_tokens", "vllm:generation_tokens_total"),
    "preemptions": ("vllm:num_preemptions", "vllm:num_preemptions_total"),
    "prefix_queries": ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"),
    "prefix_hits": ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"),
    "prefix_hit_rate": ("vllm:gpu_prefix_cache_hit_rate",),
    "ttft": ("vllm:time_to_first_token_seconds",),
    "e2e": ("vllm:e2e_request_latency_seconds",),
    "itl": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
}


@dataclass
class Scrape:
    at: float
    values: dict[str, float] = field(default_factory=dict)  # gauges and counters, summed over label sets
    buckets: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # histogram: (le, cumulative)
    num_gpu_blocks: int | None = None
    block_size: int | None = None


def parse(text: str, at: float) -> Scrape:
    """Sum every series of each figure (one per engine/model label set)."""
    by_name: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        by_name[family.name] = family
    s = Scrape(at)
    for key, names in NAMES.items():
        for name in names:
            fam = by_name.get(name) or by_name.get(name.removesuffix("_total"))
            if fam is None:
                continue
            if fam.type == "histogram":
                les: dict[float, float] = {}
                for sample in fam.samples:
                    if sample.name.endswith("_bucket"):
                        le = float(sample.labels["le"])
                        les[le] = les.get(le, 0.0) + sample.value
                s.buckets[key] = sorted(les.items())
            else:
                total = sum(x.value for x in fam.samples if not x.name.endswith("_created"))
                s.values[key] = total
            break
    info = by_name.get("vllm:cache_config_info")
    if info is not None:
        for sample in info.samples:
            blocks = sample.labels.get("num_gpu_blocks")
            if blocks and blocks.isdigit():
                s.num_gpu_blocks = int(blocks)
            size = sample.labels.get("block_size")
            if size and size.isdigit():
                s.block_size = int(size)
    return s


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Linear interpolation inside the bucket holding the q-quantile, as Prometheus' histogram_quantile."""
    if not buckets:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


def _delta_buckets(new: list[tuple[float, float]], old: list[tuple[float, float]] | None) -> list[tuple[float, float]]:
    if not old or len(old) != len(new):
        return new
    out = [(le, c - oc) for (le, c), (_, oc) in zip(new, old)]
    return new if any(c < 0 for _, c in out) else out  # a restarted server resets its counters


@dataclass
class ServerFigures:
    generation_tps: float | None = None
    prompt_tps: float | None = None
    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None  # 0..1
    ttft_p50: float | None = None
    ttft_p95: float | None = None
    e2e_p50: float | None = None
    e2e_p95: float | None = None
    itl_p50: float | None = None
    preemptions: float | None = None
    prefix_hit_rate: float | None = None  # 0..1
    num_gpu_blocks: int | None = None
    kv_tokens: int | None = None


def figures(new: Scrape, old: Scrape | None) -> ServerFigures:
    f = ServerFigures(running=new.values.get("running"), waiting=new.values.get("waiting"),
                      kv_usage=new.values.get("kv_usage"), preemptions=new.values.get("preemptions"),
                      num_gpu_blocks=new.num_gpu_blocks)
    if new.num_gpu_blocks is not None:
        f.kv_tokens = new.num_gpu_blocks * (new.block_size or 16)
    dt = new.at - old.at if old else 0.0
    if old and dt > 0:
        for key, attr in (("generation_tokens", "generation_tps"), ("prompt_tokens", "prompt_tps")):
            if key in new.values and key in old.values:
                d = new.values[key] - old.values[key]
                setattr(f, attr, d / dt if d >= 0 else None)
        if "prefix_queries" in new.values and "prefix_queries" in old.values:
            dq = new.values["prefix_queries"] - old.values["prefix_queries"]
            dh = new.values.get("prefix_hits", 0) - old.values.get("prefix_hits", 0)
            f.prefix_hit_rate = dh / dq if dq > 0 else None
    if f.prefix_hit_rate is None and "prefix_hit_rate" in new.values:
        f.prefix_hit_rate = new.values["prefix_hit_rate"]
    for key, p50, p95 in (("ttft", "ttft_p50", "ttft_p95"), ("e2e", "e2e_p50", "e2e_p95"), ("itl", "itl_p50", None)):
        if key in new.buckets:
            b = _delta_buckets(new.buckets[key], old.buckets.get(key) if old else None)
            if not b or b[-1][1] <= 0:
                b = new.buckets[key]  # nothing new since the last scrape: the lifetime distribution
            setattr(f, p50, quantile(b, 0.5))
            if p95:
                setattr(f, p95, quantile(b, 0.95))
    return f
