"""The demo's vLLM servers: simulated servers started through the real launcher, with live figures,
adapters to swap, and one server that crashes (with a diagnosis) after a minute."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.kvfit.training import DEFAULT_TARGETS
from engine.vllm import launcher
from engine.vllm.profile import Profile
from fleet.model import GpuSnapshot

if TYPE_CHECKING:
    from store.db import Store

GIB = 1024**3
DEMO_SERVERS = (
    # profile, GPU, simulator environment
    ({"name": "mistral-7b-awq", "model": "mistralai/Mistral-7B-Instruct-v0.3-AWQ", "served_model_name": "mistral-7b",
      "quantization": "awq", "kv_cache_dtype": "fp8", "max_model_len": 16384,
      "lora": {"enable": True, "max_loras": 4, "max_lora_rank": 64, "preload": ["tickets-v3"]}},
     0, {"FLEETDECK_SIM_LOAD": "6"}),
    ({"name": "qwen3-8b", "model": "Qwen/Qwen3-8B", "max_model_len": 32768,
      "lora": {"enable": True, "max_loras": 8, "max_lora_rank": 64}},
     1, {"FLEETDECK_SIM_LOAD": "3", "FLEETDECK_SIM_NUM_GPU_BLOCKS": "24555"}),
    ({"name": "llama-3.1-8b", "model": "meta-llama/Llama-3.1-8B-Instruct", "max_model_len": 8192},
     3, {"FLEETDECK_SIM_LOAD": "2", "FLEETDECK_SIM_CRASH_AFTER": "60"}),
)


def make_demo_adapters(root: Path) -> None:
    """Small LoRA adapter folders (config + a tiny safetensors file) to browse and swap in the demo."""
    import struct

    specs = [("tickets-v3", 64, "mistralai/Mistral-7B-Instruct-v0.3-AWQ"), ("tickets-v4", 64, "mistralai/Mistral-7B-Instruct-v0.3-AWQ"),
             ("notes-v1", 32, "Qwen/Qwen3-8B"), ("notes-wide", 128, "Qwen/Qwen3-8B")]
    for name, rank, base in specs:
        folder = root / name
        if (folder / "adapter_config.json").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": rank * 2, "lora_dropout": 0.05, "base_model_name_or_path": base,
            "target_modules": list(DEFAULT_TARGETS),
            "task_type": "CAUSAL_LM"}, indent=2))

        # A valid safetensors file with no tensors, written by hand: the demo needs no numpy.
        header = json.dumps({"__metadata__": {"simulated": "true", "rank": str(rank)}}).encode()
        header += b" " * (-len(header) % 8)
        (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
        (folder / "fleetdeck.json").write_text(json.dumps({"simulated": True, "base_model": base}))


def start_demo_servers(store: Store, workdir: Path) -> list[Any]:
    adapters = workdir / "adapters"
    make_demo_adapters(adapters)
    idle_h100 = GpuSnapshot(node="sim-h100-01", index=0, name="NVIDIA H100 80GB HBM3", uuid="sim",
                            memory_total_bytes=int(79.65 * GIB), memory_used_bytes=int(0.5 * GIB))
    started = []
    saved = dict(os.environ)
    try:
        for spec, gpu, env in DEMO_SERVERS:
            os.environ.clear()
            os.environ.update(saved)
            os.environ.update(env)
            os.environ["FLEETDECK_VLLM"] = f"{sys.executable} -m engine.vllm.simulator"
            os.environ["FLEETDECK_SIM_START_DELAY"] = "3"
            profile = Profile.model_validate(spec)
            rec, _ = launcher.start(store, profile, [gpu], gpu_snapshots=[idle_h100], force=True,
                                    adapter_roots=[adapters], node="sim-h100-01", log_dir=workdir / "servers")
            started.append(rec)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return started


def stop_demo_servers(store: Store, records: list[Any]) -> None:
    for rec in records:
        try:
            launcher.stop(store, launcher.get(store, rec.id), timeout=5)
        except Exception:
            pass


def start_demo_job(store: Store, workdir: Path) -> Any:
    """A simulated fine-tune (labelled simulated) so the Jobs screen has something moving."""
    from engine.finetune import jobs
    from engine.finetune.spec import JobSpec
    from engine.kvfit.catalogue import CATALOGUE

    base = workdir / "base-model"
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text(json.dumps(CATALOGUE["mistralai/Mistral-7B-Instruct-v0.3"]))
    data = workdir / "tickets-train.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"ticket {i}: my invoice is wrong"},
                                                       {"role": "assistant", "content": "billing"}]}) for i in range(200)))
    spec = JobSpec(name="tickets-v5-sim", base_model=base, dataset=data, backend="simulated", max_steps=600,
                   adapter_root=workdir / "adapters")
    return jobs.start(store, spec, [2], gpu_snapshots=None, force=True, node="sim-h100-01")
