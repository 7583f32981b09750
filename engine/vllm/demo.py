"""What the demo runs, written as an operator would write it: model folders, launch profiles, fine-tune
specs, a dataset and adapters, in the demo's own folder (engine/demo/home.py). Its servers are
fleetdeck's vLLM simulator started through the real launcher (the profiles name it as their
`vllm_command`), its fine-tunes the simulated trainer backend; the planner reads the model folders'
config.json as it would a real model's.

The demo backend starts three servers (one crashes after a minute, with its diagnosis) and one
fine-tune from these same profiles and specs; the start dialogs offer them too.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from engine.kvfit.training import DEFAULT_TARGETS

if TYPE_CHECKING:
    from engine.demo.home import DemoHome
    from engine.finetune.jobs import JobRecord
    from engine.vllm.record import ServerRecord
    from fleet.model import GpuSnapshot
    from store.db import Store

# Model folders (a config.json each, from the planner's catalogue): name -> catalogue entry, quantization.
DEMO_MODELS = {
    "Mistral-7B-Instruct-v0.3-AWQ": ("mistralai/Mistral-7B-Instruct-v0.3", "awq"),
    "Qwen3-8B": ("Qwen/Qwen3-8B", None),
    "Llama-3.1-8B-Instruct": ("meta-llama/Llama-3.1-8B-Instruct", None),
    "Llama-3.2-3B-Instruct": ("meta-llama/Llama-3.2-3B-Instruct", None),
}


@dataclass(frozen=True)
class DemoProfile:
    name: str
    model: str  # a folder of DEMO_MODELS
    settings: dict[str, Any]  # the profile's other keys
    sim_env: dict[str, str]  # the simulator's knobs, in the profile's [env]


DEMO_PROFILES = (
    DemoProfile("mistral-7b-awq", "Mistral-7B-Instruct-v0.3-AWQ",
                {"served_model_name": "mistral-7b", "quantization": "awq", "kv_cache_dtype": "fp8", "max_model_len": 16384,
                 "lora": {"enable": True, "max_loras": 4, "max_lora_rank": 64, "preload": ["tickets-v3"]}},
                {"FLEETDECK_SIM_LOAD": "6"}),
    DemoProfile("qwen3-8b", "Qwen3-8B",
                {"served_model_name": "qwen3-8b", "max_model_len": 32768,
                 "lora": {"enable": True, "max_loras": 8, "max_lora_rank": 64}},
                {"FLEETDECK_SIM_LOAD": "3", "FLEETDECK_SIM_NUM_GPU_BLOCKS": "24555"}),
    DemoProfile("llama-3.1-8b", "Llama-3.1-8B-Instruct", {"served_model_name": "llama-3.1-8b", "max_model_len": 8192},
                {"FLEETDECK_SIM_LOAD": "2"}),
    # Small enough for the A10s and the RTX 4090, which the demo leaves free for the operator.
    DemoProfile("llama-3.2-3b", "Llama-3.2-3B-Instruct",
                {"served_model_name": "llama-3.2-3b", "max_model_len": 8192,
                 "lora": {"enable": True, "max_loras": 4, "max_lora_rank": 32}},
                {"FLEETDECK_SIM_LOAD": "2"}),
)

# What the backend starts: profile, node, GPU, extra simulator knobs for this run only (not in the profile,
# so a restart from the Servers screen brings the server up healthy).
DEMO_NODE = "sim-h100-01"
DEMO_SERVERS: tuple[tuple[str, int, dict[str, str]], ...] = (
    ("mistral-7b-awq", 0, {}),
    ("qwen3-8b", 1, {}),
    ("llama-3.1-8b", 3, {"FLEETDECK_SIM_CRASH_AFTER": "60"}),
)

# Fine-tune specs: name -> (base model folder, steps). The backend runs the first one on GPU 2.
DEMO_SPECS = {
    "tickets-v5": ("Mistral-7B-Instruct-v0.3-AWQ", 600),
    "notes-v2": ("Qwen3-8B", 120),  # finishes in a minute: then `v` serves it into qwen3-8b
}
DEMO_JOB = ("tickets-v5", 2)

# Adapters to browse and swap: name, rank, base model as its trainer named it (a hub id: fleetdeck matches
# it to a server's model folder by the last part of the name, as for any adapter).
DEMO_ADAPTERS = (("tickets-v3", 64, "mistralai/Mistral-7B-Instruct-v0.3-AWQ"),
                 ("tickets-v4", 64, "mistralai/Mistral-7B-Instruct-v0.3-AWQ"),
                 ("notes-v1", 32, "Qwen/Qwen3-8B"), ("notes-wide", 128, "Qwen/Qwen3-8B"))


def simulator_command() -> list[str]:
    """The demo's `vllm`: fleetdeck's simulator, run by this Python."""
    return [sys.executable, "-m", "engine.vllm.simulator"]


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # strings, numbers, booleans and lists of them read the same in TOML


def profile_toml(p: DemoProfile, models: Path) -> str:
    lines = ["# fleetdeck demo: a launch profile served by fleetdeck's vLLM simulator (no GPU, no model weights)",
             f"name = {_toml_value(p.name)}", f"model = {_toml_value(str(models / p.model))}"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in p.settings.items() if k != "lora"]
    lines += [f"vllm_command = {_toml_value(simulator_command())}",
              # servers listen on loopback unless a profile says otherwise
              'host = "127.0.0.1"', OS_PORT_LINES.rstrip("\n")]
    if "lora" in p.settings:
        lines += ["", "[lora]", *(f"{k} = {_toml_value(v)}" for k, v in p.settings["lora"].items())]
    lines += ["", "[env]", 'FLEETDECK_SIM_START_DELAY = "3"', *(f"{k} = {_toml_value(v)}" for k, v in p.sim_env.items())]
    return "\n".join(lines) + "\n"


def spec_toml(name: str, base: Path, steps: int, dataset: Path, adapters: Path) -> str:
    return "\n".join([
        "# fleetdeck demo: a fine-tune on the simulated trainer (steps, loss and a small adapter; no model)",
        f"name = {_toml_value(name)}", f"base_model = {_toml_value(str(base))}", f"dataset = {_toml_value(str(dataset))}",
        'backend = "simulated"', "lora_rank = 16", f"max_steps = {steps}", "warmup_steps = 5",
        f"adapter_root = {_toml_value(str(adapters))}",
    ]) + "\n"


def _write(path: Path, text: str, replaces: tuple[str, ...] = ()) -> None:
    """Written once: an operator trying the demo may edit a profile or spec, and keeps the edit. A file
    that is still, byte for byte, what an earlier fleetdeck wrote (`replaces`) was never edited: it is
    brought up to date."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    elif replaces and path.read_text(encoding="utf-8") in replaces:
        path.write_text(text, encoding="utf-8")


