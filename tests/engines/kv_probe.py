"""Run inside vLLM's environment: start vLLM's engine on each model with a fixed CPU KV space and print
what it sized, one JSON line per model. `python kv_probe.py MAX_LEN BATCHED FOLDER...`

The engine runs in this process (no engine-core or worker subprocess), so one interpreter checks
several architectures in seconds each; the KV cache is sized by the same code path as the server's.
"""

from __future__ import annotations

import gc
import json
import os
import sys


def main() -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    max_len, batched, folders = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    for folder in folders:
        try:
            llm = LLM(model=folder, max_model_len=max_len, max_num_batched_tokens=batched, max_num_seqs=4,
                      enforce_eager=True, distributed_executor_backend="uni")
        except Exception as exc:  # one architecture the engine refuses does not hide the others
            print(json.dumps({"model": folder, "error": f"{type(exc).__name__}: {exc}"[:500]}), flush=True)
            continue
        cache = llm.llm_engine.vllm_config.cache_config
        print(json.dumps({"model": folder, "num_blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
                          "kv_cache_size_tokens": getattr(cache, "kv_cache_size_tokens", None),
                          "max_concurrency": getattr(cache, "kv_cache_max_concurrency", None)}), flush=True)
        del llm
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
