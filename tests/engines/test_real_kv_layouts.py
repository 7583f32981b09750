"""The planner's KV arithmetic against the real engine, one architecture at a time.

Each tiny model has a shape chosen so that a wrong term would show: GQA with two KV heads, an odd layer
count, an explicit head_dim unlike hidden/heads (Qwen3, with q/k norm), full multi-head attention
(Mistral), Phi-3's fused projections, Gemma-2's alternating sliding-window layers (vLLM's hybrid
allocator: two KV groups, a window's worth of blocks for the sliding one) and DeepSeek-V2's multi-head
latent attention (one compressed latent per token and layer). vLLM's engine sizes a fixed 1 GiB CPU KV
space for each; the planner, given the same space, must find the same number of blocks and vLLM's
logged token capacity (max concurrency x max_model_len) to within one block.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from engine.kvfit import load_model
from engine.kvfit.plan import FitRequest, plan
from engine.vllm.command import cpu_block_size
from tests.engines.stack import isolated_env
from tests.fakes.tiny_model import make_tiny_arch

GIB = 1024**3
MAX_LEN, BATCHED = 512, 256
SHAPES = {
    "llama-gqa": ("llama", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)),
    "qwen2-3layers": ("qwen2", dict(num_hidden_layers=3)),
    "qwen3-head_dim128": ("qwen3", dict(head_dim=128)),
    "mistral-mha": ("mistral", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, sliding_window=None)),
    "phi3": ("phi3", dict(num_hidden_layers=3, num_key_value_heads=2)),
    "gemma2-sliding": ("gemma2", dict(num_hidden_layers=4, head_dim=64, sliding_window=128)),
    "deepseek_v2-mla": ("deepseek_v2", dict(num_hidden_layers=3, kv_lora_rank=128, qk_rope_head_dim=64,
                                            qk_nope_head_dim=64, v_head_dim=64, q_lora_rank=None, n_routed_experts=2,
                                            num_experts_per_tok=1, n_shared_experts=1, first_k_dense_replace=3,
                                            moe_intermediate_size=64)),
}
SHAPES = {k: (t, {"max_position_embeddings": MAX_LEN, **s}) for k, (t, s) in SHAPES.items()}


@pytest.fixture(scope="module")
def engine_sizes(real_vllm: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("kv-layouts")
    folders = {name: make_tiny_arch(root / name, arch, **shape) for name, (arch, shape) in SHAPES.items()}
    env = {**isolated_env(root), "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run([str(real_vllm), str(Path(__file__).with_name("kv_probe.py")), str(MAX_LEN), str(BATCHED),
                           *map(str, folders.values())], capture_output=True, text=True, env=env, timeout=900)
    found = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            doc = json.loads(line)
            found[Path(doc["model"]).name] = doc
    assert set(found) == set(SHAPES), done.stderr[-3000:]
    return found


@pytest.mark.parametrize("name", list(SHAPES))
def test_the_planner_sizes_the_kv_cache_as_vllm_does(engine_sizes, name, tmp_path_factory):
    real = engine_sizes[name]
    assert "error" not in real, real["error"]
    folder = Path(real["model"])
    arch, _ = load_model(str(folder))
    block = cpu_block_size(arch)  # 16 for MLA on a CPU without AMX (vLLM's reference CPU MLA kernel), else 128
    ours = plan(arch, FitRequest(available_kv_bytes=GIB, max_model_len=MAX_LEN, block_size=block,
                                 max_num_batched_tokens=BATCHED))
    assert real["block_size"] == block
    assert ours.num_gpu_blocks == real["num_blocks"], (name, ours.kv_bytes_per_token, real)
    capacity = ours.max_concurrency * MAX_LEN
    assert abs(capacity - real["kv_cache_size_tokens"]) < block, (name, capacity, real)
    assert ours.fits
