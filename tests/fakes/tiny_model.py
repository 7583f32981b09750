"""A tiny randomly initialised causal LM and its tokenizer, made on the spot: no downloads."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ("the invoice is wrong please route to billing the password reset failed route to it support "
         "my order never arrived route to shipping thanks hello user assistant system").split()


def make_dataset(path: Path, n: int = 24) -> Path:
    rows = []
    for i in range(n):
        topic = ("billing", "it support", "shipping")[i % 3]
        rows.append({"messages": [{"role": "user", "content": f"ticket {i}: the invoice is wrong please route"},
                                  {"role": "assistant", "content": f"route to {topic}"}]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# A chat template vLLM's OpenAI server can render (it refuses chat requests to a tokenizer without one).
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")


def _save_tokenizer(folder: Path) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)] + [str(i) for i in range(100)] + [":"],
                            trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return tok.get_vocab_size()


def make_tiny_model(folder: Path, *, hidden_size: int = 32, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                    max_position_embeddings: int = 128, seed: int = 0) -> Path:
    """A two-layer Llama. vLLM's CPU attention needs head_dim 64: hidden_size=128, num_attention_heads=2."""
    return make_tiny_arch(folder, "llama", seed=seed, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                          num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings)


# transformers' config and model class for each architecture the planner is checked against.
ARCHES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
}


def make_tiny_arch(folder: Path, model_type: str, *, seed: int = 0, **shape: object) -> Path:
    """A tiny random model of `model_type` (a key of ARCHES) with its tokenizer; `shape` overrides config keys."""
    import torch
    import transformers

    vocab = _save_tokenizer(folder)
    config_cls, model_cls = (getattr(transformers, n) for n in ARCHES[model_type])
    base: dict[str, object] = dict(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                   bos_token_id=2, eos_token_id=3, pad_token_id=1)
    if "intermediate_size" not in shape:
        base["intermediate_size"] = 2 * int(shape.get("hidden_size", base["hidden_size"]))  # type: ignore[call-overload]
    config = config_cls(**{**base, **shape})
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(str(folder))
    return folder


def make_peft_adapter(base: Path, out: Path, rank: int = 8, seed: int = 0) -> Path:
    """A LoRA adapter for `base` as PEFT writes it (untrained: B starts at zero), without a training run."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(str(out))
    return out
