"""What vLLM refuses before it touches a GPU, said by fleetdeck first: a max_model_len above the
model's own limit (config.json), a LoRA rank vLLM does not accept; and --force for what cannot be planned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.kvfit.arch import derived_max_model_len
from engine.vllm import launcher
from engine.vllm import command
from engine.vllm.command import LaunchError, UnplannableError
from engine.vllm.profile import find_profile
from fleetdeck.cli import main
from store.db import open_store
from tests.helpers import FAKE_VLLM_CMD, h100, profile

LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2,
         "num_key_value_heads": 1, "intermediate_size": 256, "vocab_size": 128, "max_position_embeddings": 256}


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({}, (256, "max_position_embeddings")),
        ({"n_positions": 128}, (128, "n_positions")),  # the smallest key wins
        ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, (1024, "max_position_embeddings")),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, (512, "max_position_embeddings")),
        # YaRN's max_position_embeddings is already the scaled length to vLLM 0.32 (it multiplied the factor into
        # original_max_position_embeddings before: 1024 and 512 here, which vLLM 0.32 refuses)
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, (256, "max_position_embeddings")),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}}, (256, "max_position_embeddings")),
        ({"rope_scaling": {"rope_type": "deepseek_yarn", "factor": 40.0}}, (256, "max_position_embeddings")),
        ({"rope_scaling": {"rope_type": "linear", "factor": None}}, (256, "max_position_embeddings")),  # null: 1.0
        ({"rope_scaling": {"rope_type": "longrope", "factor": 8.0}}, (256, "max_position_embeddings")),  # already scaled
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, (256, "max_position_embeddings")),
        ({"model_max_length": 8192}, (8192, "model_max_length")),  # an explicit model_max_length wins
    ],
)
def test_the_length_limit_is_derived_as_vllm_derives_it(extra, expected):
    assert derived_max_model_len({**LLAMA, **extra}) == expected


def test_no_length_key_means_no_limit():
    cfg = {k: v for k, v in LLAMA.items() if k != "max_position_embeddings"}
    assert derived_max_model_len(cfg) == (None, None)


def model_folder(tmp_path: Path, **extra) -> Path:
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**LLAMA, **extra}))
    return folder


def test_fit_refuses_a_length_above_the_models_limit_with_vllms_reason(tmp_path, capsys):
    folder = model_folder(tmp_path)
    assert main(["fit", str(folder), "--gpu-memory-gib", "80", "--max-model-len", "4096", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert not doc["fits"] and doc["max_model_len_that_fits"] == 256
    assert "User-specified max_model_len (4096) is greater than the derived max_model_len" in doc["reason"]
    assert "max_position_embeddings=256" in doc["reason"] and "256 or less" in doc["reason"]
    assert main(["fit", str(folder), "--gpu-memory-gib", "80", "--max-model-len", "256"]) == 0


def test_a_cpu_profile_is_planned_against_its_kv_space_and_refused_past_the_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETDECK_VLLM", FAKE_VLLM_CMD)
    store = open_store(tmp_path / "fd.db")
    folder = model_folder(tmp_path)
    cpu = dict(model=str(folder), env={"VLLM_CPU_KVCACHE_SPACE": "1"}, lora={"enable": False})
    verdict = command.preflight(profile(max_model_len=256, **cpu), [])
    # 1 GiB over 2 layers x K and V x 1 head x 64 x 2 bytes = 512 B a token, in 128-token blocks
    assert verdict.fits and verdict.kv_tokens == 2 * 1024**3 // 512 // 2 and verdict.block_size == 128
    with pytest.raises(LaunchError, match="derived max_model_len"):
        launcher.start(store, profile(max_model_len=4096, **cpu), [0], log_dir=tmp_path)
    assert launcher.list_servers(store) == []


def test_force_starts_a_profile_the_planner_cannot_read_with_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLEETDECK_VLLM", FAKE_VLLM_CMD)
    monkeypatch.setenv("FLEETDECK_SIM_START_DELAY", "0.1")
    store = open_store(tmp_path / "fd.db")
    elsewhere = profile(model="/mnt/other-mount/models/mistral-7b")  # on another mount: not readable here
    with pytest.raises(UnplannableError, match="--force starts it anyway"):
        launcher.start(store, elsewhere, [0], gpu_snapshots=[h100()], log_dir=tmp_path)
    rec, verdict = launcher.start(store, elsewhere, [0], gpu_snapshots=[h100()], log_dir=tmp_path, force=True)
    try:
        assert verdict is None and rec.reason.startswith("started without a plan: cannot plan /mnt/other-mount")
    finally:
        launcher.stop(store, rec, timeout=5)
    prof = tmp_path / "elsewhere.toml"
    prof.write_text('name = "elsewhere"\nmodel = "/mnt/other-mount/models/mistral-7b"\n')
    assert main(["serve", "start", str(prof), "--gpus", "0", "--simulated", "--store", str(tmp_path / "fd.db")]) == 2
    assert "--force starts it anyway" in capsys.readouterr().err
    assert main(["serve", "start", str(prof), "--gpus", "0", "--simulated", "--force", "--store", str(tmp_path / "fd.db")]) == 0
    out = capsys.readouterr()
    assert "started elsewhere-" in out.out and "warning: started without a plan" in out.err
    for r in launcher.list_servers(store):
        launcher.stop(store, r, timeout=5)


def test_a_lora_rank_vllm_does_not_accept_is_refused_before_start(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETDECK_VLLM", FAKE_VLLM_CMD)
    store = open_store(tmp_path / "fd.db")
    with pytest.raises(LaunchError, match=r"max_lora_rank 48 is not one vLLM accepts .* Use the next one up \(64\)"):
        launcher.start(store, profile(lora={"enable": True, "max_lora_rank": 48}), [0], gpu_snapshots=[h100()], log_dir=tmp_path)


def test_a_profile_name_resolves_to_the_profile_even_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    roots = tmp_path / "profiles"
    roots.mkdir()
    (roots / "mistral-7b-awq.toml").write_text('name = "mistral-7b-awq"\nmodel = "m"\n')
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mistral-7b-awq").mkdir()  # e.g. the model folder itself
    assert find_profile("mistral-7b-awq", [roots]) == roots / "mistral-7b-awq.toml"


# -- the catalogue carries each model's limit, and the planner refuses what vLLM refuses ---------------------


@pytest.mark.parametrize(
    "name, limit, default",
    [
        ("meta-llama/Llama-3.1-8B-Instruct", 131072, 131072),  # llama3 RoPE: already the scaled length
        ("meta-llama/Llama-3.2-11B-Vision-Instruct", 131072, 131072),  # from its text config
        ("meta-llama/Llama-2-7b-chat-hf", 4096, 4096),
        ("Qwen/Qwen2.5-7B-Instruct-AWQ", 32768, 32768),  # a quantized variant keeps its base model's limit
        ("Qwen/Qwen3-8B", 40960, 40960),
        ("google/gemma-3-27b-it", 131072, 131072),  # Gemma 3's linear factor is not applied again
        ("deepseek-ai/deepseek-coder-6.7b-instruct", 65536, 65536),  # linear x4 over 16,384
        ("openai/gpt-oss-20b", 131072, 131072),  # YaRN x32 over 4,096: max_position_embeddings is the scaled length
        ("microsoft/Phi-3.5-mini-instruct", 131072, 4096),  # longrope: vLLM starts at the original length
    ],
)
def test_catalogue_entries_carry_the_context_limit_vllm_derives(name, limit, default):
    from engine.kvfit.catalogue import catalogue_arch

    arch = catalogue_arch(name)
    assert (arch.derived_max_model_len, arch.default_max_model_len) == (limit, default)


def test_every_catalogue_entry_has_a_limit():
    from engine.kvfit.catalogue import catalogue_arch, list_models

    assert all(catalogue_arch(name).derived_max_model_len for name in list_models())


def test_fit_above_the_catalogue_limit_does_not_fit_and_says_what_does(capsys):
    argv = ["fit", "meta-llama/Llama-3.1-8B-Instruct", "--gpu-memory-gib", "79.19", "--max-model-len", "200000"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "FITS\n" not in out
    assert "greater than the derived max_model_len (max_position_embeddings=131072" in out
    assert "max concurrency" not in out and "largest context" not in out  # nothing that reads as success
    assert "fits with:          gpu_memory_utilization 0.90, max_model_len 131,072" in out
    assert main([*argv, "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"] == "DOES NOT FIT" and doc["fits"] is False
    assert doc["max_concurrency"] == doc["max_concurrency_low"] == 0
    assert doc["model_max_model_len"] == 131072 and doc["fitting_max_model_len"] == 131072


@pytest.mark.parametrize("name, length", [("meta-llama/Llama-3.1-8B-Instruct", 131072),
                                          ("microsoft/Phi-3.5-mini-instruct", 4096)])
def test_without_max_model_len_fit_plans_vllms_default_for_the_model(name, length, capsys):
    assert main(["fit", name, "--gpu-memory-gib", "79.19", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["max_model_len"] == length and doc["max_model_len_given"] is False and doc["verdict"] == "FITS"
    assert main(["fit", name, "--gpu-memory-gib", "79.19"]) == 0
    assert f"max_model_len       {length:,} tokens (vLLM's default for this model" in capsys.readouterr().out


def test_a_local_config_with_rope_scaling_gets_the_same_derivation(tmp_path, capsys):
    folder = model_folder(tmp_path, rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert main(["fit", str(folder), "--gpu-memory-gib", "80", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["max_model_len"] == doc["model_max_model_len"] == 512 and not doc["max_model_len_given"]
    assert main(["fit", str(folder), "--gpu-memory-gib", "80", "--max-model-len", "513", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert "max_position_embeddings=512" in doc["reason"] and doc["fitting_max_model_len"] == 512


def test_a_kv_cache_too_small_for_the_default_length_names_the_largest_that_fits(capsys):
    # An 8B model at its 131,072 default on a 24 GB card: vLLM would refuse; the planner says what fits.
    assert main(["fit", "meta-llama/Llama-3.1-8B-Instruct", "--gpu-memory-gib", "23.55", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"] == "DOES NOT FIT" and 0 < doc["fitting_max_model_len"] < 131072
    assert main(["fit", "meta-llama/Llama-3.1-8B-Instruct", "--gpu-memory-gib", "23.55",
                 "--max-model-len", str(doc["fitting_max_model_len"])]) == 0


def test_a_profile_that_allows_long_lengths_is_planned_past_the_limit_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETDECK_VLLM", FAKE_VLLM_CMD)
    folder = model_folder(tmp_path)
    refused = command.preflight(profile(model=str(folder), max_model_len=512, lora={"enable": False}), [h100()])
    assert not refused.fits and "derived max_model_len" in refused.reason
    allowed = command.preflight(profile(model=str(folder), max_model_len=512, lora={"enable": False},
                                         env={"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}), [h100()])
    assert allowed.fits and allowed.model_max_model_len == 256
    assert any("VLLM_ALLOW_LONG_MAX_MODEL_LEN" in w for w in allowed.warnings)
