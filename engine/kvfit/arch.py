"""A model's shape, read from a Hugging Face `config.json` (a local folder or the built-in catalogue).

Only what the memory arithmetic needs: layer counts and widths, attention layout (GQA, MLA, sliding
windows), MoE sizes, vocabulary, tied embeddings, and the checkpoint's quantization.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ArchError(ValueError):
    """The config cannot be sized; the message names the missing key."""


@dataclass(frozen=True, slots=True)
class Quantization:
    method: str  # none | awq | gptq | fp8 | mxfp4 | bnb4
    bits: int = 16
    group_size: int = 128

    @property
    def label(self) -> str:
        return "16-bit" if self.method == "none" else f"{self.method} {self.bits}-bit"


NO_QUANT = Quantization("none")
# What vLLM assumes when a config names no length at all (it logs a warning and uses this).
NO_LENGTH_KEY_DEFAULT = 2048
# vLLM's --quantization names (and a profile's `quantization`) as the planner sizes their weights.
QUANT_BY_VLLM_NAME: dict[str, Quantization] = {
    "awq": Quantization("awq", 4, 128), "awq_marlin": Quantization("awq", 4, 128),
    "gptq": Quantization("gptq", 4, 128), "gptq_marlin": Quantization("gptq", 4, 128),
    "fp8": Quantization("fp8", 8), "none": NO_QUANT,
}


@dataclass(frozen=True, slots=True)
class ModelArch:
    name: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool
    attention_bias: bool = False
    # Mixture of experts: the layers from `first_dense_layers` on have experts instead of one MLP.
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    first_dense_layers: int = 0
    expert_bias: bool = False
    # Multi-head latent attention (DeepSeek V2/V3): one latent of kv_lora_rank + rope dims per layer.
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    q_lora_rank: int = 0
    # Sliding-window layers keep only the window (plus the batch in flight) in the KV cache.
    sliding_window: int | None = None
    sliding_layers: int = 0
    # Layers that keep no per-text-token KV (cross-attention layers of Llama 3.2 Vision).
    non_kv_layers: int = 0
    extra_params: int = 0  # vision towers and projectors, counted in 16-bit
    quantization: Quantization = NO_QUANT
    # The longest max_model_len vLLM accepts for this config (None: no length key; vLLM then assumes 2048
    # only when no length is given) and the config key it comes from.
    derived_max_model_len: int | None = None
    max_len_key: str | None = None
    # The max_model_len vLLM uses when none is given (length_limit: the limit, longrope's original length,
    # or 2048 without a length key).
    default_max_model_len: int = NO_LENGTH_KEY_DEFAULT
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def kv_layers(self) -> int:
        return self.num_layers - self.non_kv_layers

    @property
    def full_layers(self) -> int:
        return self.kv_layers - self.sliding_layers


def _get(cfg: dict[str, Any], key: str, *alts: str, default: Any = ...) -> Any:
    for k in (key, *alts):
        if k in cfg and cfg[k] is not None:
            return cfg[k]
    if default is ...:
        raise ArchError(f"config.json has no `{key}`: cannot size this model")
    return default


def _int(cfg: dict[str, Any], key: str, *alts: str, default: Any = ..., minimum: int = 0) -> int:
    """An integer config value; anything else names the key instead of failing somewhere later."""
    value = _get(cfg, key, *alts, default=default)
    if value is None:
        value = 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < minimum:
        raise ArchError(f"config.json: `{key}` must be a whole number of at least {minimum}, got {value!r}")
    return int(value)


def parse_quantization(cfg: dict[str, Any]) -> Quantization:
    q = cfg.get("quantization_config") or {}
    method = str(q.get("quant_method", "")).lower()
    if not method:
        return NO_QUANT
    if method in ("awq", "gptq", "awq_marlin", "gptq_marlin"):
        return Quantization(method.split("_")[0], int(q.get("bits", q.get("w_bit", 4))), int(q.get("group_size", q.get("q_group_size", 128)) or 128))
    if method == "fp8":
        return Quantization("fp8", 8)
    if method == "mxfp4":
        return Quantization("mxfp4", 4, 32)
    if method == "bitsandbytes":
        return Quantization("bnb4", 4, 64) if q.get("load_in_4bit") else Quantization("bnb8", 8)
    if method == "compressed-tensors":
        groups = q.get("config_groups") or {}
        for group in groups.values():
            weights = (group or {}).get("weights") or {}
            bits = int(weights.get("num_bits", 16))
            if bits == 8:
                return Quantization("fp8", 8)
            if bits == 4:
                return Quantization("gptq", 4, int(weights.get("group_size") or 128))
        return NO_QUANT
    raise ArchError(f"quantization method {method!r} in config.json is not one fleetdeck can size")


def _sliding(cfg: dict[str, Any], layers: int) -> tuple[int | None, int]:
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and layer_types:
        n = sum(1 for t in layer_types if "sliding" in str(t))
        return (int(window) if window else None, n) if n else (None, 0)
    if not window or cfg.get("use_sliding_window") is False:
        return None, 0
    model_type = cfg.get("model_type", "")
    if model_type == "gemma2":
        return int(window), layers // 2  # every other layer is local
    if model_type in ("gemma3", "gemma3_text"):
        pattern = int(cfg.get("sliding_window_pattern", 6))
        return int(window), layers - layers // pattern
    if model_type in ("mistral", "phi3", "qwen2", "qwen3") and int(window) >= int(cfg.get("max_position_embeddings", 0) or 0):
        return None, 0  # a window as long as the context is full attention
    if model_type == "mistral" or cfg.get("use_sliding_window"):
        return int(window), layers
    return None, 0


# The config keys vLLM reads a model's length limit from, smallest wins (vLLM 0.32,
# vllm/transformers_utils/model_arch_config_convertor.py: derive_max_model_len_and_key).
_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                 "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
# RoPE types whose max_position_embeddings is already the scaled length (vLLM 0.32, vllm/config/model.py:
# _get_and_verify_max_len; "su" is the old name of longrope). Every other type multiplies the length by its
# `factor`, and yarn multiplies its original_max_position_embeddings instead.
_PRESCALED_ROPE = ("su", "longrope", "llama3")


@dataclass(frozen=True, slots=True)
class LengthLimit:
    """A model's context length as vLLM derives it from config.json.

    `limit` is the longest --max-model-len vLLM accepts (None: no length key, so vLLM accepts any given
    length), `key` the config key it names when it refuses, `default` the length vLLM uses when none is given.
    """

    limit: int | None
    key: str | None
    default: int


def _rope_parameters(text: dict[str, Any]) -> list[dict[str, Any]]:
    rope = text.get("rope_parameters") or text.get("rope_scaling")
    if not isinstance(rope, dict) or not rope:
        return []
    # Transformers v5 may key the parameters by layer type ({"full_attention": {...}, ...}).
    nested = all(isinstance(v, dict) for v in rope.values())
    return [p for p in rope.values() if p] if nested else [rope]


def _rope_type(rp: dict[str, Any]) -> str:
    # vLLM's patch_rope_parameters reads the old `type` key as `rope_type` when it loads the config.
    return str(rp.get("rope_type", rp.get("type", "default")))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def length_limit(text: dict[str, Any], top: dict[str, Any] | None = None) -> LengthLimit:
    """vLLM's `_get_and_verify_max_len` on a (text) config dict: the smallest length key, an explicit
    model_max_length over it, then the RoPE scaling factor (except where the length is already scaled:
    llama3, longrope, and every Gemma 3). With no length given vLLM takes the derived length, except for
    longrope, where it takes original_max_position_embeddings (the long factors cost quality on short
    prompts); with no length key it assumes 2048."""
    derived: float = float("inf")
    key: str | None = None
    for k in _MAX_LEN_KEYS:
        v = _number(text.get(k))
        if v is not None and v < derived:
            derived, key = v, k
    explicit = _number(text.get("model_max_length"))
    if explicit:
        derived, key = explicit, "model_max_length"
    if derived == float("inf"):
        return LengthLimit(None, None, NO_LENGTH_KEY_DEFAULT)
    params = _rope_parameters(text)
    if params and "gemma3" not in str(text.get("model_type", "")):
        factor = 1.0
        for rp in params:
            rope_type = _rope_type(rp)
            if rope_type not in _PRESCALED_ROPE:
                factor = _number(rp.get("factor")) or factor
                if rope_type == "yarn":
                    original = _number(rp.get("original_max_position_embeddings"))
                    # vLLM needs the key; transformers fills it from max_position_embeddings when absent.
                    derived = original if original is not None else derived
        derived *= factor
    limit = int(derived)
    default = limit
    if any(_rope_type(rp) == "longrope" for rp in params):
        original = _number((top or {}).get("original_max_position_embeddings", text.get("original_max_position_embeddings")))
        default = int(original) if original else limit
    return LengthLimit(limit, key, default)


def derived_max_model_len(text: dict[str, Any]) -> tuple[int | None, str | None]:
    """The length vLLM derives from a (text) config.json, and the key it names when it refuses a longer one."""
    lim = length_limit(text)
    return lim.limit, lim.key


def arch_from_config(cfg: dict[str, Any], name: str = "") -> ModelArch:
    """Parse a Hugging Face config dict (text config of multimodal models included); ArchError when it
    holds values no model has."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("text_config") or cfg, dict):
        raise ArchError("config.json is not a JSON object of model settings")
    try:
        return _parse_config(cfg, name)
    except ArchError:
        raise
    except (ValueError, TypeError, ZeroDivisionError, AttributeError, OverflowError) as exc:
        raise ArchError(f"config.json holds a value fleetdeck cannot size a model from ({type(exc).__name__}: {exc})") from None


