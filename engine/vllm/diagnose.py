"""Why a vLLM server died, from its log tail, and the fix to try."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Diagnosis:
    kind: str
    summary: str
    fix: str

    def text(self) -> str:
        return f"{self.summary} Fix: {self.fix}"


# Each rule: the text vLLM prints (the simulator prints the same), what it means, and the fix. The
# texts are checked against real vLLM logs in tests/data/vllm-*/ (see tests/test_diagnose.py).
_RULES: list[tuple[str, re.Pattern[str], str, str]] = [
    ("max_len_derived", re.compile(r"User-specified max_model_len \((\d+)\) is greater than the derived max_model_len "
                                   r"\((\w+)=([\d.]+)"),
     "max_model_len {0} is above the model's own limit ({1}={2} in its config.json).",
     "set max_model_len to {2} or less in the profile (VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 overrides the check, "
     "at the risk of garbage past the trained length)."),
    ("lora_rank", re.compile(r"argument --max-lora-rank: invalid choice: (\d+) \(choose from ([\d, ]+)\)"),
     "max_lora_rank {0} is not one vLLM accepts ({1}).",
     "set [lora] max_lora_rank in the profile to one of {1}, at least the largest adapter rank you load."),
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
    ("model_missing", re.compile(r"Repo id must be in the form 'repo_name' or 'namespace/repo_name': '(/[^']*)'"),
     "The model folder {0} does not exist on this node (vLLM took the path for a hub id).",
     "check the profile's model path exists on this node and holds config.json (air-gapped hosts cannot download)."),
    ("model_missing", re.compile(r"(Invalid repository ID or local directory specified: '([^']*)'|does not appear to have a "
                                 r"file named config.json|Repository Not Found|couldn't connect to 'https://huggingface.co')"),
     "The model was not found ({0}).",
     "check the profile's model path exists on this node and holds config.json (air-gapped hosts cannot download)."),
    # Last: vLLM prints these after most start-up failures too, so the specific rules above come first.
    ("engine_dead", re.compile(r"(engine core exited unexpectedly|EngineDeadError|Engine core proc \S+ died unexpectedly)"),
     "vLLM's engine process died and the API server shut down with it.",
     "look above in the log (`serve logs`) for what killed it (out of memory, a signal, a kernel error), then restart the server."),
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

