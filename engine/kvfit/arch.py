"""A model's shape, read from a Hugging Face `config.json` (a local folder or the built-in catalogue).

Only what the memory arithmetic needs: layer counts and widths, attention layout (GQA, MLA, sliding
windows), MoE sizes, vocabulary, tied embeddings, and the checkpoint's quantization.
"""

from __future__ import annotations

import math
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


# The largest width, count or vocabulary the planner accepts from a config.json. The largest published models
# are far below it (hidden 16,384, vocabulary 262,144, 512 experts); a value past it is a damaged file, and
# accepting it would only overflow the arithmetic into a traceback or a meaningless verdict.
MAX_DIM = 1 << 24


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(cfg: dict[str, Any], key: str, *alts: str, default: Any = ..., minimum: int = 0, maximum: int = MAX_DIM,
         where: str = "") -> int:
    """An integer config value; anything else names the key instead of failing somewhere later."""
    found = next((k for k in (key, *alts) if cfg.get(k) is not None), key)
    value = _get(cfg, key, *alts, default=default)
    if value is None:
        value = 0
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value != int(value) or not minimum <= value <= maximum):
        raise ArchError(f"config.json: `{where}{found}` must be a whole number from {minimum:,} to {maximum:,}, "
                        f"got {_shown(value)}")
    return int(value)


# Bit widths vLLM's AWQ/GPTQ kernels take (GPTQConfig: 2, 3, 4, 8; AWQ: 4).
_GPTQ_BITS = (4, 8)
_AWQ_BITS = (4,)


def _group_size(q: dict[str, Any], *keys: str) -> int:
    """A quantization group size; -1 (GPTQ's "per output channel": one scale per column) is 0 here."""
    raw = next((q[k] for k in keys if q.get(k) is not None), 128)
    if raw == -1 and not isinstance(raw, bool):
        return 0
    return _int({keys[0]: raw}, keys[0], minimum=1, where="quantization_config.")


def parse_quantization(cfg: dict[str, Any]) -> Quantization:
    q = cfg.get("quantization_config")
    if q is None or q == {}:
        return NO_QUANT
    if not isinstance(q, dict):
        raise ArchError(f"config.json: `quantization_config` must be an object, got {_shown(q)}")
    raw_method = q.get("quant_method", "")
    if not isinstance(raw_method, str):
        raise ArchError(f"config.json: `quantization_config.quant_method` must be a name, got {_shown(raw_method)}")
    method = raw_method.lower()
    if not method:
        return NO_QUANT
    if method in ("awq", "gptq", "awq_marlin", "gptq_marlin"):
        bits = _int(q, "bits", "w_bit", default=4, minimum=2, maximum=8, where="quantization_config.")
        family = method.split("_")[0]
        # vLLM 0.32 maps awq/gptq (and their _marlin names) to AutoAWQConfig / AutoGPTQConfig, whose TYPE_MAPs
        # take 4-bit AWQ, and 4- or 8-bit symmetric GPTQ; anything else is refused as the model loads.
        allowed = _AWQ_BITS if family == "awq" else _GPTQ_BITS
        if bits not in allowed:
            raise ArchError(f"config.json: `quantization_config.bits` is {bits}; vLLM's {method} kernels take "
                            f"{', '.join(map(str, allowed))}")
        if family == "gptq" and q.get("sym") is not True:
            raise ArchError(f"config.json: `quantization_config.sym` is {_shown(q.get('sym'))}; vLLM's {method} "
                            "kernels take symmetric GPTQ only (sym = true)")
        return Quantization(method.split("_")[0], bits, _group_size(q, "group_size", "q_group_size"))
    if method == "fp8":
        return Quantization("fp8", 8)
    if method == "mxfp4":
        return Quantization("mxfp4", 4, 32)
    if method == "bitsandbytes":
        return Quantization("bnb4", 4, 64) if q.get("load_in_4bit") is True else Quantization("bnb8", 8)
    if method == "compressed-tensors":
        groups = q.get("config_groups") or {}
        if not isinstance(groups, dict):
            raise ArchError(f"config.json: `quantization_config.config_groups` must be an object, got {_shown(groups)}")
        for name, group in groups.items():
            if group is None:
                continue
            weights = group.get("weights") if isinstance(group, dict) else None
            if not isinstance(group, dict) or not isinstance(weights or {}, dict):
                raise ArchError(f"config.json: `quantization_config.config_groups.{name}` must be an object with "
                                "a `weights` object")
            weights = weights or {}
            bits = _int(weights, "num_bits", default=16, minimum=1, maximum=32,
                        where=f"quantization_config.config_groups.{name}.weights.")
            if bits == 8:
                return Quantization("fp8", 8)
            if bits == 4:
                return Quantization("gptq", 4, _group_size(weights, "group_size"))
        return NO_QUANT
    raise ArchError(f"quantization method {method!r} in config.json is not one fleetdeck can size")


