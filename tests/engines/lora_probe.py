"""Run inside vLLM's environment: start vLLM's engine on each model, with or without LoRA, and print what it
sized, one JSON line per model. `python lora_probe.py MAX_LEN util=U|kv=GIB MAX_LORAS RANK FOLDER...`
(MAX_LORAS 0: LoRA off; LORA_PROBE_TARGETS=q_proj,v_proj: --lora-target-modules).

With util=U there is no VLLM_CPU_KVCACHE_SPACE: the CPU worker then sizes its KV cache as a GPU worker does,
from the memory it may use (node memory x U) minus what the process already holds (its resident set after
loading the model, LoRA buffers included, and warming it up: cpu_worker.determine_available_memory). So the KV
cache shrinks by what LoRA holds, as on a GPU. With kv=GIB the KV space is fixed (cheap, for the buffer check).
Besides the engine's own KV figures, each line carries the bytes of every LoRA buffer the engine allocated,
summed over the model's LoRA layers (vLLM's own create_lora_weights).
"""

from __future__ import annotations

import gc
import json
import os
import sys


def lora_buffer_bytes(model: object) -> dict[str, int]:
    """Bytes of the stacked LoRA tensors of every wrapped layer, by wrapper class."""
    import torch

    out: dict[str, int] = {}
    seen: set[int] = set()
    for _, module in model.named_modules():  # type: ignore[attr-defined]
        if not type(module).__name__.endswith("WithLoRA"):
            continue
        for name, value in vars(module).items():
            if "stacked" not in name or name.endswith("_2d"):  # the embedding's 2-D view shares its storage
                continue
            tensors = value if isinstance(value, (tuple, list)) else (value,)
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    kind = type(module).__name__
                    out[kind] = out.get(kind, 0) + t.untyped_storage().nbytes()
    return out


def main() -> int:
    max_len, memory, slots, rank, folders = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
    kind, _, value = memory.partition("=")
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    sizing = {"gpu_memory_utilization": float(value)} if kind == "util" else {"kv_cache_memory_bytes": int(float(value) * (1 << 30))}
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function
    from vllm import LLM

    lora: dict[str, object] = dict(enable_lora=True, max_loras=slots, max_lora_rank=rank) if slots else {}
    if slots and os.environ.get("LORA_PROBE_TARGETS"):  # vLLM's --lora-target-modules
        lora["lora_target_modules"] = os.environ["LORA_PROBE_TARGETS"].split(",")
    tp = int(os.environ.get("LORA_PROBE_TP", "1"))  # TP > 1: one worker process per rank (the CPU build's mp)
    for folder in folders:
        try:
            llm = LLM(model=folder, max_model_len=max_len, max_num_seqs=4, max_num_batched_tokens=max_len,
                      enforce_eager=True, dtype="bfloat16", tensor_parallel_size=tp,
                      distributed_executor_backend="uni" if tp == 1 else "mp", **sizing, **lora)
        except Exception as exc:  # one architecture the engine refuses does not hide the others
            print(json.dumps({"model": folder, "error": f"{type(exc).__name__}: {exc}"[:500]}), flush=True)
            continue
        cache = llm.llm_engine.vllm_config.cache_config
        buffers = llm.apply_model(lora_buffer_bytes)[0] if lora else {}  # rank 0's (every rank's are alike)
        print(json.dumps({"model": folder, "num_blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
                          "lora_buffers": buffers}), flush=True)
        del llm
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
