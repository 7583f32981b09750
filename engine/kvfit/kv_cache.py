"""The KV cache's geometry: bytes per token per layer for a dtype and tensor-parallel split, vLLM V1's
KV groups (full attention and sliding window layers sharing one block pool), and the longest request
that fits a number of blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.kvfit.arch import ModelArch

KV_DTYPES = ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2", "nvfp4")
_KV_BYTES = {"auto": 2.0, "bfloat16": 2.0, "float16": 2.0, "fp8": 1.0, "fp8_e4m3": 1.0, "fp8_e5m2": 1.0,
             "nvfp4": 0.5 + 1 / 16}  # nvfp4: 4-bit values and one fp8 scale per 16
MAX_SEARCH_LEN = 1 << 21


def kv_dtype_bytes(kv_cache_dtype: str) -> float:
    try:
        return _KV_BYTES[kv_cache_dtype]
    except KeyError:
        raise ValueError(f"unknown KV cache dtype {kv_cache_dtype!r}; one of {', '.join(KV_DTYPES)}") from None


def kv_heads_per_rank(arch: ModelArch, tp: int) -> int:
    """KV heads split across TP ranks; replicated (one per rank) when there are fewer heads than ranks."""
    return max(1, arch.num_kv_heads // tp)


def kv_bytes_per_token_per_layer(arch: ModelArch, tp: int, kv_cache_dtype: str) -> float:
    dtype = kv_dtype_bytes(kv_cache_dtype)
    if arch.is_mla:
        # One compressed latent (plus the rope part) per token per layer, replicated on every rank.
        return (arch.kv_lora_rank + arch.qk_rope_head_dim) * dtype
    return 2 * kv_heads_per_rank(arch, tp) * arch.head_dim * dtype


@dataclass(frozen=True, slots=True)
class KvGroups:
    group_size: int
    full_groups: int
    sliding_groups: int

    @property
    def count(self) -> int:
        return self.full_groups + self.sliding_groups


def kv_groups(arch: ModelArch) -> KvGroups:
    full, sliding = arch.full_layers, arch.sliding_layers
    if not sliding or not full:
        return KvGroups(arch.kv_layers, 1 if full else 0, 1 if sliding else 0)
    size = min(full, sliding)
    return KvGroups(size, math.ceil(full / size), math.ceil(sliding / size))


def blocks_per_request(arch: ModelArch, groups: KvGroups, length: int, block: int, batched: int) -> int:
    full = math.ceil(length / block)
    blocks = groups.full_groups * full
    if groups.sliding_groups:
        window_tokens = min((arch.sliding_window or length) - 1 + batched, length)
        blocks += groups.sliding_groups * (math.ceil(window_tokens / block) + 1)
    return blocks


def _request_fits(arch: ModelArch, groups: KvGroups, length: int, block: int, batched: int, num_blocks: int) -> bool:
    return blocks_per_request(arch, groups, length, block, batched) <= num_blocks


def max_len_that_fits(arch: ModelArch, groups: KvGroups, block: int, batched: int, num_blocks: int) -> int:
    """Largest max_model_len whose one request fits the pool (vLLM's estimate, by bisection)."""
    if not _request_fits(arch, groups, 1, block, batched, num_blocks):
        return 0
    lo, hi = 1, MAX_SEARCH_LEN
    if _request_fits(arch, groups, hi, block, batched, num_blocks):
        return hi
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        if _request_fits(arch, groups, mid, block, batched, num_blocks):
            lo = mid
        else:
            hi = mid
    return lo
