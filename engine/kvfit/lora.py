"""What serving LoRA adapters costs in GPU memory, as vLLM 0.32 allocates it (vllm/lora/).

With --enable-lora vLLM wraps every LoRA-capable layer of the model (every linear layer, whatever modules the
adapters target, and the embeddings of models that list them in `embedding_modules`) and gives each wrapper
stacked A and B buffers for `max_loras` slots at `max_lora_rank`, in the LoRA dtype (the model's: 2 bytes),
while the model loads (`create_lora_weights`). They are part of the memory the profile subtracts from the KV
budget, whether or not an adapter is ever loaded. Per slot and per tensor-parallel rank:

- column-parallel layers (q/k/v packed as three slices, gate/up as two; Phi-3's fused ones as one):
  A = slices x rank x input (not split by TP), B = rank x the layer's output on this rank (q: heads/TP x
  head_dim; k and v: max(1, KV heads/TP) x head_dim, a replicated KV head is allocated on every rank);
- row-parallel layers (o, down): A = rank x input/TP, B = rank x output (not split);
- replicated layers (an MoE router, MLA's latent projections): A = rank x input, B = rank x output;
- the input embedding: A = vocabulary x rank, B = rank x hidden; the LM head (through its logits processor):
  A = rank x hidden, B = rank x vocabulary; neither is split by TP;
- MoE experts (FusedMoEWithLoRA): per expert, gate and up A = rank x hidden each, B = rank x moe_inter/TP each,
  down A = rank x moe_inter/TP, B = rank x hidden.

Besides the buffers: the punica kernels' shrink buffer during the profile run (slices x max_num_batched_tokens x
rank in fp32, for the widest packed layer), a few int arrays of max_num_batched_tokens (the LoRA metadata), and
CUDA graphs captured twice (with and without an active LoRA: `cudagraph_specialize_lora`, default on).
Adapters waiting in host memory (`max_cpu_loras`, default max_loras) cost RAM, not GPU memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.kvfit.arch import ModelArch

# The values vLLM's --max-lora-rank accepts (vLLM 0.32, vllm/config/lora.py: MaxLoRARanks); any other refuses to
# start. engine/vllm/profile.py checks a profile's [lora] against the same tuple.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# No GPU holds a thousand slots of any model's LoRA buffers; past this a value is a typo, and the arithmetic would
# only print an absurd figure.
MAX_LORAS_LIMIT = 1 << 16
# LogitsProcessorWithLoRA.create_lora_weights refuses a larger vocabulary (vLLM 0.32).
MAX_LORA_VOCAB = 258048
# The metadata punica keeps per batched token (token->slot maps, sorted indices, embedding indices: int64/int32).
METADATA_BYTES_PER_TOKEN = 64
# vLLM captures every CUDA graph size twice with LoRA enabled: with no active adapter and with max_loras + 1
# (cudagraph_dispatcher._get_lora_cases, cudagraph_specialize_lora on by default). Doubling the whole figure is
# cautious: the first capture's shared pool is not doubled.
LORA_CUDA_GRAPH_FACTOR = 2

# Models whose vLLM class lists no `embedding_modules` (vllm/model_executor/models/*.py, 0.32): no LoRA on the
# embedding or the LM head. Any other model type is planned with them (cautious: more LoRA memory, not less).
NO_EMBEDDING_LORA = frozenset({
    "mistral", "qwen2", "qwen2_moe", "gemma", "gemma2", "gemma3", "gemma3_text", "deepseek_v2", "deepseek_v3",
    "gpt_oss", "starcoder2", "commandr", "cohere",
})
# Models whose checkpoint fuses q/k/v and gate/up into one projection each (vLLM's packed_modules_mapping maps
# them to themselves): one LoRA slice instead of three and two.
FUSED_PROJECTIONS = frozenset({"phi3"})


class LoraError(ValueError):
    """LoRA settings vLLM would refuse; the message is one line."""


@dataclass(frozen=True, slots=True)
class LoraSettings:
    """A server's --enable-lora settings, as the planner needs them."""

    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int | None = None  # None: vLLM's default, max_loras
    dtype_bytes: int = 2  # lora_dtype "auto": the model's dtype (bf16/fp16; AWQ forces fp16)

    def __post_init__(self) -> None:
        for name in ("max_loras", "max_lora_rank", "dtype_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise LoraError(f"{name} must be a whole number, got {value!r}")
        if not 1 <= self.max_loras <= MAX_LORAS_LIMIT:
            raise LoraError(f"max_loras must be from 1 to {MAX_LORAS_LIMIT:,} (vLLM needs at least one slot), "
                            f"got {self.max_loras}")
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise LoraError(f"max_lora_rank {self.max_lora_rank} is not one vLLM accepts "
                            f"({', '.join(map(str, VLLM_LORA_RANKS))})")
        if self.max_cpu_loras is not None and not self.max_loras <= self.max_cpu_loras <= MAX_LORAS_LIMIT:
            raise LoraError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}), as "
                            "vLLM requires")
        if self.dtype_bytes not in (2, 4):
            raise LoraError(f"the LoRA dtype is 2 (fp16/bf16) or 4 (fp32) bytes, got {self.dtype_bytes}")

    @property
    def label(self) -> str:
        return f"max_loras {self.max_loras} x rank {self.max_lora_rank}"


