"""Why a vLLM server died, from its log tail, and the fix to try."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Diagnosis:
    kind: str
    summary: str
    fix: str

    def text(self) -> str:
        return f"{self.summary} Fix: {self.fix}"


_RULES: list[tuple[str, re.Pattern[str], str, str]] = [
    ("kv_blocks", re.compile(r"No available memory for the cache blocks"),
     "vLLM found no memory left for KV-cache blocks after loading the weights.",
     "raise --gpu-memory-utilization, use a quantized checkpoint (AWQ/GPTQ/FP8), or add GPUs (tensor_parallel_size)."),
    ("max_len", re.compile(r"max seq len \((\d+)\).*?estimated maximum model length is (\d+)", re.S),
     "max_model_len {0} is larger than the KV cache holds.",
     "set max_model_len to {1} or less (vLLM's estimate), use kv_cache_dtype = \"fp8\", or raise gpu_memory_utilization."),
    ("free_memory", re.compile(r"Free memory on device \(([\d.]+)/([\d.]+) GiB\) on startup is less than desired GPU "
                               r"memory utilization \(([\d.]+), ([\d.]+) GiB\)"),
     "Only {0} of {1} GiB was free at start-up, less than the {3} GiB that gpu_memory_utilization {2} asks for: "
     "another process holds memory on this GPU.",
     "stop the other process (see the Fleet screen's GPU detail), pick another GPU, or lower gpu_memory_utilization."),
    ("oom_weights", re.compile(r"(CUDA out of memory|OutOfMemoryError)"),
     "CUDA ran out of memory (while loading the weights or warming up).",
     "use a quantized checkpoint, more GPUs (tensor_parallel_size), a smaller max_model_len, or free the GPU."),
    ("port_in_use", re.compile(r"(Address already in use|address already in use)"),
     "The port is already in use.",
     "pick another port in the profile (or port = \"auto\"), or stop what listens there."),
    ("model_missing", re.compile(r"(Invalid repository ID or local directory specified: '([^']*)'|does not appear to have a "
                                 r"file named config.json|Repository Not Found|couldn't connect to 'https://huggingface.co')"),
     "The model was not found ({0}).",
     "check the profile's model path exists on this node and holds config.json (air-gapped hosts cannot download)."),
]


def diagnose(log_text: str) -> Diagnosis | None:
    for kind, pattern, summary, fix in _RULES:
        m = None
        for m in pattern.finditer(log_text):
            pass  # the last occurrence is the one that killed it
        if m:
            groups = [g if g is not None else "" for g in m.groups()]
            return Diagnosis(kind, summary.format(*groups), fix.format(*groups))
    return None


def tail(path: str | Path, lines: int = 40, max_bytes: int = 64 * 1024) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(data.splitlines()[-lines:])