def _parse_config(cfg: dict[str, Any], name: str) -> ModelArch:
    quant = parse_quantization(cfg)
    text = cfg.get("text_config") or cfg
    extra = _int(cfg, "_fleetdeck_extra_params", default=0)
    if text is not cfg:
        text = {**text, "model_type": text.get("model_type") or cfg.get("model_type", "")}
        if "quantization_config" in cfg and "quantization_config" not in text:
            text["quantization_config"] = cfg["quantization_config"]
    layers = _int(text, "num_hidden_layers", "n_layer", "num_layers", minimum=1)
    hidden = _int(text, "hidden_size", "n_embd", "d_model", minimum=1)
    heads = _int(text, "num_attention_heads", "n_head", minimum=1)
    kv_heads = _int(text, "num_key_value_heads", default=heads, minimum=1)
    head_dim = _int(text, "head_dim", default=hidden // heads, minimum=1)
    vocab = _int(text, "vocab_size", minimum=1)
    model_type = str(text.get("model_type", ""))
    num_experts = _int(text, "num_experts", "num_local_experts", "n_routed_experts", default=0)
    moe_inter = _int(text, "moe_intermediate_size", default=0)
    inter = _int(text, "intermediate_size", "ffn_dim", default=moe_inter)
    if num_experts and not moe_inter:
        moe_inter = inter
    shared = _int(text, "shared_expert_intermediate_size", default=0)
    if not shared and text.get("n_shared_experts"):
        shared = _int(text, "n_shared_experts") * moe_inter
    first_dense = _int(text, "first_k_dense_replace", default=0)
    window, sliding_layers = _sliding(text, layers)
    non_kv = len(text.get("cross_attention_layers") or [])
    tie = bool(_get(text, "tie_word_embeddings", default=cfg.get("tie_word_embeddings", False)))
    lengths = length_limit(text, cfg)
    return ModelArch(
        name=name or str(cfg.get("_name_or_path", "")) or model_type,
        model_type=model_type,
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=vocab,
        tie_embeddings=tie,
        attention_bias=bool(text.get("attention_bias", model_type in ("qwen2", "qwen2_moe", "gpt_oss"))),
        num_experts=num_experts,
        experts_per_token=_int(text, "num_experts_per_tok", "experts_per_token", default=0),
        moe_intermediate_size=moe_inter,
        shared_expert_intermediate_size=shared,
        first_dense_layers=first_dense,
        expert_bias=model_type == "gpt_oss",
        kv_lora_rank=_int(text, "kv_lora_rank", default=0),
        qk_rope_head_dim=_int(text, "qk_rope_head_dim", default=0),
        qk_nope_head_dim=_int(text, "qk_nope_head_dim", default=0),
        v_head_dim=_int(text, "v_head_dim", default=0),
        q_lora_rank=_int(text, "q_lora_rank", default=0),
        sliding_window=window,
        sliding_layers=sliding_layers,
        non_kv_layers=non_kv,
        extra_params=extra,
        quantization=quant,
        derived_max_model_len=lengths.limit,
        max_len_key=lengths.key,
        default_max_model_len=lengths.default,
    )


def param_count(arch: ModelArch) -> dict[str, int]:
    """Parameters by kind: 'linear' (quantizable decoder matrices), 'embed', 'head', 'other'."""
    h = arch.hidden_size
    if arch.is_mla:
        qk_head = arch.qk_nope_head_dim + arch.qk_rope_head_dim
        q = h * arch.num_heads * qk_head if not arch.q_lora_rank else h * arch.q_lora_rank + arch.q_lora_rank * arch.num_heads * qk_head
        attn = (
            q
            + h * (arch.kv_lora_rank + arch.qk_rope_head_dim)
            + arch.kv_lora_rank * arch.num_heads * (arch.qk_nope_head_dim + arch.v_head_dim)
            + arch.num_heads * arch.v_head_dim * h
        )
    else:
        q_out = arch.num_heads * arch.head_dim
        kv_out = arch.num_kv_heads * arch.head_dim
        attn = h * q_out + 2 * h * kv_out + q_out * h
    attn_bias = (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim if arch.attention_bias else 0
    dense_mlp = 3 * h * arch.intermediate_size
    linear = 0
    other = 0
    for layer in range(arch.num_layers):
        linear += attn
        other += attn_bias + 2 * h
        if arch.is_moe and layer >= arch.first_dense_layers:
            linear += arch.num_experts * 3 * h * arch.moe_intermediate_size
            linear += 3 * h * arch.shared_expert_intermediate_size
            other += h * arch.num_experts  # the router stays in 16-bit
            if arch.expert_bias:
                other += arch.num_experts * 3 * arch.moe_intermediate_size
        else:
            linear += dense_mlp
    embed = arch.vocab_size * h
    head = 0 if arch.tie_embeddings else arch.vocab_size * h
    return {"linear": linear, "embed": embed, "head": head, "other": other + h + arch.extra_params}
