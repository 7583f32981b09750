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
        *lora_lines(r),
        f"  - activation peak   {_g(r.activation_gib)}",
        f"  - non-torch         {_g(r.non_torch_gib)}" + (f" + {_g(r.tp_non_torch_gib)} TP buffers" if r.tp_non_torch_gib else ""),
    ]
    if r.cuda_graph_in_budget:
        twice = ", captured with and without LoRA" if getattr(r, "lora_settings", "") else ""
        lines.append(f"  - CUDA graphs       {_g(r.cuda_graph_gib)} (in the budget: vLLM {r.vllm_version_modelled}{twice})")
    lines += [
        f"  = KV cache          {_g(r.available_kv_gib)}" + (
            f", at least {_g(r.available_kv_gib_low)} (the verdict's figure)" if r.low_margin_gib else ""),
        f"  KV per token        {r.kv_bytes_per_token:,.0f} B per GPU",
        f"  blocks x size       {r.num_gpu_blocks:,} x {r.block_size} = {r.kv_tokens:,} tokens",
    ]
    return lines


def lora_lines(r: Any) -> list[str]:
    """The LoRA slots' buffers (--enable-lora), named with their slots, rank and layers; nothing without LoRA."""
    if not getattr(r, "lora_settings", ""):
        return []
    explicit = " (beside the KV cache given)" if r.budget_gib is None else ""
    return [f"  - LoRA slots        {_g(r.lora_gib)}{explicit}: {r.lora_settings} ({r.lora_modules}); "
            f"host RAM up to {_g(r.lora_host_gib)} per worker (max_cpu_loras adapters at this rank)"]


def length_line(r: Any) -> str:
    """The length planned, and where it comes from (given, or vLLM's default for the model) and its limit."""
    limit = "no limit in its config" if r.model_max_model_len is None else f"model limit {r.model_max_model_len:,}"
    source = "given" if r.max_model_len_given else "vLLM's default for this model"
    return f"  max_model_len       {r.max_model_len:,} tokens ({source}; {limit})"


def verdict_lines(r: Any) -> list[str]:
    """FITS with its capacity, or DOES NOT FIT with why and the nearest setting that fits. A failed plan shows
    no concurrency or context figure: vLLM would not start, so none of them would be true."""
    if r.fits:
        return [
            f"  max concurrency     {r.max_concurrency_low:.2f}-{r.max_concurrency:.2f}x requests of {r.max_model_len:,} tokens",
            f"  largest context     {r.max_model_len_that_fits:,} tokens for one request at this utilisation",
            "  verdict             FITS",
        ]
    lines = ["  verdict             DOES NOT FIT", f"  why: {r.reason}"]
    if r.fitting_max_model_len and r.budget_gib is None:  # a KV size was given: no utilisation to change
        lines.append(f"  fits with:          max_model_len {r.fitting_max_model_len:,}")
    elif r.fitting_max_model_len:
        lines.append(f"  fits with:          gpu_memory_utilization {r.fitting_gpu_memory_utilization:.2f}, "
                     f"max_model_len {r.fitting_max_model_len:,}")
    else:
        lines.append("  fits with:          no setting of max_model_len or gpu_memory_utilization on this GPU")
    if getattr(r, "fitting_max_loras", None):
        lines.append(f"  or with LoRA:       max_loras {r.fitting_max_loras} (the rest as given)")
    return lines


def render_text(r: Any) -> str:
    lines = [f"{r.model}  ({r.quantization}, KV {r.kv_cache_dtype}, TP {r.tensor_parallel_size})", length_line(r),
             *budget_lines(r)]
    if r.cuda_graph_gib is not None and not r.cuda_graph_in_budget:
        lines.append(f"  CUDA graphs         {_g(r.cuda_graph_gib)} (from the headroom outside the utilisation target)")
    lines += verdict_lines(r)
    for w in r.warnings:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)
