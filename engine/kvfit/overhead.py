"""vLLM's memory apart from the weights and the KV cache, as the planner models it: the activation peak of
its profile run, non-torch memory, CUDA graphs, the lower bound's allowance, and what memory vLLM sees on
a GPU (a MIG slice, not its parent). Stated in OVERHEAD_MODEL and docs/kvfit.md.
"""

from __future__ import annotations

from typing import Any

GIB = 1024**3

# Activation peak of vLLM V1's profile run, fitted to the published start-up logs in
# tests/data/vllm_kv_points.jsonl (error <= 0.2 GiB on each): a fixed part plus the sampler's logits for
# max_num_seqs dummy requests. The V0 engine (no chunked prefill) also holds the MLP's
# gate and up projections for the whole max_model_len prompt at once.
ACTIVATION_FIXED_BYTES = 783_000_000
ACTIVATION_PER_LOGIT_BYTES = 10.3
V0_MLP_BYTES_PER_TOKEN_PER_INTERMEDIATE = 4  # gate + up, bf16
NON_TORCH_BYTES = {"v1": int(0.25 * GIB), "v0": int(0.35 * GIB)}
# NCCL communicators and the custom all-reduce buffers: per GPU, only with tensor parallelism.
TP_NON_TORCH_BYTES = int(0.35 * GIB)
CUDA_GRAPH_BYTES_PER_LAYER = int(0.028 * GIB)
# vLLM estimates the CUDA graphs' memory during profiling and takes it out of the KV budget by default
# since 0.21 (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1; 0.32: v1/worker/gpu_worker.py,
# determine_available_memory); before that the graphs were captured after sizing, from the headroom.
CUDA_GRAPHS_IN_BUDGET_SINCE = (0, 21)
VLLM_VERSION_MODELLED = "0.32"
# The lower bound's allowance for what the estimate cannot see (fragmentation, kernels' workspaces,
# version drift): a floor, a share of the weights, half the activation estimate, and the TP buffers again.
LOW_FLOOR_BYTES = int(0.35 * GIB)
LOW_WEIGHTS_SHARE = 0.03
LOW_ACTIVATION_SHARE = 0.5


def vllm_view_of(gpu: Any) -> tuple[int | None, int | None, int | None, str | None]:
    """(total, free, used, note) of the memory vLLM sees on a GPU snapshot. A GPU in MIG mode is seen as
    one slice (the one CUDA_VISIBLE_DEVICES names): the planner takes the slice with the most free memory
    and says so, since the parent's total would promise a whole GPU."""
    slices = [m for m in getattr(gpu, "mig_devices", []) or [] if m.memory_total_bytes]
    if getattr(gpu, "mig_enabled", False) and slices:
        best = max(slices, key=lambda m: m.memory_total_bytes - (m.memory_used_bytes or 0))
        used = best.memory_used_bytes or 0
        note = (f"GPU {gpu.index} is in MIG mode: planned against its slice {best.uuid or best.index} "
                f"({best.memory_total_bytes / GIB:.1f} GiB), as vLLM sees it; start vLLM with "
                f"CUDA_VISIBLE_DEVICES={best.uuid or 'MIG-UUID'}")
        return best.memory_total_bytes, best.memory_total_bytes - used, used, note
    return gpu.memory_total_bytes, gpu.memory_free_bytes, gpu.memory_used_bytes, None


def version_tuple(text: str | None) -> tuple[int, int]:
    """"0.19.1" -> (0, 19); unknown or malformed -> the version modelled."""
    try:
        major, minor = (int(x) for x in (text or VLLM_VERSION_MODELLED).split(".")[:2])
        return major, minor
    except ValueError:
        return version_tuple(VLLM_VERSION_MODELLED)


OVERHEAD_MODEL = (
    "activation = 0.73 GiB + 10.3 B x max_num_seqs x vocab (V1 profile run; V0 adds 4 B x prompt tokens x "
    "intermediate size); non-torch = 0.25 GiB (V1) or 0.35 GiB (V0), + 0.35 GiB with TP > 1; CUDA graphs = "
    "0.028 GiB per layer (x2 for MoE, none with enforce_eager), taken from the KV budget since vLLM 0.21, "
    "from the (1 - utilisation) headroom before; lower bound = estimate - (0.35 GiB + 3% of weights + half "
    "the activation + the TP buffers again)"
)


def default_batch(total_gpu_bytes: int, gpu_name: str = "") -> tuple[int, int]:
    """vLLM's defaults for the OpenAI server: (max_num_seqs, max_num_batched_tokens)."""
    if total_gpu_bytes >= 70 * GIB and "a100" not in gpu_name.lower():
        return 1024, 8192
    return 256, 2048
