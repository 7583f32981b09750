"""Crash diagnosis against real vLLM logs (tests/data/vllm-0.32.0/, captured from vLLM's CPU build by
provoking each failure): the cause and the fix an operator sees on the Servers screen and in `serve ls`."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.vllm.diagnose import diagnose
from engine.vllm.simulator import CRASH_LOGS

REAL = Path(__file__).parent / "data" / "vllm-0.32.0"


@pytest.mark.parametrize(
    "log, kind, says",
    [
        ("max_len_derived.log", "max_len_derived", "set max_model_len to 256.0 or less"),
        ("model_missing.log", "model_missing", "/srv/models/no-such-model does not exist on this node"),
        ("lora_rank_invalid.log", "lora_rank", "one of 1, 8, 16, 32, 64, 128, 256, 320, 512"),
        ("port_in_use.log", "port_in_use", "port is already in use"),
        ("kv_too_small.log", "max_len", "max_model_len 524288 is larger than the KV cache holds"),
        ("engine_dead.log", "engine_dead", "engine process died"),
    ],
)
def test_each_real_vllm_failure_gets_its_cause_and_fix(log, kind, says):
    d = diagnose((REAL / log).read_text())
    assert d is not None and d.kind == kind, d
    assert says in d.text() and "Fix:" in d.text()


@pytest.mark.parametrize("mode", sorted(set(CRASH_LOGS) - {"model_missing"}))
def test_the_simulators_crash_texts_are_diagnosed_the_same_way(mode):
    assert diagnose(CRASH_LOGS[mode]).kind == mode


def test_an_unknown_failure_is_not_guessed():
    assert diagnose("Segmentation fault (core dumped)") is None
