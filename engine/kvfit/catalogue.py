"""Built-in model shapes, because an air-gapped host cannot fetch a config from a hub.

Each entry is the part of the model's Hugging Face `config.json` that sizing needs, parsed by the
same `arch_from_config` as a local folder. Names resolve from repo ids as written, case-insensitively,
with or without the organisation, and quantized variants (-AWQ, -GPTQ-Int4, -w4a16, -FP8, ...) resolve
to their base model plus that quantization.
"""

from __future__ import annotations

import re
from typing import Any, TypedDict

from engine.kvfit.arch import ArchError, ModelArch, Quantization, arch_from_config


def _dense(layers: int, hidden: int, heads: int, kv: int, inter: int, vocab: int, tied: bool, *,
           head_dim: int | None = None, model_type: str = "llama", **extra: Any) -> dict[str, Any]:
    # The result is a config.json: heterogeneous JSON that arch_from_config parses, hence dict[str, Any].
    cfg: dict[str, Any] = {
        "model_type": model_type,
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
    }
    if head_dim:
        cfg["head_dim"] = head_dim
    cfg.update(extra)
    return cfg


class _Context(TypedDict, total=False):
    """The context-length keys a family shares, spliced into _dense's keywords (typed, so mypy checks each
    against the parameter it lands in)."""

    max_position_embeddings: int
    rope_scaling: dict[str, str | float]


class _Family(_Context, total=False):
    """A family whose shape also fixes the model type (and head size): its entries pass neither again."""

    model_type: str
    head_dim: int


