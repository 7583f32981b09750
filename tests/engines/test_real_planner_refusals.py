"""The planner's refusals against the real engine's own checks (vLLM 0.32's CPU build, in its environment).

A refusal the planner adds must be one vLLM makes, in vLLM's words: the planner runs vLLM's configuration
classes in .venv-vllm (no server, no model: each check is vLLM constructing a config) and compares.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from engine.kvfit import FitRequest, plan
from engine.kvfit.arch import arch_from_config
from engine.kvfit.catalogue import CATALOGUE
from tests.engines.stack import isolated_env

GIB = 1024**3
# Each case: what vLLM says when it builds its scheduler config with these settings (None: it accepts them).
PROBE = r"""
import json, sys
from vllm.config import SchedulerConfig
out = []
for batched, seqs, max_len in json.loads(sys.argv[1]):
    try:
        SchedulerConfig(max_num_batched_tokens=batched, max_num_seqs=seqs, max_model_len=max_len, is_encoder_decoder=False)
        out.append(None)
    except Exception as exc:  # pydantic wraps vLLM's ValueError
        out.append(str(exc))
print("RESULT " + json.dumps(out))
"""
CASES = [(16, 1024, 4096), (256, 256, 4096), (8192, 1024, 131072), (255, 256, 512)]


def test_a_batch_below_max_num_seqs_is_refused_in_vllms_words(real_vllm: Path, tmp_path):
    done = subprocess.run([str(real_vllm), "-c", PROBE, json.dumps(CASES)], capture_output=True, text=True,
                          env=isolated_env(tmp_path), timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    vllm_says = json.loads(lines[-1][len("RESULT "):])
    arch = arch_from_config(CATALOGUE["Qwen/Qwen3-8B"])
    for (batched, seqs, max_len), said in zip(CASES, vllm_says):
        r = plan(arch, FitRequest(gpu_memory_bytes=80 * GIB, max_num_batched_tokens=batched, max_num_seqs=seqs,
                                  max_model_len=min(max_len, 40960)))
        refused = bool(r.reason and "must be greater than or equal to max_num_seqs" in r.reason)
        assert refused == (said is not None), (batched, seqs, said, r.reason)
        if said is not None:
            words = f"max_num_batched_tokens ({batched}) must be greater than or equal to max_num_seqs ({seqs})"
            assert words in said and words in r.reason


def test_a_qwen_window_past_max_window_layers_is_sized_as_vllm_sizes_it(real_vllm: Path, tmp_path):
    """Qwen2 with use_sliding_window: transformers (vLLM's, 5.x) windows the layers from max_window_layers on.
    Every layer windowed: vLLM allocates a window's worth of blocks per request, and so does the planner; none
    windowed (max_window_layers = the layer count, the usual config): full attention; some: vLLM refuses to build
    the model, and the planner refuses to plan it. The configs carry no layer_types, so each side derives them."""
    from engine.kvfit import ArchError, load_model
    from engine.vllm.command import cpu_block_size
    from tests.fakes.tiny_model import make_tiny_arch

    max_len, batched = 512, 256
    shapes = {"all-windowed": 0, "none-windowed": 3, "mixed": 1}
    folders = {}
    for name, max_window_layers in shapes.items():
        folder = make_tiny_arch(tmp_path / name, "qwen2", num_hidden_layers=3, max_position_embeddings=max_len,
                                use_sliding_window=True, sliding_window=128, max_window_layers=max_window_layers)
        cfg = json.loads((folder / "config.json").read_text())
        cfg.pop("layer_types", None)  # as older checkpoints have it: derived from max_window_layers on load
        cfg.update(use_sliding_window=True, sliding_window=128, max_window_layers=max_window_layers)
        (folder / "config.json").write_text(json.dumps(cfg))
        folders[name] = folder
    env = {**isolated_env(tmp_path), "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run([str(real_vllm), str(Path(__file__).with_name("kv_probe.py")), str(max_len), str(batched),
                           *map(str, folders.values())], capture_output=True, text=True, env=env, timeout=900)
    found = {Path(d["model"]).name: d for d in map(json.loads, (x for x in done.stdout.splitlines() if x.startswith("{")))}
    assert set(found) == set(shapes), done.stderr[-3000:]
    assert "error" in found["mixed"], found["mixed"]
    try:
        load_model(str(folders["mixed"]))
        raise AssertionError("the planner planned a model vLLM refuses to build")
    except ArchError as exc:
        assert "all of a Qwen model's layers or none" in str(exc)
    for name in ("all-windowed", "none-windowed"):
        real = found[name]
        assert "error" not in real, real
        arch, _ = load_model(str(folders[name]))
        assert arch.sliding_layers == (3 if name == "all-windowed" else 0)
        block = cpu_block_size(arch)
        ours = plan(arch, FitRequest(available_kv_bytes=GIB, max_model_len=max_len, block_size=block,
                                     max_num_batched_tokens=batched))
        assert ours.num_gpu_blocks == real["num_blocks"], (name, real)
        assert abs(ours.max_concurrency * max_len - real["kv_cache_size_tokens"]) < block, (name, ours.max_concurrency, real)


def test_model_level_windows_and_an_odd_gemma2_are_sized_as_vllm_sizes_them(real_vllm: Path, tmp_path):
    """A window in any config (Phi-3-mini-4k's 2,047 tokens) is every layer's in vLLM, not only Mistral's: the
    planner planned such a Phi-3 as full attention. Gemma-2 windows every other layer from the first, so an odd
    layer count has one more windowed layer than full ones (the planner had one fewer)."""
    from engine.kvfit import load_model
    from engine.vllm.command import cpu_block_size
    from tests.fakes.tiny_model import make_tiny_arch

    max_len, batched = 512, 256
    folders = {
        "phi3-window": make_tiny_arch(tmp_path / "phi3-window", "phi3", num_hidden_layers=3, num_key_value_heads=2,
                                      max_position_embeddings=max_len, sliding_window=128),
        "gemma2-odd": make_tiny_arch(tmp_path / "gemma2-odd", "gemma2", num_hidden_layers=3, head_dim=64,
                                     max_position_embeddings=max_len, sliding_window=128),
    }
    env = {**isolated_env(tmp_path), "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run([str(real_vllm), str(Path(__file__).with_name("kv_probe.py")), str(max_len), str(batched),
                           *map(str, folders.values())], capture_output=True, text=True, env=env, timeout=900)
    found = {Path(d["model"]).name: d for d in map(json.loads, (x for x in done.stdout.splitlines() if x.startswith("{")))}
    assert set(found) == set(folders), done.stderr[-3000:]
    expected_sliding = {"phi3-window": 3, "gemma2-odd": 2}
    for name, folder in folders.items():
        real = found[name]
        assert "error" not in real, real
        arch, _ = load_model(str(folder))
        assert arch.sliding_layers == expected_sliding[name]
        block = cpu_block_size(arch)
        ours = plan(arch, FitRequest(available_kv_bytes=GIB, max_model_len=max_len, block_size=block,
                                     max_num_batched_tokens=batched))
        assert ours.num_gpu_blocks == real["num_blocks"], (name, real)
        assert abs(ours.max_concurrency * max_len - real["kv_cache_size_tokens"]) < block, (name, ours.max_concurrency, real)


LENGTH_PROBE = r"""
import json, sys
from vllm.config import ModelConfig
for folder in sys.argv[1:]:
    try:
        print(json.dumps({"model": folder, "max_model_len": ModelConfig(model=folder).max_model_len}), flush=True)
    except Exception as exc:
        print(json.dumps({"model": folder, "error": str(exc)[:300]}), flush=True)
"""


def test_the_length_limit_under_each_rope_scaling_is_vllms(real_vllm: Path, tmp_path):
    """vLLM 0.32's ModelConfig derives the default max_model_len from config.json: the planner must find the
    same for each RoPE scaling (YaRN is already scaled in 0.32; the planner multiplied it, promising 4x)."""
    import shutil

    from engine.kvfit import load_model
    from tests.fakes.tiny_model import make_tiny_arch

    base = make_tiny_arch(tmp_path / "base", "llama", max_position_embeddings=256)
    cases = {"yarn": {"rope_type": "yarn", "factor": 4.0}, "old-type-yarn": {"type": "yarn", "factor": 4.0},
             "yarn-original": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
             "linear": {"rope_type": "linear", "factor": 4.0}, "dynamic": {"rope_type": "dynamic", "factor": 2.0},
             "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 32}}
    folders = {}
    for name, rope in cases.items():
        folder = tmp_path / name
        shutil.copytree(base, folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg.pop("rope_parameters", None)
        cfg["rope_scaling"] = rope
        (folder / "config.json").write_text(json.dumps(cfg))
        folders[name] = folder
    done = subprocess.run([str(real_vllm), "-c", LENGTH_PROBE, *map(str, folders.values())], capture_output=True,
                          text=True, env=isolated_env(tmp_path), timeout=600)
    found = {Path(d["model"]).name: d for d in map(json.loads, (x for x in done.stdout.splitlines() if x.startswith("{")))}
    assert set(found) == set(cases), done.stderr[-3000:]
    for name, folder in folders.items():
        assert "error" not in found[name], found[name]
        arch, _ = load_model(str(folder))
        assert arch.default_max_model_len == arch.derived_max_model_len == found[name]["max_model_len"], (name, found[name])