def _sliding(cfg: dict[str, Any], layers: int) -> tuple[int | None, int]:
    raw_window = cfg.get("sliding_window")
    window = None if raw_window is None or raw_window is False else (_int(cfg, "sliding_window", minimum=0,
                                                                          maximum=1 << 40) or None)
    layer_types = cfg.get("layer_types")
    if layer_types is not None and not isinstance(layer_types, list):
        raise ArchError(f"config.json: `layer_types` must be a list, got {_shown(layer_types)}")
    if isinstance(layer_types, list) and layer_types:
        if len(layer_types) != layers:  # transformers refuses such a config too (layer_type_validation)
            raise ArchError(f"config.json: `layer_types` names {len(layer_types)} layers but `num_hidden_layers` "
                            f"is {layers}")
        n = sum(1 for t in layer_types if "sliding" in str(t))
        return (window, n) if n else (None, 0)
    if not window or cfg.get("use_sliding_window") is False:
        return None, 0
    model_type = cfg.get("model_type", "")
    if model_type in _QWEN_WINDOWED:
        return _qwen_sliding(cfg, layers, window)
    if model_type == "gemma2":
        return window, (layers + 1) // 2  # every other layer is local, the first one included (layer_types)
    if model_type in ("gemma3", "gemma3_text"):
        pattern = _int(cfg, "sliding_window_pattern", default=6, minimum=1)
        return window, layers - layers // pattern
    mpe = _number(cfg.get("max_position_embeddings"))
    if window >= (mpe or 0):
        return None, 0  # a window as long as the context is full attention
    # Any other config with a window: vLLM gives every attention layer the model-level window
    # (cache_config.sliding_window, from the config's sliding_window) unless the model sets one per layer; so
    # Phi-3-mini-4k's 2,047 tokens and Starcoder2's 4,096 are windows, not full attention.
    return window, layers


# Qwen2/Qwen3 configs put the window on the layers from `max_window_layers` on (transformers'
# Qwen2Config/Qwen3Config derive layer_types so), and only with use_sliding_window.
_QWEN_WINDOWED = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe")


def _qwen_sliding(cfg: dict[str, Any], layers: int, window: int) -> tuple[int | None, int]:
    if cfg.get("use_sliding_window") is not True:
        return None, 0
    sliding = max(0, layers - _int(cfg, "max_window_layers", default=28))  # transformers' default
    if 0 < sliding < layers:
        # vLLM 0.32's Qwen2Model asserts max_window_layers == num_hidden_layers when the layer types are mixed.
        raise ArchError(f"config.json: a sliding window on {sliding} of {layers} layers (`max_window_layers` "
                        f"{layers - sliding}): vLLM supports it on all of a Qwen model's layers or none")
    mpe = _number(cfg.get("max_position_embeddings"))
    if not sliding or window >= (mpe or 0):
        return None, 0  # no layer past max_window_layers, or a window as long as the context: full attention
    return window, sliding


# The config keys vLLM reads a model's length limit from, smallest wins (vLLM 0.32,
# vllm/transformers_utils/model_arch_config_convertor.py: derive_max_model_len_and_key).
_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                 "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
# RoPE types whose max_position_embeddings is already the scaled length (vLLM 0.32, vllm/config/model.py:
# _get_and_verify_max_len; "su" is the old name of longrope; YaRN variants too, as transformers'
# _compute_yarn_parameters assumes). Every other type multiplies the length by its `factor`. (Before 0.32
# vLLM multiplied a YaRN factor into original_max_position_embeddings: 4096 x 32 for gpt-oss, the same
# 131,072 as its max_position_embeddings, but a Qwen3 with YaRN x4 over 32,768 added to its config is
# 40,960 to vLLM 0.32, not 131,072; tests/engines/test_real_planner_refusals.py asks the real engine.)
_PRESCALED_ROPE = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


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


def _length(cfg: dict[str, Any], key: str, where: str = "") -> float | None:
    """A length or factor from config.json: absent (None), or a finite number above 0. vLLM would multiply or
    compare whatever is there, so anything else is refused here, naming the key, rather than planned."""
    value = cfg.get(key)
    if value is None:
        return None
    number = _number(value)
    if number is None or not math.isfinite(number) or number <= 0:
        raise ArchError(f"config.json: `{where}{key}` must be a number above 0, got {_shown(value)}")
    return number


