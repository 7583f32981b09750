"""The planner's verdict as text: the breakdown vLLM would log, and why it would fail."""

from __future__ import annotations

from typing import Any


def _g(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} GiB"


def budget_lines(r: Any) -> list[str]:
    """Where the GPU's memory goes, as vLLM's start-up accounts for it, down to the KV blocks: the CLI's
    text and the Fit screen's breakdown both show these lines."""
    lines = [
        f"  GPU memory          {_g(r.total_gpu_memory_gib)} x {r.gpu_memory_utilization} = {_g(r.budget_gib)}",
        f"  - weights per GPU   {_g(r.weights_gib)}{'' if r.weights_exact else ' (estimated from the shape)'}",
        f"  - activation peak   {_g(r.activation_gib)}",
        f"  - non-torch         {_g(r.non_torch_gib)}" + (f" + {_g(r.tp_non_torch_gib)} TP buffers" if r.tp_non_torch_gib else ""),
    ]
    if r.cuda_graph_in_budget:
        lines.append(f"  - CUDA graphs       {_g(r.cuda_graph_gib)} (in the budget: vLLM {r.vllm_version_modelled})")
    lines += [
        f"  = KV cache          {_g(r.available_kv_gib)}" + (
            f", at least {_g(r.available_kv_gib_low)} (the verdict's figure)" if r.low_margin_gib else ""),
        f"  KV per token        {r.kv_bytes_per_token:,.0f} B per GPU",
        f"  blocks x size       {r.num_gpu_blocks:,} x {r.block_size} = {r.kv_tokens:,} tokens",
    ]
    return lines


def render_text(r: Any) -> str:
    lines = [f"{r.model}  ({r.quantization}, KV {r.kv_cache_dtype}, TP {r.tensor_parallel_size})", *budget_lines(r),
             f"  max concurrency     {r.max_concurrency:.2f}x at {r.max_model_len:,} tokens per request",
             f"  largest context     {r.max_model_len_that_fits:,} tokens for one request"]
    if r.cuda_graph_gib is not None and not r.cuda_graph_in_budget:
        lines.append(f"  CUDA graphs         {_g(r.cuda_graph_gib)} (from the headroom outside the utilisation target)")
    lines.append("  verdict             " + ("FITS" if r.fits else "DOES NOT FIT"))
    if r.reason:
        lines.append(f"  why: {r.reason}")
    for w in r.warnings:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)