@dataclass(frozen=True, slots=True)
class LoraMemory:
    """LoRA's memory on each GPU (bytes) and in host RAM."""

    buffers: int  # the stacked A/B buffers of every slot, allocated at load
    per_slot: int  # one slot's share of `buffers`
    activation: int  # the profile run's shrink buffer and the punica metadata
    host: int  # max_cpu_loras adapters at max rank, whole (not split by TP), in RAM
    modules: str  # which layers get buffers, for the breakdown
    embeddings: bool  # whether the embedding and LM head are among them


def _column(slices_out: tuple[int, ...], inp: int, rank: int) -> int:
    """Elements per slot of a column-parallel layer: A per slice (input not split), B per slice output."""
    return len(slices_out) * rank * inp + rank * sum(slices_out)


def _row(inp_per_rank: int, out: int, rank: int) -> int:
    return rank * inp_per_rank + rank * out


def _per_slot_elements(arch: ModelArch, rank: int, tp: int) -> tuple[int, list[str]]:
    """Elements of one slot's A and B buffers on one TP rank, and the module names."""
    h = arch.hidden_size
    layers = arch.num_layers
    fused = arch.model_type in FUSED_PROJECTIONS
    names: list[str] = []
    total = 0
    if arch.is_mla:
        heads = max(1, arch.num_heads // tp)
        qk = arch.qk_nope_head_dim + arch.qk_rope_head_dim
        per = 0
        if arch.q_lora_rank:
            per += _row(h, arch.q_lora_rank, rank)  # q_a_proj (replicated)
            per += _column((heads * qk,), arch.q_lora_rank, rank)  # q_b_proj
        else:
            per += _column((heads * qk,), h, rank)  # q_proj
        per += _row(h, arch.kv_lora_rank + arch.qk_rope_head_dim, rank)  # kv_a_proj_with_mqa (replicated)
        per += _column((heads * (arch.qk_nope_head_dim + arch.v_head_dim),), arch.kv_lora_rank, rank)  # kv_b_proj
        per += _row(heads * arch.v_head_dim, h, rank)  # o_proj
        total += layers * per
        names.append("MLA q/kv projections, o")
    else:
        q = (arch.num_heads // tp if arch.num_heads >= tp else 1) * arch.head_dim
        kv = max(1, arch.num_kv_heads // tp) * arch.head_dim
        qkv = (q + 2 * kv,) if fused else (q, kv, kv)
        total += layers * (_column(qkv, h, rank) + _row(q, h, rank))
        names.append("qkv (fused), o" if fused else "q/k/v, o")
    moe_layers = max(0, layers - arch.first_dense_layers) if arch.is_moe else 0
    dense_layers = layers - moe_layers

    def mlp(inter: int) -> int:
        per_rank = max(1, inter // tp)
        gate_up = (2 * per_rank,) if fused else (per_rank, per_rank)
        return _column(gate_up, h, rank) + _row(per_rank, h, rank)

    if dense_layers and arch.intermediate_size:
        total += dense_layers * mlp(arch.intermediate_size)
        names.append("gate_up (fused), down" if fused else "gate/up, down")
    if moe_layers:
        inter = max(1, arch.moe_intermediate_size // tp)
        experts = arch.num_experts * rank * (3 * h + 3 * inter)
        router = _row(h, arch.num_experts, rank)  # the router gate is a ReplicatedLinear
        shared = mlp(arch.shared_expert_intermediate_size) if arch.shared_expert_intermediate_size else 0
        total += moe_layers * (experts + router + shared)
        names.append(f"{arch.num_experts} experts' gate/up/down, router" + (", shared expert" if shared else ""))
    if arch.model_type not in NO_EMBEDDING_LORA:
        total += rank * (arch.vocab_size + h) * 2  # embed_tokens (A: vocab x rank, B: hidden) and the LM head
        names.append("embed_tokens, lm_head")
    return total, names


def lora_memory(arch: ModelArch, lora: LoraSettings, tp: int, batched_tokens: int) -> LoraMemory:
    """LoRA's GPU memory per rank with `lora`, for a server of `tp` ranks batching `batched_tokens`."""
    tp = max(1, tp)
    embeddings = arch.model_type not in NO_EMBEDDING_LORA
    if embeddings and arch.vocab_size > MAX_LORA_VOCAB:
        raise LoraError(f"vLLM refuses LoRA on this model: its vocabulary ({arch.vocab_size:,}) is above the "
                        f"{MAX_LORA_VOCAB:,} that LoRA on the LM head supports")
    elements, names = _per_slot_elements(arch, lora.max_lora_rank, tp)
    per_slot = elements * lora.dtype_bytes
    whole, _ = _per_slot_elements(arch, lora.max_lora_rank, 1)
    slices = 1 if arch.model_type in FUSED_PROJECTIONS else 3
    activation = (slices * batched_tokens * lora.max_lora_rank * 4  # fp32 shrink buffer of the q/k/v layer
                  + METADATA_BYTES_PER_TOKEN * batched_tokens)
    return LoraMemory(
        buffers=per_slot * lora.max_loras,
        per_slot=per_slot,
        activation=activation,
        host=whole * lora.dtype_bytes * (lora.max_cpu_loras or lora.max_loras),
        modules=", ".join(names),
        embeddings=embeddings,
    )
