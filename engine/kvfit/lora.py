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
  down A = rank x moe_inter/TP, B = rank x hidden (gpt-oss's 3-D experts: one A for gate and up together);
  the router is a replicated layer, a shared expert a dense MLP.

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
# MoE models whose checkpoints store the experts' gate and up fused in 3-D tensors (is_3d_moe_weight): vLLM's
# FusedMoE3DWithLoRA keeps one A of rank x hidden for both, where FusedMoEWithLoRA keeps one each.
FUSED_3D_EXPERTS = frozenset({"gpt_oss"})


class LoraError(ValueError):
    """LoRA settings vLLM would refuse; the message is one line."""


@dataclass(frozen=True, slots=True)
class LoraSettings:
    """A server's --enable-lora settings, as the planner needs them."""

    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int | None = None  # None: vLLM's default, max_loras
    dtype_bytes: int = 2  # lora_dtype "auto": the model's dtype (bf16/fp16; AWQ forces fp16)
    # --lora-target-modules: only these layers get buffers (None: every LoRA-capable layer, vLLM's default)
    target_modules: tuple[str, ...] | None = None
    fully_sharded: bool = False  # --fully-sharded-loras: A of column layers and B of row layers split by TP

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
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise LoraError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}), as "
                            "vLLM requires")
        if self.max_cpu_loras is not None and self.max_cpu_loras > MAX_LORAS_LIMIT:
            raise LoraError(f"max_cpu_loras must be at most {MAX_LORAS_LIMIT:,}, got {self.max_cpu_loras}")
        if self.target_modules is not None and (not self.target_modules or not all(
                isinstance(t, str) and t.strip() for t in self.target_modules)):
            raise LoraError("lora target modules must be layer names such as q_proj, v_proj")
        if self.dtype_bytes not in (2, 4):
            raise LoraError(f"the LoRA dtype is 2 (fp16/bf16) or 4 (fp32) bytes, got {self.dtype_bytes}")

    @property
    def label(self) -> str:
        return f"max_loras {self.max_loras} x rank {self.max_lora_rank}"

    @classmethod
    def from_vllm_args(cls, max_loras: int, max_lora_rank: int, args: list[str]) -> LoraSettings:
        """The settings a server gets, with what its extra vLLM arguments change in LoRA's memory
        (--max-cpu-loras, --lora-target-modules, --fully-sharded-loras, --lora-dtype; and --max-loras /
        --max-lora-rank, which vLLM's parser takes over the profile's, as they come later on its command line)."""
        cpu: int | None = None
        targets: list[str] | None = None
        sharded, dtype = False, 2
        i = 0
        while i < len(args):
            flag, _, inline = args[i].partition("=")
            values = [inline] if inline else []
            j = i + 1
            while not inline and j < len(args) and not args[j].startswith("--"):
                values.append(args[j])
                j += 1
            if flag == "--max-cpu-loras" and values:
                cpu = _whole(values[0], "--max-cpu-loras")
            elif flag == "--lora-target-modules" and values:
                targets = [t for v in values for t in v.replace(",", " ").split()]
            elif flag == "--fully-sharded-loras":
                sharded = inline.lower() not in ("false", "0") if inline else True
            elif flag == "--lora-dtype" and values:
                dtype = 4 if values[0] in ("float32", "fp32") else 2
            elif flag == "--max-loras" and values:
                max_loras = _whole(values[0], "--max-loras")
            elif flag == "--max-lora-rank" and values:
                max_lora_rank = _whole(values[0], "--max-lora-rank")
            valued = ("--max-cpu-loras", "--lora-target-modules", "--lora-dtype", "--max-loras", "--max-lora-rank")
            i = j if flag in valued else i + 1
        return cls(max_loras=max_loras, max_lora_rank=max_lora_rank, max_cpu_loras=cpu,
                   target_modules=tuple(targets) if targets else None, fully_sharded=sharded, dtype_bytes=dtype)