# The context-length part of each config.json, as published on the model's Hugging Face page: vLLM derives
# the longest max_model_len it accepts (and its default) from these (arch.length_limit).
_LLAMA31_ROPE: dict[str, str | float] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA32_ROPE: dict[str, str | float] = {**_LLAMA31_ROPE, "factor": 32.0}
_L31 = _Context(max_position_embeddings=131072, rope_scaling=_LLAMA31_ROPE)
_L32 = _Context(max_position_embeddings=131072, rope_scaling=_LLAMA32_ROPE)
_L2 = _Context(max_position_embeddings=4096)
_L3 = _Context(max_position_embeddings=8192)
_Q2 = _Family(model_type="qwen2", max_position_embeddings=32768)
_Q3 = _Family(model_type="qwen3", head_dim=128, max_position_embeddings=40960)
# Gemma 3's 128k is already the scaled length (vLLM skips its linear factor for every gemma3 model).
_GEMMA3_LEN = _Context(max_position_embeddings=131072, rope_scaling={"rope_type": "linear", "factor": 8.0})
# gpt-oss: YaRN x32 over a 4k original: 131,072.
_GPT_OSS_LEN = _Context(max_position_embeddings=131072, rope_scaling={
    "rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0})

CATALOGUE: dict[str, dict[str, Any]] = {
    "mistralai/Mistral-7B-Instruct-v0.3": _dense(32, 4096, 32, 8, 14336, 32768, False, model_type="mistral",
                                                   max_position_embeddings=32768),
    "mistralai/Mistral-Small-24B-Instruct-2501": _dense(40, 5120, 32, 8, 32768, 131072, False, head_dim=128, model_type="mistral",
                                                         max_position_embeddings=32768),
    "mistralai/Mistral-Small-3.1-24B-Instruct-2503": _dense(
        40, 5120, 32, 8, 32768, 131072, False, head_dim=128, model_type="mistral", _fleetdeck_extra_params=440_000_000,
        max_position_embeddings=131072,
    ),
    "mistralai/Mistral-Small-3.2-24B-Instruct-2506": _dense(
        40, 5120, 32, 8, 32768, 131072, False, head_dim=128, model_type="mistral", _fleetdeck_extra_params=440_000_000,
        max_position_embeddings=131072,
    ),
    "meta-llama/Llama-2-7b-hf": _dense(32, 4096, 32, 32, 11008, 32000, False, **_L2),
    "meta-llama/Llama-2-7b-chat-hf": _dense(32, 4096, 32, 32, 11008, 32000, False, **_L2),
    "meta-llama/Llama-2-70b-hf": _dense(80, 8192, 64, 8, 28672, 32000, False, **_L2),
    "meta-llama/Llama-2-70b-chat-hf": _dense(80, 8192, 64, 8, 28672, 32000, False, **_L2),
    "meta-llama/Meta-Llama-3-8B": _dense(32, 4096, 32, 8, 14336, 128256, False, **_L3),
    "meta-llama/Meta-Llama-3-8B-Instruct": _dense(32, 4096, 32, 8, 14336, 128256, False, **_L3),
    "meta-llama/Llama-3.1-8B": _dense(32, 4096, 32, 8, 14336, 128256, False, **_L31),
    "meta-llama/Llama-3.1-8B-Instruct": _dense(32, 4096, 32, 8, 14336, 128256, False, **_L31),
    "meta-llama/Llama-3.1-70B-Instruct": _dense(80, 8192, 64, 8, 28672, 128256, False, **_L31),
    "meta-llama/Llama-3.2-1B-Instruct": _dense(16, 2048, 32, 8, 8192, 128256, True, head_dim=64, **_L32),
    "meta-llama/Llama-3.2-3B-Instruct": _dense(28, 3072, 24, 8, 8192, 128256, True, head_dim=128, **_L32),
    # 40 decoder layers, of which 8 cross-attend to the image: they cache image tokens, not text.
    "meta-llama/Llama-3.2-11B-Vision-Instruct": {
        "model_type": "mllama",
        "text_config": {
            **_dense(40, 4096, 32, 8, 14336, 128264, False, model_type="mllama_text_model", **_L31),
            "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
        },
        "_fleetdeck_extra_params": 880_000_000,
    },
    "meta-llama/Llama-3.3-70B-Instruct": _dense(80, 8192, 64, 8, 28672, 128256, False, **_L31),
    "Qwen/Qwen1.5-7B-Chat": _dense(32, 4096, 32, 32, 11008, 151936, False, **_Q2),
    "Qwen/Qwen2.5-0.5B-Instruct": _dense(24, 896, 14, 2, 4864, 151936, True, **_Q2),
    "Qwen/Qwen2.5-1.5B-Instruct": _dense(28, 1536, 12, 2, 8960, 151936, True, **_Q2),
    "Qwen/Qwen2.5-3B-Instruct": _dense(36, 2048, 16, 2, 11008, 151936, True, **_Q2),
    "Qwen/Qwen2.5-7B-Instruct": _dense(28, 3584, 28, 4, 18944, 152064, False, **_Q2),
    "Qwen/Qwen2.5-14B-Instruct": _dense(48, 5120, 40, 8, 13824, 152064, False, **_Q2),
    "Qwen/Qwen2.5-32B-Instruct": _dense(64, 5120, 40, 8, 27648, 152064, False, **_Q2),
    "Qwen/Qwen2.5-72B-Instruct": _dense(80, 8192, 64, 8, 29568, 152064, False, **_Q2),
    "Qwen/Qwen3-0.6B": _dense(28, 1024, 16, 8, 3072, 151936, True, **_Q3),
    "Qwen/Qwen3-1.7B": _dense(28, 2048, 16, 8, 6144, 151936, True, **_Q3),
    "Qwen/Qwen3-4B": _dense(36, 2560, 32, 8, 9728, 151936, True, **_Q3),
    "Qwen/Qwen3-8B": _dense(36, 4096, 32, 8, 12288, 151936, False, **_Q3),
    "Qwen/Qwen3-14B": _dense(40, 5120, 40, 8, 17408, 151936, False, **_Q3),
    "Qwen/Qwen3-32B": _dense(64, 5120, 64, 8, 25600, 151936, False, **_Q3),
    "Qwen/Qwen3-30B-A3B": _dense(
        48, 2048, 32, 4, 6144, 151936, False, head_dim=128, model_type="qwen3_moe",
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, max_position_embeddings=40960,
    ),
    "Qwen/Qwen3-235B-A22B": _dense(
        94, 4096, 64, 4, 12288, 151936, False, head_dim=128, model_type="qwen3_moe",
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=1536, max_position_embeddings=40960,
    ),
    # LongRoPE: vLLM accepts up to 131,072 but starts at the original 4,096 when no length is given.
    "microsoft/Phi-3.5-mini-instruct": _dense(
        32, 3072, 32, 32, 8192, 32064, False, model_type="phi3", max_position_embeddings=131072,
        original_max_position_embeddings=4096, rope_scaling={"type": "longrope", "long_factor": [1.0], "short_factor": [1.0]},
    ),
    "microsoft/phi-4": _dense(40, 5120, 40, 10, 17920, 100352, False, model_type="phi3", max_position_embeddings=16384),
    "google/gemma-2-9b-it": _dense(42, 3584, 16, 8, 14336, 256000, True, head_dim=256, model_type="gemma2", sliding_window=4096,
                                   max_position_embeddings=8192),
    "google/gemma-2-27b-it": _dense(46, 4608, 32, 16, 36864, 256000, True, head_dim=128, model_type="gemma2", sliding_window=4096,
                                    max_position_embeddings=8192),
    "google/gemma-3-4b-it": {
        "model_type": "gemma3",
        "text_config": _dense(34, 2560, 8, 4, 10240, 262208, True, head_dim=256, model_type="gemma3_text",
                              sliding_window=1024, sliding_window_pattern=6, **_GEMMA3_LEN),
        "_fleetdeck_extra_params": 417_000_000,
    },
    "google/gemma-3-12b-it": {
        "model_type": "gemma3",
        "text_config": _dense(48, 3840, 16, 8, 15360, 262208, True, head_dim=256, model_type="gemma3_text",
                              sliding_window=1024, sliding_window_pattern=6, **_GEMMA3_LEN),
        "_fleetdeck_extra_params": 417_000_000,
    },
    "google/gemma-3-27b-it": {
        "model_type": "gemma3",
        "text_config": _dense(62, 5376, 32, 16, 21504, 262208, True, head_dim=128, model_type="gemma3_text",
                              sliding_window=1024, sliding_window_pattern=6, **_GEMMA3_LEN),
        "_fleetdeck_extra_params": 417_000_000,
    },
    "deepseek-ai/DeepSeek-V2-Lite-Chat": _dense(
        27, 2048, 16, 16, 10944, 102400, False, model_type="deepseek_v2",
        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        n_routed_experts=64, num_experts_per_tok=6, moe_intermediate_size=1408, n_shared_experts=2,
        first_k_dense_replace=1, max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                      "mscale": 0.707, "mscale_all_dim": 0.707},
    ),
    # Linear RoPE x4 over 16,384: vLLM accepts 65,536.
    "deepseek-ai/deepseek-coder-6.7b-instruct": _dense(32, 4096, 32, 32, 11008, 32256, False, max_position_embeddings=16384,
                                                       rope_scaling={"type": "linear", "factor": 4.0}),
    # gpt-oss ships MXFP4 experts; attention alternates a 128-token window with full layers.
    "openai/gpt-oss-20b": _dense(
        24, 2880, 64, 8, 2880, 201088, False, head_dim=64, model_type="gpt_oss",
        num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * 12,
        quantization_config={"quant_method": "mxfp4"}, **_GPT_OSS_LEN,
    ),
    "openai/gpt-oss-120b": _dense(
        36, 2880, 64, 8, 2880, 201088, False, head_dim=64, model_type="gpt_oss",
        num_local_experts=128, num_experts_per_tok=4, sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * 18,
        quantization_config={"quant_method": "mxfp4"}, **_GPT_OSS_LEN,
    ),
}

ALIASES = {
    "deepseek-ai/DeepSeek-V2-Lite": "deepseek-ai/DeepSeek-V2-Lite-Chat",
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "meta-llama/Meta-Llama-3.1-70B-Instruct": "meta-llama/Llama-3.1-70B-Instruct",
    "mistralai/Mistral-7B-v0.3": "mistralai/Mistral-7B-Instruct-v0.3",
    "google/gemma-2-9b": "google/gemma-2-9b-it",
    "google/gemma-2-27b": "google/gemma-2-27b-it",
    "Qwen/Qwen1.5-7B": "Qwen/Qwen1.5-7B-Chat",
    "deepseek-ai/deepseek-coder-6.7b-base": "deepseek-ai/deepseek-coder-6.7b-instruct",
}

# Suffixes of quantized repos, checked in order; each maps to a quantization of the base model.
_QUANT_SUFFIXES: tuple[tuple[str, Quantization], ...] = (
    (r"[-_.]awq(?:[-_.]int4)?$", Quantization("awq", 4, 128)),
    (r"[-_.]gptq(?:[-_.]int4|[-_.]4bit)?(?:[-_.]\w+)?$", Quantization("gptq", 4, 128)),
    (r"[-_.]gptq[-_.]int8$", Quantization("gptq", 8, 128)),
    (r"[-_.](?:quantized[-_.])?w4a16(?:[-_.]\w+)?$", Quantization("gptq", 4, 128)),
    (r"[-_.](?:quantized[-_.])?w8a8(?:[-_.]\w+)?$", Quantization("fp8", 8)),
    (r"[-_.]fp8(?:[-_.]dynamic)?$", Quantization("fp8", 8)),
    (r"[-_.]bnb[-_.]4bit$", Quantization("bnb4", 4, 64)),
)


def _index() -> dict[str, str]:
    idx: dict[str, str] = {}
    for repo in CATALOGUE:
        idx[repo.lower()] = repo
        idx[repo.split("/", 1)[1].lower()] = repo
    for alias, repo in ALIASES.items():
        idx[alias.lower()] = repo
        idx[alias.split("/", 1)[1].lower()] = repo
    return idx


_INDEX = _index()


def _lookup(name: str) -> str | None:
    key = name.strip().lower()
    if key in _INDEX:
        return _INDEX[key]
    # "-Instruct"/"-it"/"-Chat" are the same shape as the base model.
    for suffix in ("-instruct", "-chat", "-it"):
        if key + suffix in _INDEX:
            return _INDEX[key + suffix]
        if key.endswith(suffix) and key[: -len(suffix)] in _INDEX:
            return _INDEX[key[: -len(suffix)]]
    return None


def resolve(name: str) -> tuple[str, Quantization | None]:
    """Map a repo id (quantized variants included) to a catalogue entry and a quantization."""
    repo = _lookup(name)
    if repo:
        return repo, None
    bare = name.strip().split("/")[-1]
    for pattern, quant in _QUANT_SUFFIXES:
        m = re.search(pattern, bare, flags=re.IGNORECASE)
        if m:
            repo = _lookup(bare[: m.start()])
            if repo:
                return repo, quant
    raise ArchError(
        f"unknown model {name if len(name) <= 120 else name[:117] + '...'!r}: not in the built-in catalogue (see `fleetdeck fit --list-models`); "
        "pass a local model folder with a config.json instead"
    )


def catalogue_arch(name: str) -> ModelArch:
    repo, quant = resolve(name)
    cfg = CATALOGUE[repo]
    arch = arch_from_config(cfg, name=repo)
    if quant is not None:
        from dataclasses import replace

        arch = replace(arch, quantization=quant, name=f"{repo} ({quant.label})")
    return arch


def list_models() -> list[str]:
    return sorted(CATALOGUE, key=str.lower)
