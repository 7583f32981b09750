"""vLLM's KV-cache arithmetic, done before anything is launched.

    budget       = total GPU memory x gpu_memory_utilization
    available_kv = budget - weights - activation peak - non-torch memory
    num_blocks   = available_kv // (page bytes per layer x layers per KV group)
    kv_tokens    = num_blocks // KV groups x block size
    concurrency  = num_blocks / blocks one request of max_model_len needs

Layers are grouped the way vLLM V1's hybrid allocator groups them (full attention and sliding window
layers in equal-sized groups sharing one block pool), so sliding-window models (Gemma 2/3, gpt-oss)
get vLLM's capacity, not the full-attention worst case.

The overhead model (activation peak, non-torch memory, CUDA graphs) is in overhead.py, stated in
OVERHEAD_MODEL and in docs/kvfit.md, with how close it comes to published vLLM start-up logs; the KV
cache's geometry (bytes per token, KV groups, blocks per request) is in kv_cache.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from engine.kvfit.arch import ModelArch
from engine.kvfit.lora import LORA_CUDA_GRAPH_FACTOR, LoraMemory, LoraSettings, layer_names, lora_memory, lora_refusal
from engine.kvfit.kv_cache import (blocks_per_request, kv_bytes_per_token_per_layer, kv_dtype_bytes, kv_groups,
                                   max_len_that_fits)
from engine.kvfit.overhead import (ACTIVATION_FIXED_BYTES, ACTIVATION_PER_LOGIT_BYTES, CUDA_GRAPH_BYTES_PER_LAYER,
                                   CUDA_GRAPHS_IN_BUDGET_SINCE, GIB, LOW_ACTIVATION_SHARE, LOW_FLOOR_BYTES,
                                   LOW_WEIGHTS_SHARE, NON_TORCH_BYTES, OVERHEAD_MODEL, TP_NON_TORCH_BYTES,
                                   V0_MLP_BYTES_PER_TOKEN_PER_INTERMEDIATE, VLLM_VERSION_MODELLED, default_batch,
                                   version_tuple)
from engine.kvfit.weights import estimated_weight_bytes, weight_bytes_per_gpu
FIT_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)


@dataclass
class FitRequest:
    gpu_memory_bytes: int | None = None  # total memory vLLM sees on each GPU
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    max_model_len: int | None = None  # None: vLLM's default for the model (ModelArch.default_max_model_len)
    kv_cache_dtype: str = "auto"
    block_size: int = 16
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    available_kv_bytes: int | None = None  # skip the overhead estimate (checks the KV arithmetic alone)
    free_memory_bytes: int | None = None  # live free memory of the tightest chosen GPU, when known
    other_process_bytes: int | None = None  # memory other processes hold there
    gpu_name: str = ""
    engine: Literal["v1", "v0"] = "v1"
    weight_bytes_total: int | None = None  # exact, from safetensors headers
    notes: list[str] = field(default_factory=list)  # said with the verdict (e.g. which MIG slice was planned)
    vllm_version: str = VLLM_VERSION_MODELLED  # where vLLM's accounting changed (CUDA graphs in the budget)
    enforce_eager: bool = False  # no CUDA graphs at all
    kv_cache_memory_bytes: int | None = None  # vLLM's --kv-cache-memory-bytes: the KV size, no profiling
    allow_long_max_model_len: bool = False  # VLLM_ALLOW_LONG_MAX_MODEL_LEN=1: vLLM warns past the limit, not refuses
    lora: LoraSettings | None = None  # --enable-lora with these slots and rank (None: LoRA off)


@dataclass
class FitResult:
    model: str
    quantization: str
    kv_cache_dtype: str
    tensor_parallel_size: int
    kv_bytes_per_token: float  # per GPU, all KV layers
    weights_gib: float  # per GPU
    weights_exact: bool
    total_gpu_memory_gib: float | None
    gpu_memory_utilization: float
    budget_gib: float | None
    activation_gib: float | None
    non_torch_gib: float | None
    cuda_graph_gib: float | None
    available_kv_gib: float
    available_kv_gib_low: float  # the lower bound the verdict is decided on
    num_gpu_blocks: int
    block_size: int
    kv_tokens: int
    max_concurrency: float
    max_model_len: int  # the length planned: the one given, or vLLM's default for the model
    fits: bool
    reason: str | None
    max_model_len_that_fits: int  # the largest length that works with every other setting as given (0: none)
    max_num_seqs: int
    max_num_batched_tokens: int
    warnings: list[str] = field(default_factory=list)
    overhead_model: str = OVERHEAD_MODEL
    num_gpu_blocks_low: int = 0
    kv_tokens_low: int = 0
    max_concurrency_low: float = 0.0
    tp_non_torch_gib: float | None = None
    cuda_graph_in_budget: bool = False
    low_margin_gib: float = 0.0
    vllm_version_modelled: str = VLLM_VERSION_MODELLED
    # The model's own context limit as vLLM derives it (None: its config names none) and whether the length
    # planned was given or is vLLM's default for the model.
    model_max_model_len: int | None = None
    max_model_len_given: bool = True
    # DOES NOT FIT: the nearest setting that fits on the same GPU (None: no utilisation / no length fits);
    # FITS: the request's own.
    fitting_gpu_memory_utilization: float | None = None
    fitting_max_model_len: int | None = None
    # --enable-lora: the slots' stacked A/B buffers per GPU (out of the KV budget), the settings, the layers that
    # get buffers, and the host RAM of max_cpu_loras adapters per worker. None / "" without LoRA.
    lora_gib: float | None = None
    lora_settings: str = ""
    lora_modules: str = ""
    lora_host_gib: float | None = None
    # DOES NOT FIT with LoRA: the most slots (at the same rank) with which everything else as given fits
    fitting_max_loras: int | None = None

    @property
    def verdict(self) -> str:
        return "FITS" if self.fits else "DOES NOT FIT"

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, **asdict(self)}


def plan(arch: ModelArch, req: FitRequest) -> FitResult:
    """vLLM's verdict on `req` for `arch`, with one meaning: FITS means vLLM starts and holds at least one
    request of the planned length (on the lower bound); DOES NOT FIT carries vLLM's reason, the nearest setting
    that fits on the same GPU (or that none does), and no concurrency figure (vLLM would hold no request)."""
    r = _plan(arch, req)
    if r.fits:
        r.fitting_gpu_memory_utilization, r.fitting_max_model_len = r.gpu_memory_utilization, r.max_model_len
        return r
    util, length, advice = _nearest_fit(arch, req, r)
    r.fitting_gpu_memory_utilization, r.fitting_max_model_len = util, length
    if advice:
        r.reason = f"{r.reason} {advice}"
    r.fitting_max_loras = _lora_slots_that_fit(arch, req)
    if r.fitting_max_loras and req.lora is not None:
        r.reason = (f"{r.reason} Or keep every other setting with max_loras {r.fitting_max_loras} "
                    f"(rank {req.lora.max_lora_rank}).")
    r.max_concurrency = r.max_concurrency_low = 0.0
    return r


def _lora_slots_that_fit(arch: ModelArch, req: FitRequest) -> int | None:
    """The most LoRA slots (at the rank asked) with which the request fits as given, for one that does not
    (None: LoRA is off, or not even one slot fits). Fewer slots never leave less KV cache, so it is a bisection."""
    lora = req.lora
    if lora is None or lora.max_loras <= 1:
        return None

    def fits(n: int) -> bool:
        return _plan(arch, replace(req, lora=replace(lora, max_loras=n,
                                                     max_cpu_loras=max(n, lora.max_cpu_loras or n)))).fits

    if not fits(1):
        return None
    lo, hi = 1, lora.max_loras - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


# The highest utilisation the planner suggests: vLLM accepts up to 1.0, but the driver, other CUDA contexts and
# fragmentation need a little room that the estimate does not see.
MAX_SUGGESTED_UTIL = 0.98


def _nearest_fit(arch: ModelArch, req: FitRequest, r: FitResult) -> tuple[float | None, int | None, str]:
    """(utilisation, length, advice) of the nearest setting that fits, for a request that does not. Only
    settings the planner has checked are suggested: a lower length at the same utilisation first, then the
    utilisation (capped by what is free beside other processes) that holds the length, then both."""
    total = req.gpu_memory_bytes
    given = req.max_model_len is not None
    cap = None if req.allow_long_max_model_len else r.model_max_model_len
    length = min(r.max_model_len, cap or r.max_model_len)  # never suggest past the model's limit
    if (not tp_splits(arch, r.tensor_parallel_size) or (r.reason or "").startswith("max_num_batched_tokens (")
            or (r.reason or "").startswith(("When using LoRA, vocab size", "--fully-sharded-loras splits",
                                            "CUDA out of memory allocating the KV cache given"))
            or (total is not None and (r.weights_gib + (r.lora_gib or 0)) * GIB > total)):
        return None, None, ""  # no memory setting helps: the reason names the fix (TP, batch, quantization)
    top = MAX_SUGGESTED_UTIL
    if total is not None and req.free_memory_bytes is not None:
        top = min(top, math.floor((req.free_memory_bytes / total - 0.01) * 100) / 100)

    def at(util: float, n: int | None = None) -> FitResult:
        return _plan(arch, replace(req, gpu_memory_utilization=util, max_model_len=n if n is not None else length))

    def smallest_util_holding_length() -> float | None:
        """The smallest utilisation (in hundredths, up to `top`) that holds `length`: feasibility grows with it."""
        if total is None or top <= 0 or not at(top).fits:
            return None
        lo, hi = 1, round(top * 100)
        while lo < hi:
            mid = (lo + hi) // 2
            if at(mid / 100).fits:
                hi = mid
            else:
                lo = mid + 1
        return lo / 100

    if r.max_model_len_that_fits > 0:  # the same utilisation holds a shorter context
        fit = r.max_model_len_that_fits
        advice = f"The largest setting that fits: max_model_len {fit:,}"
        if total is None:  # a KV size was given: the length is the only setting
            return None, fit, advice + "."
        advice += f" at gpu_memory_utilization {r.gpu_memory_utilization}"
        util = smallest_util_holding_length() if length > fit else None
        if util is not None and util > r.gpu_memory_utilization:
            advice += f"; or gpu_memory_utilization {util:.2f} for max_model_len {length:,}"
        return r.gpu_memory_utilization, fit, advice + "."
    if total is None:  # an explicit KV size: no utilisation to change
        return None, None, "No max_model_len fits in that KV cache size."
    if top <= 0:
        return None, None, "No gpu_memory_utilization fits beside what the other processes hold: free the GPU or pick another."

    best = at(top)
    if not best.fits and best.max_model_len_that_fits <= 0:
        free = "" if req.free_memory_bytes is None else f" ({req.free_memory_bytes / GIB:.2f} GiB free)"
        return None, None, (
            f"No gpu_memory_utilization fits on this GPU{free}: even at {top:.2f} the weights and runtime leave no "
            "room for one request. Use a quantized checkpoint, more GPUs (--tp), or another GPU"
            + (f"; or give LoRA fewer slots or a lower rank ({req.lora.label} takes {(r.lora_gib or 0):.2f} GiB)."
               if req.lora is not None else ".")
        )
    if best.fits:
        util = smallest_util_holding_length() or top
        if req.free_memory_bytes is not None and req.free_memory_bytes < total * req.gpu_memory_utilization:
            util = top  # beside another process: as much as is free (the most KV cache)
        what = f"max_model_len {length:,}" if given else f"the model's default max_model_len {length:,}"
        return util, length, f"The nearest setting that fits: gpu_memory_utilization {util:.2f} ({what})."
    fit = best.max_model_len_that_fits
    return top, fit, f"The nearest setting that fits: gpu_memory_utilization {top:.2f} with max_model_len {fit:,}."


def tp_splits(arch: ModelArch, tp: int) -> bool:
    """Whether vLLM can split this model's attention over `tp` ranks: the query heads evenly
    (ModelConfig.verify_with_parallel_config, before anything loads) and, for grouped-query attention, the KV
    heads evenly or each replicated a whole number of times (the assertions in every model's attention layer,
    e.g. LlamaAttention, while the weights load). MLA keeps one latent per token, not per KV head."""
    if arch.num_heads % tp:
        return False
    kv = arch.num_kv_heads
    return arch.is_mla or (kv % tp == 0 if kv >= tp else tp % kv == 0)


def _tp_reason(arch: ModelArch, tp: int) -> str:
    good = ", ".join(str(n) for n in range(1, min(arch.num_heads, 16) + 1) if tp_splits(arch, n))
    if arch.num_heads % tp:
        return (f"Total number of attention heads ({arch.num_heads}) must be divisible by tensor parallel size "
                f"({tp}): vLLM refuses to start. Use --tp {good}.")
    kv = arch.num_kv_heads
    what = f"{kv} is not divisible by {tp}" if kv >= tp else f"{tp} is not divisible by {kv}"
    return (f"The {kv} KV heads cannot be split over tensor parallel size {tp} ({what}): vLLM fails an assertion "
            f"while loading the model. Use --tp {good}.")


def _plan(arch: ModelArch, req: FitRequest) -> FitResult:
    tp = max(1, req.tensor_parallel_size)
    total = req.gpu_memory_bytes
    if req.available_kv_bytes is None and req.kv_cache_memory_bytes is None and total is None:
        raise ValueError("give the GPU's total memory (--gpu or --gpu-memory-gib) or --available-kv-gib")
    length = req.max_model_len if req.max_model_len is not None else arch.default_max_model_len
    seqs_default, batched_default = default_batch(total or 80 * GIB, req.gpu_name)
    seqs = req.max_num_seqs or seqs_default
    # vLLM caps its default batch at max_num_seqs x max_model_len (EngineArgs._set_default_max_num_seqs_and_
    # batched_tokens_args, 0.32); a batch given is taken as given.
    batched = req.max_num_batched_tokens or min(batched_default, seqs * max(1, length))
    # vLLM refuses a batch below max_num_seqs; without a GPU (a KV size given) the default max_num_seqs is a guess,
    # and a guess refuses nothing.
    batch_refused = batched < seqs and (req.max_num_seqs is not None or total is not None)
    if req.engine == "v0":
        batched = max(length, batched)

    exact = req.weight_bytes_total is not None
    weights_total = req.weight_bytes_total if exact else estimated_weight_bytes(arch)
    weights = weight_bytes_per_gpu(weights_total, arch, tp)  # type: ignore[arg-type]
    lora: LoraMemory | None = lora_memory(arch, req.lora, tp, batched) if req.lora is not None else None
    lora_bytes = lora.buffers if lora is not None else 0
    lora_refused = lora_refusal(arch, req.lora, tp) if req.lora is not None else None
    # --kv-cache-memory-bytes with the GPU's size known: vLLM allocates that much after the weights (and LoRA's
    # buffers) whatever the utilisation says, so more than the GPU holds is CUDA out of memory at start-up.
    explicit_kv = req.kv_cache_memory_bytes if req.available_kv_bytes is None and req.kv_cache_memory_bytes else 0
    kv_overflows = bool(total is not None and explicit_kv and weights + lora_bytes + explicit_kv
                        + NON_TORCH_BYTES[req.engine] + (TP_NON_TORCH_BYTES if tp > 1 else 0) > total)

    per_layer = kv_bytes_per_token_per_layer(arch, tp, req.kv_cache_dtype)
    groups = kv_groups(arch)
    page_bytes = req.block_size * per_layer
    warnings: list[str] = list(req.notes)
    if lora is not None and req.lora is not None and lora.buffers == 0:
        warnings.append(f"--lora-target-modules {' '.join(req.lora.target_modules or ())} names no LoRA-capable layer "
                        f"of this model ({', '.join(layer_names(arch))}): no adapter could apply anywhere")
    reason: str | None = None

    activation = non_torch = cuda_graph = budget = tp_non_torch = None
    graphs_in_budget = False
    margin = 0.0
    explicit = req.available_kv_bytes if req.available_kv_bytes is not None else req.kv_cache_memory_bytes
    if explicit is not None:
        available = float(explicit)  # given: nothing to estimate, so the lower bound is the figure itself
    else:
        assert total is not None
        budget = total * req.gpu_memory_utilization
        activation = ACTIVATION_FIXED_BYTES + ACTIVATION_PER_LOGIT_BYTES * seqs * arch.vocab_size
        if lora is not None:
            activation += lora.activation
        if req.engine == "v0":
            activation += V0_MLP_BYTES_PER_TOKEN_PER_INTERMEDIATE * batched * max(arch.intermediate_size, arch.moe_intermediate_size)
        non_torch = NON_TORCH_BYTES[req.engine]
        tp_non_torch = TP_NON_TORCH_BYTES if tp > 1 else 0
        cuda_graph = 0 if req.enforce_eager else CUDA_GRAPH_BYTES_PER_LAYER * arch.num_layers * (2 if arch.is_moe else 1)
        if lora is not None:
            cuda_graph *= LORA_CUDA_GRAPH_FACTOR
        graphs_in_budget = req.engine == "v1" and version_tuple(req.vllm_version) >= CUDA_GRAPHS_IN_BUDGET_SINCE
        available = (budget - weights - lora_bytes - activation - non_torch - tp_non_torch
                     - (cuda_graph if graphs_in_budget else 0))
        margin = LOW_FLOOR_BYTES + LOW_WEIGHTS_SHARE * weights + LOW_ACTIVATION_SHARE * activation + tp_non_torch
        headroom = total - budget
        if cuda_graph and not graphs_in_budget and cuda_graph > headroom:
            warnings.append(
                f"CUDA graphs (~{cuda_graph / GIB:.2f} GiB) may not fit in the {headroom / GIB:.2f} GiB left "
                f"outside gpu_memory_utilization: lower it, or add --enforce-eager"
            )
    low = available - margin

    def blocks(space: float) -> int:
        return max(0, int(space // (page_bytes * groups.group_size))) if space > 0 else 0

    num_blocks, num_blocks_low = blocks(available), blocks(low)
    kv_tokens = num_blocks // max(1, groups.count) * req.block_size
    per_request = blocks_per_request(arch, groups, length, req.block_size, batched)
    concurrency = num_blocks / per_request if per_request else 0.0
    # The verdict is decided on the lower bound: sometimes too cautious, never too optimistic.
    fit_len = max_len_that_fits(arch, groups, req.block_size, batched, num_blocks_low) if num_blocks_low else 0
    model_limit = arch.derived_max_model_len
    # VLLM_ALLOW_LONG_MAX_MODEL_LEN: vLLM warns instead of refusing, so the limit binds nothing.
    limit = None if req.allow_long_max_model_len else model_limit
    if limit is not None:
        fit_len = min(fit_len, limit)
    kv_per_token_all_layers = per_layer * arch.kv_layers

    if model_limit is not None and length > model_limit and req.allow_long_max_model_len:
        warnings.append(f"max_model_len {length:,} is past the model's limit ({arch.max_len_key}={model_limit:,}): "
                        "VLLM_ALLOW_LONG_MAX_MODEL_LEN lets vLLM start, but positions past the limit give NaNs (RoPE) "
                        "or out-of-bounds errors")
    # The failures vLLM would print, in the order it would hit them.
    if not tp_splits(arch, tp):
        reason = _tp_reason(arch, tp)
    elif batch_refused:
        # SchedulerConfig.verify_max_model_len (vLLM 0.32 config/scheduler.py), while the engine is configured.
        reason = (
            f"max_num_batched_tokens ({batched}) must be greater than or equal to max_num_seqs ({seqs}): vLLM "
            "refuses to start. Raise --max-num-batched-tokens or lower --max-num-seqs."
        )
    elif limit is not None and length > limit:
        # vLLM checks the model's own length limit while reading its config, before touching a GPU.
        reason = (
            f"User-specified max_model_len ({length}) is greater than the derived max_model_len "
            f"({arch.max_len_key}={limit} in the model's config.json): vLLM refuses to start. The model's limit "
            f"is {limit:,} tokens; set max_model_len to {min(limit, fit_len) if fit_len else limit} or less."
        )
    elif total is not None and weights + lora_bytes > total:
        slots = f" and {lora_bytes / GIB:.2f} GiB of LoRA slots ({req.lora.label})" if req.lora is not None else ""
        reason = (
            f"CUDA out of memory while loading weights: {weights / GIB:.2f} GiB of weights{slots} per GPU on a "
            f"{total / GIB:.2f} GiB GPU. Use a quantized checkpoint (AWQ/GPTQ/FP8) or more GPUs (--tp)"
            + (", or fewer LoRA slots or a lower max_lora_rank." if req.lora is not None else ".")
        )
    elif lora_refused:  # while the LoRA layers are built, after the weights load
        reason = lora_refused
    elif kv_overflows:
        beside = weights + lora_bytes + NON_TORCH_BYTES[req.engine] + (TP_NON_TORCH_BYTES if tp > 1 else 0)
        room = (total or 0) - beside
        slots = f" + LoRA slots {lora_bytes / GIB:.2f} GiB" if req.lora is not None else ""
        reason = (
            f"CUDA out of memory allocating the KV cache given: weights {weights / GIB:.2f} GiB{slots} + "
            f"kv_cache_memory_bytes {explicit_kv / GIB:.2f} GiB + runtime exceed the {(total or 0) / GIB:.2f} GiB GPU "
            "(vLLM takes --kv-cache-memory-bytes as given, whatever gpu_memory_utilization says). "
            + (f"Give at most {int(room):,} bytes." if room > 0 else "No KV size fits beside the weights.")
        )
    elif (
        total is not None
        and req.free_memory_bytes is not None
        and req.free_memory_bytes < total * req.gpu_memory_utilization
    ):
        others = req.other_process_bytes if req.other_process_bytes is not None else total - req.free_memory_bytes
        reason = (
            f"Free memory on device ({req.free_memory_bytes / GIB:.2f}/{total / GIB:.2f} GiB) on startup is less "
            f"than desired GPU memory utilization ({req.gpu_memory_utilization}, "
            f"{total * req.gpu_memory_utilization / GIB:.2f} GiB): another process holds "
            f"{others / GIB:.2f} GiB on that GPU. Stop it, pick another GPU, or lower gpu_memory_utilization."
        )
    elif num_blocks_low <= 0 and explicit is not None:
        reason = (
            f"No available memory for the cache blocks: the {available / GIB:.2f} GiB KV cache given holds no "
            f"block of {page_bytes * groups.group_size / GIB * 1024:.2f} MiB ({req.block_size} tokens of "
            f"{groups.group_size} layers)."
        )
    elif num_blocks_low <= 0:
        runtime = (activation or 0) + (non_torch or 0) + (tp_non_torch or 0) + (cuda_graph or 0 if graphs_in_budget else 0)
        slots = f" + LoRA slots {lora_bytes / GIB:.2f} GiB ({req.lora.label})" if req.lora is not None else ""
        reason = (
            f"No available memory for the cache blocks: weights {weights / GIB:.2f} GiB{slots} + activation and "
            f"runtime {runtime / GIB:.2f} GiB (and a {margin / GIB:.2f} GiB allowance) exceed the "
            f"{(budget or 0) / GIB:.2f} GiB budget."
        )
    elif per_request > num_blocks_low:
        need = per_request * page_bytes * groups.group_size
        smaller_kv = "use --kv-cache-dtype fp8, " if kv_dtype_bytes(req.kv_cache_dtype) > 1 else ""
        space = (f"{available / GIB:.2f} GiB available" if margin == 0 else
                 f"{low / GIB:.2f} GiB that is surely available (estimate {available / GIB:.2f} GiB)")
        reason = (
            f"max model length {length} is larger than the KV cache: one request needs "
            f"{need / GIB:.2f} GiB of KV cache, more than the {space}. Based on that memory the estimated "
            f"maximum model length is {fit_len}. Decrease max_model_len, {smaller_kv}or increase "
            "gpu_memory_utilization"
            + (f" (or give LoRA fewer slots or a lower rank: {req.lora.label} takes {lora_bytes / GIB:.2f} GiB)."
               if req.lora is not None and explicit is None else ".")
        )

    # Whatever the first reason, no length works where vLLM refuses regardless of it: a TP that does not divide
    # the heads, weights larger than the GPU, or less free memory than the utilisation asks for.
    refused_whatever_the_length = bool(
        not tp_splits(arch, tp)
        or lora_refused
        or kv_overflows
        or batch_refused
        or (total is not None and weights + lora_bytes > total)
        or (total is not None and req.free_memory_bytes is not None
            and req.free_memory_bytes < total * req.gpu_memory_utilization)
    )
    if refused_whatever_the_length:
        fit_len = 0
    return FitResult(
        model=arch.name,
        quantization=arch.quantization.label,
        kv_cache_dtype=req.kv_cache_dtype,
        tensor_parallel_size=tp,
        kv_bytes_per_token=kv_per_token_all_layers,
        weights_gib=weights / GIB,
        weights_exact=exact,
        total_gpu_memory_gib=None if total is None else total / GIB,
        gpu_memory_utilization=req.gpu_memory_utilization,
        budget_gib=None if budget is None else budget / GIB,
        activation_gib=None if activation is None else activation / GIB,
        non_torch_gib=None if non_torch is None else non_torch / GIB,
        cuda_graph_gib=None if cuda_graph is None else cuda_graph / GIB,
        available_kv_gib=available / GIB,
        available_kv_gib_low=low / GIB,
        num_gpu_blocks=num_blocks,
        block_size=req.block_size,
        kv_tokens=kv_tokens,
        max_concurrency=round(concurrency, 2),
        max_model_len=length,
        fits=reason is None,
        reason=reason,
        max_model_len_that_fits=fit_len,
        max_num_seqs=seqs,
        max_num_batched_tokens=batched,
        warnings=warnings,
        num_gpu_blocks_low=num_blocks_low,
        kv_tokens_low=num_blocks_low // max(1, groups.count) * req.block_size,
        max_concurrency_low=round(num_blocks_low / per_request, 2) if per_request else 0.0,
        tp_non_torch_gib=None if tp_non_torch is None else tp_non_torch / GIB,
        cuda_graph_in_budget=graphs_in_budget,
        low_margin_gib=margin / GIB,
        vllm_version_modelled=req.vllm_version if explicit is None else VLLM_VERSION_MODELLED,
        model_max_model_len=model_limit,
        max_model_len_given=req.max_model_len is not None,
        lora_gib=None if lora is None else lora.buffers / GIB,
        lora_settings="" if req.lora is None else req.lora.label,
        lora_modules="" if lora is None else lora.modules,
        lora_host_gib=None if lora is None else lora.host / GIB,
    )


def fit_table(arch: ModelArch, req: FitRequest, dtypes: tuple[str, ...] = ("auto", "fp8", "nvfp4"),
              lengths: tuple[int, ...] = FIT_LENGTHS) -> dict[str, dict[int, FitResult]]:
    """The Fit screen's grid: each KV dtype at each context length."""
    return {d: {n: plan(arch, replace(req, kv_cache_dtype=d, max_model_len=n)) for n in lengths} for d in dtypes}
