"""How close the planner comes to published vLLM start-up logs (tests/data/vllm_kv_points.jsonl).

Prints one row per point: KV tokens from the logged available memory (the KV arithmetic alone) and
available KV memory from the GPU's total (the overhead model too). Usage: python bench/kvfit_reference.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.kvfit import FitRequest, plan  # noqa: E402
from engine.kvfit.catalogue import catalogue_arch  # noqa: E402

GIB = 1024**3
REFERENCE = ROOT / "tests" / "data" / "vllm_kv_points.jsonl"
NAMES = {"Qwen2.5-7B-Instruct-AWQ": "Qwen/Qwen2.5-7B-Instruct-AWQ", "Qwen3-14B": "Qwen/Qwen3-14B"}


def main() -> None:
    print("| model | vLLM | GPU GiB | KV dtype | KV tokens (log) | planner | error | available KV GiB (log) | "
          "estimate | error | lower bound | over-promise |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    close = over = counted = 0
    for line in REFERENCE.read_text().splitlines():
        p = json.loads(line)
        name = p["model"].split(" (")[0]
        name = NAMES.get(name, name)
        arch = catalogue_arch(name)
        kv = p["kv_cache_dtype"] or "auto"
        total = p["total_gpu_memory_gib"]
        r1 = plan(arch, FitRequest(available_kv_bytes=int(p["available_kv_gib"] * GIB), max_model_len=p["max_model_len"],
                                   kv_cache_dtype=kv, gpu_memory_bytes=int((total or 80) * GIB)))
        tok_err = (r1.kv_tokens / p["kv_tokens"] - 1) * 100
        avail = "n/a | n/a | n/a | n/a"
        if total and p["gpu_memory_utilization"]:
            engine = "v0" if "V0 log" in p["notes"] else "v1"
            version = {"vllm_version": p["vllm_version"]} if p["vllm_version"] else {}
            r2 = plan(arch, FitRequest(gpu_memory_bytes=int(total * GIB), gpu_memory_utilization=p["gpu_memory_utilization"],
                                       max_model_len=p["max_model_len"], kv_cache_dtype=kv, gpu_name=p["gpu"], engine=engine,
                                       **version))
            diff = r2.available_kv_gib - p["available_kv_gib"]
            ok = abs(diff) <= max(0.05 * p["available_kv_gib"], 0.75)
            promised = r2.available_kv_gib_low > p["available_kv_gib"]
            counted += 1
            close += ok
            over += promised
            avail = (f"{r2.available_kv_gib:.2f} | {diff:+.2f} GiB ({diff / p['available_kv_gib'] * 100:+.1f}%){'' if ok else ' !'} | "
                     f"{r2.available_kv_gib_low:.2f} | {'YES' if promised else 'no'}")
        print(f"| {name} | {p['vllm_version'] or '?'} | {total or 'n/a'} | {kv} | {p['kv_tokens']:,} | {r1.kv_tokens:,} | "
              f"{tok_err:+.2f}% | {p['available_kv_gib']} | {avail} |")
    print(f"\nestimate within 5% or 0.75 GiB: {close}/{counted}; lower bound above vLLM's figure (over-promise): {over}/{counted}")


if __name__ == "__main__":
    main()