def _whole(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise LoraError(f"{flag} must be a whole number, got {text!r}") from None


@dataclass(frozen=True, slots=True)
class LoraMemory:
    """LoRA's memory on each GPU (bytes) and in host RAM."""

    buffers: int  # the stacked A/B buffers of every slot, allocated at load
    per_slot: int  # one slot's share of `buffers`
    activation: int  # the profile run's shrink buffer and the punica metadata
    host: int  # max_cpu_loras adapters at max rank, whole (not split by TP), in RAM
    modules: str  # which layers get buffers, for the breakdown
    embeddings: bool  # whether the embedding and LM head are among them


@dataclass(frozen=True, slots=True)
class _Layer:
    """One kind of LoRA-wrapped layer: its runtime name in vLLM, the adapter-visible names packed into it (what
    --lora-target-modules may name instead), how many of the model has, and one slot's elements on one rank."""

    name: str
    children: tuple[str, ...]
    count: int
    elements: int
    label: str


def _column(slices_out: tuple[int, ...], inp: int, rank: int, tp: int, sharded: bool) -> int:
    """Elements per slot of a column-parallel layer: A per slice (input not split; its rank split by TP when
    fully sharded), B per slice output on this rank."""
    a_rank = rank // tp if sharded else rank
    return len(slices_out) * a_rank * inp + rank * sum(slices_out)


def _row(inp_per_rank: int, out: int, rank: int, tp: int, sharded: bool) -> int:
    """A row-parallel layer: A of this rank's input; B of the whole output (split by TP when fully sharded)."""
    return rank * inp_per_rank + rank * (out // tp if sharded else out)


def _replicated(inp: int, out: int, rank: int) -> int:
    return rank * inp + rank * out


def _layers(arch: ModelArch, rank: int, tp: int, sharded: bool) -> list[_Layer]:
    """Every kind of layer vLLM wraps for LoRA in this model, with one slot's elements on one TP rank."""
    h = arch.hidden_size
    n = arch.num_layers
    fused = arch.model_type in FUSED_PROJECTIONS
    out: list[_Layer] = []
    if arch.is_mla:
        heads = max(1, arch.num_heads // tp)
        qk = arch.qk_nope_head_dim + arch.qk_rope_head_dim
        if arch.q_lora_rank:
            out.append(_Layer("q_a_proj", (), n, _replicated(h, arch.q_lora_rank, rank), "q_a"))
            out.append(_Layer("q_b_proj", (), n, _column((heads * qk,), arch.q_lora_rank, rank, tp, sharded), "q_b"))
        else:
            out.append(_Layer("q_proj", (), n, _column((heads * qk,), h, rank, tp, sharded), "q"))
        out.append(_Layer("kv_a_proj_with_mqa", (), n, _replicated(h, arch.kv_lora_rank + arch.qk_rope_head_dim, rank),
                          "kv_a"))
        out.append(_Layer("kv_b_proj", (), n, _column((heads * (arch.qk_nope_head_dim + arch.v_head_dim),),
                                                      arch.kv_lora_rank, rank, tp, sharded), "kv_b"))
        out.append(_Layer("o_proj", (), n, _row(heads * arch.v_head_dim, h, rank, tp, sharded), "o"))
    else:
        q = (arch.num_heads // tp if arch.num_heads >= tp else 1) * arch.head_dim
        kv = max(1, arch.num_kv_heads // tp) * arch.head_dim  # a replicated KV head is on every rank
        qkv = (q + 2 * kv,) if fused else (q, kv, kv)
        children = ("qkv_proj",) if fused else ("q_proj", "k_proj", "v_proj")
        out.append(_Layer("qkv_proj", children, n, _column(qkv, h, rank, tp, sharded), "qkv (fused)" if fused else "q/k/v"))
        out.append(_Layer("o_proj", (), n, _row(q, h, rank, tp, sharded), "o"))
    moe_layers = max(0, n - arch.first_dense_layers) if arch.is_moe else 0

    def mlp(inter: int, count: int, label: str) -> list[_Layer]:
        per_rank = max(1, inter // tp)
        gate_up = (2 * per_rank,) if fused else (per_rank, per_rank)
        return [_Layer("gate_up_proj", ("gate_up_proj",) if fused else ("gate_proj", "up_proj"), count,
                       _column(gate_up, h, rank, tp, sharded), f"{label}gate_up (fused)" if fused else f"{label}gate/up"),
                _Layer("down_proj", (), count, _row(per_rank, h, rank, tp, sharded), f"{label}down")]

    if n - moe_layers and arch.intermediate_size:
        out += mlp(arch.intermediate_size, n - moe_layers, "")
    if moe_layers:
        inter = max(1, arch.moe_intermediate_size // tp)
        gate_up_a = 1 if arch.model_type in FUSED_3D_EXPERTS else 2
        a_rank = rank // tp if sharded else rank
        down_b = h // tp if sharded else h
        experts = arch.num_experts * (gate_up_a * a_rank * h + 2 * rank * inter + rank * inter + rank * down_b)
        out.append(_Layer("experts", (), moe_layers, experts, f"{arch.num_experts} experts"))
        out.append(_Layer("gate", (), moe_layers, _replicated(h, arch.num_experts, rank), "router"))
        if arch.shared_expert_intermediate_size:
            out += mlp(arch.shared_expert_intermediate_size, moe_layers, "shared ")
    if arch.model_type not in NO_EMBEDDING_LORA:
        out.append(_Layer("embed_tokens", (), 1, rank * (arch.vocab_size + h), "embed_tokens"))
        out.append(_Layer("lm_head", (), 1, rank * (h + arch.vocab_size), "lm_head"))
    return out


def _targeted(layers: list[_Layer], targets: tuple[str, ...] | None) -> list[_Layer]:
    """vLLM's is_in_target_modules: a layer is wrapped when its name or a name packed into it is a target (and
    then whole: targeting q_proj alone still allocates the packed q/k/v layer's three slices)."""
    if targets is None:
        return layers
    wanted = set(targets)
    return [layer for layer in layers if layer.name in wanted or wanted & set(layer.children)]


def lora_refusal(arch: ModelArch, lora: LoraSettings, tp: int) -> str | None:
    """Why vLLM would refuse to start this model with LoRA (None: it would not), in its words."""
    if lora.fully_sharded and tp > 1 and lora.max_lora_rank % tp:
        # the sharded layers split the rank with vllm.distributed.utils.divide, which asserts it divides evenly
        return (f"--fully-sharded-loras splits max_lora_rank over the {tp} tensor-parallel ranks: rank "
                f"{lora.max_lora_rank} is not divisible by {tp}, so vLLM fails an assertion while loading the model. "
                f"Use a rank that is a multiple of {tp}, or drop --fully-sharded-loras.")
    if arch.model_type not in NO_EMBEDDING_LORA and arch.vocab_size > MAX_LORA_VOCAB:
        # LogitsProcessorWithLoRA.create_lora_weights, while the model loads.
        return (f"When using LoRA, vocab size must be <= {MAX_LORA_VOCAB}: this model's vocabulary is "
                f"{arch.vocab_size:,} and vLLM wraps its LM head for LoRA, so it refuses to start with --enable-lora.")
    return None


def lora_memory(arch: ModelArch, lora: LoraSettings, tp: int, batched_tokens: int) -> LoraMemory:
    """LoRA's GPU memory per rank with `lora`, for a server of `tp` ranks batching `batched_tokens`."""
    tp = max(1, tp)
    layers = _targeted(_layers(arch, lora.max_lora_rank, tp, lora.fully_sharded), lora.target_modules)
    per_slot = sum(layer.count * layer.elements for layer in layers) * lora.dtype_bytes
    whole = sum(layer.count * layer.elements for layer in _targeted(_layers(arch, lora.max_lora_rank, 1, False),
                                                                     lora.target_modules))
    slices = max((max(1, len(layer.children)) for layer in layers), default=1)  # the widest packed layer's
    activation = (slices * batched_tokens * lora.max_lora_rank * 4 if layers else 0  # fp32 shrink buffer
                  ) + METADATA_BYTES_PER_TOKEN * batched_tokens
    return LoraMemory(
        buffers=per_slot * lora.max_loras,
        per_slot=per_slot,
        activation=activation,
        host=whole * lora.dtype_bytes * (lora.max_cpu_loras or lora.max_loras),
        modules=", ".join(layer.label for layer in layers) or "no layer of this model",
        embeddings=any(layer.name == "lm_head" for layer in layers),
    )


def layer_names(arch: ModelArch) -> list[str]:
    """The names --lora-target-modules can give for this model: the wrapped layers and what is packed into them."""
    names: list[str] = []
    for layer in _layers(arch, 1, 1, False):
        for name in (layer.name, *layer.children):
            if name not in names:
                names.append(name)
    return names
