"""The planner's LoRA memory against the real engine (vLLM 0.32's CPU build).

1. What LoRA takes from the KV cache: the engine starts twice on the same tiny Llama, without and with
   --enable-lora (32 slots at rank 512: about 1 GiB of buffers on a 35 MB model, so the difference stands far
   above the process's noise), sizing its KV cache from memory as a GPU worker does (no VLLM_CPU_KVCACHE_SPACE:
   the CPU worker then takes node memory x utilisation minus what the process holds after loading and warming
   the model up). The KV cache each start logs ("CPU KV cache size: N tokens") differs by what LoRA holds; the
   planner's figure for the buffers must match that difference within 3% (the process's other allocations:
   LoRA's code, its CPU dummy adapters for the warm-up).
2. Byte for byte, per architecture: the stacked A/B buffers vLLM allocated (summed over the model's LoRA
   layers, through the engine's apply_model) against the planner's, for shapes that show each rule: GQA with
   embedding and LM-head buffers (Llama, Qwen3), none (Qwen2, Mistral, Gemma-2), Phi-3's fused projections, and
   DeepSeek-V2's MLA with experts; and --lora-target-modules, which leaves only the layers it names.

3. The split over two tensor-parallel ranks (the CPU build's multiprocess executor), GQA and a replicated KV
   head, byte for byte.

What the CPU build cannot show: CUDA graphs (none on CPU; the planner doubles them with LoRA, from vLLM's
capture cases) and the profile run's fp32 shrink buffer (a transient: the CPU worker measures what the process
holds, not a peak).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from engine.kvfit import load_model
from engine.kvfit.lora import LoraSettings, lora_memory
from engine.kvfit.plan import FitRequest, plan
from tests.engines.stack import isolated_env
from tests.fakes.tiny_model import make_tiny_arch

GIB = 1024**3
MAX_LEN = 512
PROBE = Path(__file__).with_name("lora_probe.py")
SLOTS, RANK = 32, 512
# Wide enough that LoRA's buffers dwarf the model: 4 layers, hidden 512, 8 heads of 64 (2 KV heads).
BIG_LLAMA = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, intermediate_size=1024,
                 num_hidden_layers=4, max_position_embeddings=MAX_LEN)
# The KV cache the CPU worker takes: about this much beyond the process, whatever the host's memory.
REQUESTED_BYTES = int(4.5 * GIB)
TOLERANCE = 0.03


def _node_memory() -> int:
    """The memory vLLM's CPU worker takes its utilisation of: NUMA node 0's, else the machine's."""
    try:
        for line in Path("/sys/devices/system/node/node0/meminfo").read_text().splitlines():
            if "MemTotal:" in line:
                return int(line.split()[3]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _probe(python: Path, env: dict[str, str], memory: str, slots: int, rank: int, *folders: Path
           ) -> tuple[list[dict], str]:
    done = subprocess.run([str(python), str(PROBE), str(MAX_LEN), memory, str(slots), str(rank), *map(str, folders)],
                          capture_output=True, text=True, env=env, timeout=900)
    log = done.stdout + done.stderr
    found = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(found) == len(folders), log[-3000:]
    return found, log


def _logged_kv_tokens(log: str) -> int:
    """The KV cache vLLM reports at start-up: "CPU KV cache size: 2,133,248 tokens" (GPU on a GPU)."""
    sizes = re.findall(r"KV cache size: ([\d,]+) tokens", log)
    assert len(sizes) == 1, log[-3000:]
    return int(sizes[0].replace(",", ""))


def test_lora_takes_from_the_kv_cache_what_the_planner_says(real_vllm: Path, tmp_path: Path):
    folder = make_tiny_arch(tmp_path / "llama", "llama", **BIG_LLAMA)
    env = {k: v for k, v in isolated_env(tmp_path).items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    util = f"util={min(0.9, REQUESTED_BYTES / _node_memory()):.4f}"
    (off,), off_log = _probe(real_vllm, env, util, 0, 0, folder)
    (on,), on_log = _probe(real_vllm, env, util, SLOTS, RANK, folder)
    assert "Auto set" in off_log and "Auto set" in on_log  # sized from memory, not a fixed KV space

    arch, _ = load_model(str(folder))
    per_token = plan(arch, FitRequest(available_kv_bytes=GIB, max_model_len=MAX_LEN, block_size=128)).kv_bytes_per_token
    vllm_lora = (_logged_kv_tokens(off_log) - _logged_kv_tokens(on_log)) * per_token
    planned = lora_memory(arch, LoraSettings(max_loras=SLOTS, max_lora_rank=RANK), tp=1, batched_tokens=MAX_LEN).buffers
    assert planned == sum(on["lora_buffers"].values())  # vLLM's own allocation, to the byte
    assert abs(vllm_lora - planned) <= TOLERANCE * planned, (vllm_lora, planned)


ARCHES = {
    "llama": ("llama", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": ("qwen2", dict(num_hidden_layers=3)),
    "qwen3": ("qwen3", dict(head_dim=128)),
    "mistral": ("mistral", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, sliding_window=None)),
    "phi3": ("phi3", dict(num_hidden_layers=3, num_key_value_heads=2)),
    "gemma2": ("gemma2", dict(num_hidden_layers=4, head_dim=64, sliding_window=128)),
    "deepseek_v2": ("deepseek_v2", dict(num_hidden_layers=3, kv_lora_rank=128, qk_rope_head_dim=64, qk_nope_head_dim=64,
                                        v_head_dim=64, q_lora_rank=None, n_routed_experts=2, num_experts_per_tok=1,
                                        n_shared_experts=1, first_k_dense_replace=1, moe_intermediate_size=64)),
}


def test_the_planner_sizes_each_architectures_lora_buffers_as_vllm_allocates_them(real_vllm: Path, tmp_path: Path):
    folders = {name: make_tiny_arch(tmp_path / name, arch, max_position_embeddings=MAX_LEN, **shape)
               for name, (arch, shape) in ARCHES.items()}
    env = {**isolated_env(tmp_path), "VLLM_CPU_KVCACHE_SPACE": "1"}
    found, log = _probe(real_vllm, env, "kv=1", 2, 16, *folders.values())
    mismatches = {}
    for doc in found:
        assert "error" not in doc, doc
        arch, _ = load_model(doc["model"])
        ours = lora_memory(arch, LoraSettings(max_loras=2, max_lora_rank=16), tp=1, batched_tokens=MAX_LEN).buffers
        theirs = sum(doc["lora_buffers"].values())
        if ours != theirs:
            mismatches[Path(doc["model"]).name] = (ours, theirs, doc["lora_buffers"])
    assert not mismatches, mismatches


def test_the_tp_split_of_the_buffers_is_vllms(real_vllm: Path, tmp_path: Path):
    """Two CPU ranks (the CPU build's multiprocess executor, one core each): column layers keep A whole and split
    B, row layers split A and keep B, the embedding and LM head stay whole, and a KV head replicated over the ranks
    (1 KV head at TP 2) is allocated on each. Rank 0's buffers against the planner's per-GPU figure."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip(f"tensor parallelism on the CPU build needs two CPUs to bind its ranks to; this host allows {cpus}")
    folders = [make_tiny_arch(tmp_path / name, "llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=kv,
                              max_position_embeddings=MAX_LEN) for name, kv in (("gqa", 2), ("replicated", 1))]
    env = {**isolated_env(tmp_path), "VLLM_CPU_KVCACHE_SPACE": "1", "LORA_PROBE_TP": "2",
           "VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[1]}"}
    found, _ = _probe(real_vllm, env, "kv=1", 2, 16, *folders)
    for doc in found:
        assert "error" not in doc, doc
        arch, _ = load_model(doc["model"])
        ours = lora_memory(arch, LoraSettings(max_loras=2, max_lora_rank=16), tp=2, batched_tokens=MAX_LEN)
        assert ours.buffers == sum(doc["lora_buffers"].values()), (doc["model"], ours, doc["lora_buffers"])
        assert ours.buffers < lora_memory(arch, LoraSettings(2, 16), tp=1, batched_tokens=MAX_LEN).buffers


def test_target_modules_leave_only_the_layers_they_name(real_vllm: Path, tmp_path: Path):
    """--lora-target-modules q_proj v_proj: vLLM wraps only the packed q/k/v layer (all three slices, since
    the wrapper is the packed layer's) and nothing else; the planner sizes the same."""
    arch_name, shape = ARCHES["llama"]
    folder = make_tiny_arch(tmp_path / "llama", arch_name, max_position_embeddings=MAX_LEN, **shape)
    env = {**isolated_env(tmp_path), "VLLM_CPU_KVCACHE_SPACE": "1", "LORA_PROBE_TARGETS": "q_proj,v_proj"}
    (doc,), _ = _probe(real_vllm, env, "kv=1", 2, 16, folder)
    assert set(doc["lora_buffers"]) == {"MergedQKVParallelLinearWithLoRA"}, doc
    arch, _ = load_model(str(folder))
    ours = lora_memory(arch, LoraSettings(max_loras=2, max_lora_rank=16, target_modules=("q_proj", "v_proj")),
                       tp=1, batched_tokens=MAX_LEN)
    assert ours.buffers == doc["lora_buffers"]["MergedQKVParallelLinearWithLoRA"] and ours.modules == "q/k/v"
