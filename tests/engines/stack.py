"""The real-engine tier's helpers: the CLI in a process of its own, profiles for vLLM's CPU build,
an environment of the test's own, and the running server's handle."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from engine.vllm.command import API_SERVER_MODULE
from tests.engines.vllm_cpu_env import env_dir

ROOT = Path(__file__).resolve().parents[2]


def vllm_python() -> Path:
    return Path(os.environ.get("FLEETDECK_TEST_VLLM") or env_dir() / "bin" / "python")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`fleetdeck ...` in a process of its own, as an operator (or a restarted dashboard) runs it."""
    return subprocess.run([sys.executable, "-m", "fleetdeck", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@dataclass
class RealServer:
    root: Path
    base: Path
    env: dict[str, str]
    store: Path
    fleet: Path
    profile: Path
    adapters: Path
    id: str
    base_url: str

    def common(self) -> list[str]:
        return ["--store", str(self.store), "--config", str(self.fleet)]

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return cli(self.env, *args, *self.common(), timeout=timeout)

    def run_router(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Router commands (report, calibrate): their --config is the router config, not the fleet's."""
        return cli(self.env, *args, "--store", str(self.store), timeout=timeout)


def write_profile(path: Path, python: Path, model: Path, *, name: str = "tiny-real", max_model_len: int = 256,
                  max_lora_rank: int = 16, kv_space_gib: int = 1) -> Path:
    path.write_text("\n".join([
        f'name = "{name}"', f'model = "{model}"', 'served_model_name = "tiny"', f"max_model_len = {max_model_len}",
        'port = "auto"', f"vllm_command = {json.dumps([str(python), '-m', API_SERVER_MODULE])}",
        "[env]", f'VLLM_CPU_KVCACHE_SPACE = "{kv_space_gib}"',
        "[lora]", "enable = true", "max_loras = 2", f"max_lora_rank = {max_lora_rank}",
    ]) + "\n")
    return path


def isolated_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEETDECK_", "XDG_"))}
    env.update(XDG_DATA_HOME=str(root / "data"), XDG_CONFIG_HOME=str(root / "config"), XDG_STATE_HOME=str(root / "state"),
               HF_HUB_OFFLINE="1", LITELLM_LOCAL_MODEL_COST_MAP="True", NO_PROXY="127.0.0.1,localhost",
               # vLLM's compile cache stays inside the test's folder
               VLLM_CACHE_ROOT=str(root / "vllm-cache"))
    return env


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def train(server: "RealServer", name: str, seed: int, steps: int = 6, lr: float = 0.001) -> Path:
    """A peft fine-tune on CPU through `finetune start`; the version it registered."""
    from tests.fakes.tiny_model import make_dataset

    data = make_dataset(server.root / f"{name}.jsonl")
    spec = server.root / f"{name}.toml"
    spec.write_text("\n".join([
        f'name = "{name}"', f'base_model = "{server.base}"', f'dataset = "{data}"', 'backend = "peft"',
        "lora_rank = 8", f"max_steps = {steps}", "batch_size = 2", "gradient_accumulation_steps = 1",
        "save_steps = 3", f"learning_rate = {lr}", "load_in_4bit = false", f"seed = {seed}", f'adapter_root = "{server.adapters}"',
    ]) + "\n")
    started = server.run("finetune", "start", str(spec), "--gpus", "cpu")
    assert started.returncode == 0, started.stderr
    job = started.stdout.split()[1]
    deadline = time.time() + 300
    while time.time() < deadline:
        (rec,) = [j for j in json.loads(server.run("finetune", "ls", "--json").stdout) if j["id"] == job]
        if rec["state"] in ("finished", "failed", "cancelled"):
            break
        time.sleep(1)
    assert rec["state"] == "finished", f"{rec['state']}: {rec.get('reason')}\n" + Path(rec["log_path"]).read_text()[-2000:]
    return Path(rec["outputs"]["adapter_path"])
