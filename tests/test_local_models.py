"""Models where vLLM finds them offline: a Hugging Face cache laid out as the hub client lays it out
(blobs, refs/main, snapshots of symlinks), the fleet config's [models] roots, `fit` on them, `models ls`
here and through a node's agent."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kvfit.local_models import find_local, hub_cache_dir
from fleetdeck.cli import main
from tests.helpers import FAKE_VLLM_CMD, Pipe, wait_for

PY = sys.executable
QWEN2_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 3584,
            "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
            "max_position_embeddings": 32768, "torch_dtype": "bfloat16", "tie_word_embeddings": False}


def hub_cache_entry(cache: Path, repo_id: str, files: dict[str, bytes], rev: str | None = None) -> Path:
    """A repo as huggingface_hub stores it: content-addressed blobs/, refs/main naming the revision, and
    snapshots/REV/ holding relative symlinks into blobs/."""
    org, name = repo_id.split("/")
    repo = cache / f"models--{org}--{name}"
    rev = rev or hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    for fname, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snap / fname).symlink_to(Path("..") / ".." / "blobs" / blob)
    (repo / "refs" / "main").write_text(rev)
    return snap


def test_fit_plans_a_model_found_only_in_the_hub_cache(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "hf" / "hub"
    hub_cache_entry(cache, "Qwen/Qwen2-7B-Instruct", {"config.json": json.dumps(QWEN2_7B).encode(),
                                                      "tokenizer.json": b"{}" * 1000})
    # Not in the built-in catalogue: without the cache it is unknown, and the error says where it looked.
    assert main(["fit", "Qwen/Qwen2-7B-Instruct", "--gpu-memory-gib", "23.55", "--json"]) == 2
    assert "not in the Hugging Face cache" in capsys.readouterr().err
    # HF_HOME/hub is where the hub client (and so vLLM) looks when HF_HUB_CACHE is unset.
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache_dir() == cache
    assert main(["fit", "Qwen/Qwen2-7B-Instruct", "--gpu-memory-gib", "23.55", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "Qwen/Qwen2-7B-Instruct" in json.dumps(doc)
    # The same shape as the catalogue's Qwen2.5-7B: the same KV bytes per token.
    assert main(["fit", "Qwen/Qwen2.5-7B-Instruct", "--gpu-memory-gib", "23.55", "--json"]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert doc["kv_bytes_per_token"] == ref["kv_bytes_per_token"]


def test_refs_main_decides_the_snapshot_as_the_hub_client_does(tmp_path):
    cache = tmp_path / "hub"
    old = hub_cache_entry(cache, "acme/m", {"config.json": json.dumps({**QWEN2_7B, "num_hidden_layers": 2}).encode()},
                          rev="1" * 40)
    new = hub_cache_entry(cache, "acme/m", {"config.json": json.dumps(QWEN2_7B).encode()}, rev="2" * 40)
    from engine.kvfit.local_models import in_hub_cache

    assert old != new and in_hub_cache("acme/m", cache) == new and find_local("acme/m", [cache]) == new
    (cache / "models--acme--m" / "refs" / "main").write_text("f" * 40)  # names a snapshot not on disk
    assert in_hub_cache("acme/m", cache) is None


def test_fit_and_models_ls_read_the_fleet_configs_model_roots(tmp_path, capsys):
    root = tmp_path / "models"
    (root / "acme" / "Qwen2-7B-ft").mkdir(parents=True)
    (root / "acme" / "Qwen2-7B-ft" / "config.json").write_text(json.dumps(
        {**QWEN2_7B, "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}))
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{not json")
    hub_cache_entry(root, "other/Cached-7B", {"config.json": json.dumps(QWEN2_7B).encode()})
    config = tmp_path / "fleet.toml"
    config.write_text(f'[models]\nroots = ["{root}"]\n')
    assert main(["fit", "acme/Qwen2-7B-ft", "--gpu-memory-gib", "23.55", "--config", str(config)]) in (0, 1)
    out = capsys.readouterr().out
    assert "acme/Qwen2-7B-ft" in out and "awq 4-bit" in out
    assert main(["fit", "other/Cached-7B", "--gpu-memory-gib", "23.55", "--config", str(config)]) in (0, 1)
    capsys.readouterr()

    assert main(["models", "ls", "--json", "--config", str(config)]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    ft = listed["acme/Qwen2-7B-ft"]
    assert (ft["architecture"], ft["quantization"], ft["context_limit"]) == ("Qwen2ForCausalLM", "awq 4-bit", 32768)
    assert listed["other/Cached-7B"]["dtype"] == "bfloat16" and listed["other/Cached-7B"]["size_bytes"] > 0
    assert listed[str(root / "broken")]["error"]
    assert main(["models", "ls", "--config", str(config)]) == 0
    table = capsys.readouterr().out
    assert "acme/Qwen2-7B-ft" in table and "32,768" in table and "unreadable" in table


def test_a_nodes_agent_lists_its_own_models(tmp_path, monkeypatch):
    from engine.nodes.agent import Agent
    from engine.nodes.remote import AgentOps
    from fleet.remote import RemoteNode
    from fleet.source import LocalNode

    root = tmp_path / "node-models"
    (root / "Tiny").mkdir(parents=True)
    (root / "Tiny" / "config.json").write_text(json.dumps(QWEN2_7B))
    pipe = Pipe(Agent(LocalNode("n"), tmp_path / "a.db", [], "9.9", interval_s=0.5, model_roots=[root]))
    pipe.next("hello")
    pipe.send({"v": 2, "type": "request", "id": 1, "op": "list_models"})
    (model,) = pipe.next("response")["result"]
    assert model["name"] == str(root / "Tiny") and model["context_limit"] == 32768
    # A start may name one of those models instead of the profile's, and nothing else.
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "q.toml").write_text('name = "q"\nmodel = "Qwen/Qwen3-8B"\n')
    monkeypatch.setenv("FLEETDECK_PROFILES", str(profiles))
    for rid, bad in enumerate(("/etc", "Qwen/Qwen2-7B-Instruct", 7), start=2):  # an id names one request
        pipe.send({"v": 2, "type": "request", "id": rid, "op": "start_server",
                   "args": {"profile": "q", "gpus": [0], "model": bad}})
        answer = pipe.next("response")
        assert answer["ok"] is False and ("not on this node's disks" in answer["error"]
                                          or "model must be a non-empty string" in answer["error"]), answer
    pipe.close()
    # Through the node interface, from the node's own fleet config.
    config = tmp_path / "node-fleet.toml"
    config.write_text(f'[models]\nroots = ["{root}"]\n')
    node = RemoteNode("n", [PY, "-m", "fleetdeck", "agent", "--stdio", "--simulated", "--config", str(config),
                            "--store", str(tmp_path / "b.db")], interval_s=0.5)
    try:
        assert wait_for(lambda: node.link.status == "connected")
        (m,) = AgentOps(node).models()
        assert m.architecture == "Qwen2ForCausalLM" and m.path == str(root / "Tiny")
    finally:
        node.close()


@pytest.fixture(scope="module")
def one_model_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    (root / "acme" / "m").mkdir(parents=True)
    (root / "acme" / "m" / "config.json").write_text(json.dumps(QWEN2_7B))
    (root / "outside").mkdir()
    (root / "outside" / "config.json").write_text(json.dumps(QWEN2_7B))
    return root / "acme"  # the root; ../outside is a model folder it must never reach


@settings(max_examples=80, deadline=None)
@given(name=st.one_of(st.text(min_size=1, max_size=40),
                      st.sampled_from(["../outside", "acme/../outside", "x/../../outside", "/etc/passwd", "m", "acme/m"])))
def test_a_name_resolves_inside_the_roots_or_not_at_all(one_model_root, name):
    found = find_local(name, [one_model_root])
    assert found is None or found == one_model_root / "m"


def test_a_profile_whose_model_is_in_a_root_hands_vllm_the_folder_and_serves_the_id(tmp_path, monkeypatch):
    from engine.vllm.command import build_launch
    from tests.helpers import profile

    root = tmp_path / "models"
    (root / "acme" / "Qwen2-7B-ft").mkdir(parents=True)
    (root / "acme" / "Qwen2-7B-ft" / "config.json").write_text(json.dumps(QWEN2_7B))
    config = tmp_path / "fleet.toml"
    config.write_text(f'[models]\nroots = ["{root}"]\n')
    monkeypatch.setenv("FLEETDECK_CONFIG", str(config))
    monkeypatch.setenv("FLEETDECK_VLLM", FAKE_VLLM_CMD)
    argv, _ = build_launch(profile(model="acme/Qwen2-7B-ft"), [0], 8001, {})
    assert str(root / "acme" / "Qwen2-7B-ft") in argv
    assert argv[argv.index("--served-model-name") + 1] == "acme/Qwen2-7B-ft"
    # In the hub cache, vLLM finds the id itself (offline): it gets the id.
    cache = Path(hub_cache_dir())
    hub_cache_entry(cache, "acme/Qwen2-7B-ft", {"config.json": json.dumps(QWEN2_7B).encode()})
    argv, _ = build_launch(profile(model="acme/Qwen2-7B-ft"), [0], 8001, {})
    assert "acme/Qwen2-7B-ft" in argv[:argv.index("--port")] and str(root) not in " ".join(argv)


async def test_the_start_dialog_offers_the_models_on_disk_and_starts_one(tmp_path, monkeypatch):
    from textual.widgets import Input, Select, Static

    from engine.vllm import launcher
    from store.db import open_store
    from store.paths import config_dir
    from tests.tui_helpers import make_app, open_dialog, settle, static_text
    from tui.screens.servers import StartServerScreen

    monkeypatch.setenv("FLEETDECK_VLLM", FAKE_VLLM_CMD)
    monkeypatch.setenv("FLEETDECK_SIM_START_DELAY", "0.2")
    hub_cache_entry(hub_cache_dir(), "Qwen/Qwen2-7B-Instruct", {"config.json": json.dumps(QWEN2_7B).encode()})
    (config_dir() / "profiles").mkdir(parents=True)
    (config_dir() / "profiles" / "qwen.toml").write_text('name = "qwen"\nmodel = "Qwen/Qwen3-8B"\n')
    db = tmp_path / "fd.db"
    app = make_app(store_path=db)
    try:
        async with app.run_test(size=(120, 34)) as pilot:
            dialog = await open_dialog(app, pilot, "3", "s", StartServerScreen)
            models = dialog.query_one("#start-model", Select)
            await app.workers.wait_for_complete()  # the list is read in a worker, off the UI thread
            await pilot.pause()
            assert any(v == "Qwen/Qwen2-7B-Instruct" for _, v in models._options)
            dialog.query_one("#start-profile", Select).value = "qwen"
            dialog.query_one("#start-gpus", Input).value = "sim-h100-01/3"
            models.value = "Qwen/Qwen2-7B-Instruct"
            await settle(app, pilot)
            assert "Qwen/Qwen2-7B-Instruct" in static_text(dialog.query_one("#start-verdict", Static))
            await pilot.press("ctrl+s")
            await settle(app, pilot, 5)
            (rec,) = launcher.list_servers(open_store(db))
            assert rec.spec["model"] == "Qwen/Qwen2-7B-Instruct" and rec.name == "qwen"
    finally:
        store = open_store(db)
        for r in launcher.list_servers(store):
            launcher.stop(store, r, timeout=5)


def test_the_fleet_config_named_by_config_is_the_one_a_launch_reads_its_model_roots_from(tmp_path, monkeypatch,
                                                                                         capsys):
    # `--config` is this host's fleet config for everything the command reads: the launch resolves a model
    # in that config's [models] roots, not in the default file's (an agent started with --config did the latter).
    from fleetdeck.cli import main

    root = tmp_path / "models"
    (root / "acme" / "Qwen2-7B-ft").mkdir(parents=True)
    (root / "acme" / "Qwen2-7B-ft" / "config.json").write_text(json.dumps(QWEN2_7B))
    config = tmp_path / "node-fleet.toml"
    config.write_text(f'[models]\nroots = ["{root}"]\n')
    prof = tmp_path / "ft.toml"
    prof.write_text('name = "ft"\nmodel = "acme/Qwen2-7B-ft"\n')
    monkeypatch.setenv("FLEETDECK_VLLM", FAKE_VLLM_CMD)
    assert main(["serve", "start", str(prof), "--gpus", "0", "--dry-run", "--config", str(config),
                 "--store", str(tmp_path / "fd.db")]) == 0
    assert str(root / "acme" / "Qwen2-7B-ft") in capsys.readouterr().out
