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
