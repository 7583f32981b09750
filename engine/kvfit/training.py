"""Training memory of a LoRA or QLoRA fine-tune on one GPU, for the fine-tune preflight.

    weights      16-bit, or 4-bit NF4 for the decoder matrices under QLoRA (embeddings/head 16-bit)
    LoRA params  rank x (in + out) for every target module in every layer
    optimizer    AdamW: fp32 master copy, gradient and two moments of the LoRA params (16 B each)
    activations  with gradient checkpointing: the hidden state at every layer boundary, one layer's
                 recomputed internals, and the fp32 logits of the batch
    overhead     CUDA context, allocator fragmentation and kernels' workspaces
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from engine.kvfit.arch import ModelArch, Quantization

GIB = 1024**3
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FIXED_OVERHEAD_BYTES = int(1.0 * GIB)


def _module_shapes(arch: ModelArch) -> dict[str, tuple[int, int]]:
    h = arch.hidden_size
    q = arch.num_heads * arch.head_dim
    kv = arch.num_kv_heads * arch.head_dim
    inter = arch.moe_intermediate_size if arch.is_moe else arch.intermediate_size
    return {
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
    }


def lora_param_count(arch: ModelArch, rank: int, targets: tuple[str, ...] = DEFAULT_TARGETS) -> int:
    shapes = _module_shapes(arch)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"unknown LoRA target modules {unknown}; known: {sorted(shapes)}")
    per_layer = sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)
    experts = arch.num_experts if arch.is_moe else 1
    mlp = {"gate_proj", "up_proj", "down_proj"}
    moe_extra = sum(rank * sum(shapes[t]) for t in targets if t in mlp) * (experts - 1)
    return arch.num_layers * (per_layer + moe_extra)


@dataclass
class TrainingEstimate:
    weights_bytes: int
    lora_params: int
    lora_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.lora_bytes + self.optimizer_bytes + self.activation_bytes + self.overhead_bytes

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        d["total_gib"] = round(self.total_bytes / GIB, 2)
        return d


def estimate_training(
    arch: ModelArch,
    rank: int = 64,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    load_in_4bit: bool = True,
    batch_size: int = 2,
    max_seq_length: int = 2048,
    gradient_checkpointing: bool = True,
) -> TrainingEstimate:
    from engine.kvfit.weights import estimated_weight_bytes

    base = replace(arch, quantization=Quantization("bnb4", 4, 64) if load_in_4bit else Quantization("none"))
    weights = estimated_weight_bytes(base)
    lora = lora_param_count(arch, rank, targets)
    lora_bytes = lora * 2  # bf16 adapter weights used in the forward pass
    optimizer = lora * 16
    tokens = batch_size * max_seq_length
    h = arch.hidden_size
    inter = arch.moe_intermediate_size if arch.is_moe else arch.intermediate_size
    one_layer = tokens * (10 * h + 3 * inter) * 2 + batch_size * arch.num_heads * max_seq_length * 2 * 2
    if gradient_checkpointing:
        activations = tokens * h * 2 * arch.num_layers + one_layer
    else:
        activations = one_layer * arch.num_layers
    activations += tokens * arch.vocab_size * 4  # fp32 logits for the loss
    return TrainingEstimate(weights, lora, lora_bytes, optimizer, int(activations), FIXED_OVERHEAD_BYTES)