def length_limit(text: dict[str, Any], top: dict[str, Any] | None = None) -> LengthLimit:
    """vLLM's `_get_and_verify_max_len` on a (text) config dict: the smallest length key, an explicit
    model_max_length over it, then the RoPE scaling factor (except where the length is already scaled:
    llama3, longrope, and every Gemma 3). With no length given vLLM takes the derived length, except for
    longrope, where it takes original_max_position_embeddings (the long factors cost quality on short
    prompts); with no length key it assumes 2048. ArchError for a length or factor that is not a number above
    0 (or a limit under one token)."""
    derived: float = float("inf")
    key: str | None = None
    for k in _MAX_LEN_KEYS:
        v = _length(text, k)
        if v is not None and v < derived:
            derived, key = v, k
    explicit = _length(text, "model_max_length")
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
                factor = _length(rp, "factor", "rope_scaling.") or factor  # null: vLLM falls back to 1.0
        derived *= factor
    if not math.isfinite(derived) or derived < 1:
        raise ArchError(f"config.json: `{key}` times its RoPE scaling factor gives {derived:g} tokens; no model "
                        "can be planned with that context length")
    limit = int(derived)
    default = limit
    if any(_rope_type(rp) == "longrope" for rp in params):
        original = _length(top or {}, "original_max_position_embeddings") or _length(text, "original_max_position_embeddings")
        default = int(original) if original else limit
    return LengthLimit(limit, key, default)


def derived_max_model_len(text: dict[str, Any]) -> tuple[int | None, str | None]:
    """The length vLLM derives from a (text) config.json, and the key it names when it refuses a longer one."""
    lim = length_limit(text)
    return lim.limit, lim.key


def arch_from_config(cfg: dict[str, Any], name: str = "") -> ModelArch:
    """Parse a Hugging Face config dict (text config of multimodal models included); ArchError when it
    holds values no model has."""
    if not isinstance(cfg, dict):
        raise ArchError("config.json is not a JSON object of model settings")
    if not isinstance(cfg.get("text_config") or cfg, dict):
        raise ArchError(f"config.json: `text_config` must be an object, got {_shown(cfg['text_config'])}")
    try:
        return _parse_config(cfg, name)
    except ArchError:
        raise
    except (ValueError, TypeError, ZeroDivisionError, AttributeError, OverflowError) as exc:
        raise ArchError(f"config.json holds a value fleetdeck cannot size a model from ({type(exc).__name__}: {exc})") from None


def _parse_config(cfg: dict[str, Any], name: str) -> ModelArch:
    quant = parse_quantization(cfg)
    text = cfg.get("text_config") or cfg
    extra = _int(cfg, "_fleetdeck_extra_params", default=0, maximum=1 << 40)
    if text is not cfg:
        text = {**text, "model_type": text.get("model_type") or cfg.get("model_type", "")}
        if "quantization_config" in cfg and "quantization_config" not in text:
            text["quantization_config"] = cfg["quantization_config"]
    layers = _int(text, "num_hidden_layers", "n_layer", "num_layers", minimum=1)
    hidden = _int(text, "hidden_size", "n_embd", "d_model", minimum=1)
    heads = _int(text, "num_attention_heads", "n_head", minimum=1)
    kv_heads = _int(text, "num_key_value_heads", default=heads, minimum=1)
    if text.get("head_dim") is None and hidden < heads:
        raise ArchError(f"config.json: `hidden_size` {hidden} over {heads} attention heads leaves no head size, "
                        "and there is no `head_dim`")
    head_dim = _int(text, "head_dim", default=hidden // heads, minimum=1)
    vocab = _int(text, "vocab_size", minimum=1)
    model_type = str(text.get("model_type", ""))
    mla = _int(text, "kv_lora_rank", default=0) > 0
    if not mla and heads % kv_heads:
        # vLLM's Attention layer asserts it while building the model (grouped-query attention shares each KV head
        # among a whole number of query heads).
        raise ArchError(f"config.json: num_heads ({heads}) is not divisible by num_kv_heads ({kv_heads}): vLLM "
                        "cannot build this model's attention")
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
    cross = text.get("cross_attention_layers") or []
    if not isinstance(cross, list) or len(cross) >= layers:
        raise ArchError(f"config.json: `cross_attention_layers` must be a list of fewer than {layers} layer "
                        f"indices, got {_shown(cross)}")
    non_kv = len(cross)
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
    # The layers from first_dense_layers on have experts instead of one MLP (closed form: a config's layer count
    # is never looped over).
    moe_layers = max(0, arch.num_layers - arch.first_dense_layers) if arch.is_moe else 0
    dense_layers = arch.num_layers - moe_layers
    linear = arch.num_layers * attn + dense_layers * dense_mlp
    other = arch.num_layers * (attn_bias + 2 * h)
    linear += moe_layers * (arch.num_experts * 3 * h * arch.moe_intermediate_size + 3 * h * arch.shared_expert_intermediate_size)
    other += moe_layers * h * arch.num_experts  # the router stays in 16-bit
    if arch.expert_bias:
        other += moe_layers * arch.num_experts * 3 * arch.moe_intermediate_size
    embed = arch.vocab_size * h
    head = 0 if arch.tie_embeddings else arch.vocab_size * h
    return {"linear": linear, "embed": embed, "head": head, "other": other + h + arch.extra_params}