OS_PORT_LINES = ("# a port the OS picks, not the first free from 8000: a test run or a real service there on the\n"
                 "# operator's host is never in the demo's way, nor the demo in theirs\n"
                 'port = "os"\n')


def profile_before_os_port(text: str) -> str:
    """A demo profile as fleetdeck wrote it before its port was the OS's choice (it took 8000 and up)."""
    return text.replace(OS_PORT_LINES, "")


def write_demo_files(home: DemoHome) -> None:
    from engine.kvfit.catalogue import CATALOGUE

    for folder, (entry, quant) in DEMO_MODELS.items():
        config = dict(CATALOGUE[entry])
        if quant:
            config["quantization_config"] = {"quant_method": quant, "bits": 4, "group_size": 128}
        _write(home.models / folder / "config.json", json.dumps(config, indent=2))
    for p in DEMO_PROFILES:
        text = profile_toml(p, home.models)
        _write(home.profiles / f"{p.name}.toml", text, replaces=(profile_before_os_port(text),))
    dataset = home.data / "tickets-train.jsonl"
    _write(dataset, "\n".join(json.dumps({"messages": [{"role": "user", "content": f"ticket {i}: my invoice is wrong"},
                                                       {"role": "assistant", "content": "billing"}]})
                              for i in range(200)) + "\n")
    for name, (base, steps) in DEMO_SPECS.items():
        _write(home.specs / f"{name}.toml", spec_toml(name, home.models / base, steps, dataset, home.adapters))
    make_demo_adapters(home.adapters)


def make_demo_adapters(root: Path) -> None:
    """Small LoRA adapter folders (config + a tiny safetensors file) to browse and swap in the demo."""
    for name, rank, base in DEMO_ADAPTERS:
        folder = root / name
        if (folder / "adapter_config.json").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": rank * 2, "lora_dropout": 0.05,
            "base_model_name_or_path": base, "target_modules": list(DEFAULT_TARGETS),
            "task_type": "CAUSAL_LM"}, indent=2))
        # A valid safetensors file with no tensors, written by hand: the demo needs no numpy.
        header = json.dumps({"__metadata__": {"simulated": "true", "rank": str(rank)}}).encode()
        header += b" " * (-len(header) % 8)
        (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
        (folder / "fleetdeck.json").write_text(json.dumps({"simulated": True, "base_model": base}))


def start_demo_servers(store: Store, home: DemoHome, gpu_snapshot: Callable[[int], GpuSnapshot]) -> list[ServerRecord]:
    """The backend's three servers, through the real launcher, from the demo's own profiles."""
    from engine.vllm import launcher
    from engine.vllm.profile import load_profile

    started = []
    for name, gpu, knobs in DEMO_SERVERS:
        profile = load_profile(home.profiles / f"{name}.toml")
        saved = {k: os.environ.get(k) for k in knobs}
        os.environ.update(knobs)  # FLEETDECK_SIM_* reach the simulator through its inherited environment
        try:
            rec, _ = launcher.start(store, profile, [gpu], gpu_snapshots=[gpu_snapshot(gpu)], force=True,
                                    adapter_roots=[home.adapters], node=DEMO_NODE, log_dir=home.server_logs)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        started.append(rec)
    return started


def start_demo_job(store: Store, home: DemoHome, gpu_snapshot: Callable[[int], GpuSnapshot]) -> JobRecord:
    """A simulated fine-tune (labelled simulated) so the Jobs screen has something moving."""
    from engine.finetune import jobs
    from engine.finetune.spec import load_spec

    name, gpu = DEMO_JOB
    return jobs.start(store, load_spec(home.specs / f"{name}.toml"), [gpu], gpu_snapshots=[gpu_snapshot(gpu)],
                      force=True, node=DEMO_NODE, jobs_dir=home.jobs)
