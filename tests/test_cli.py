"""The command line: `fleetdeck gpus`, usage errors, version, and what each subcommand imports."""

from __future__ import annotations

import json
import subprocess
import sys

import pynvml
import pytest

from fleetdeck.cli import main
from tests.fakes.fake_nvml import FakeGpu, FakeNvml

REQUIRED_GPU_KEYS = {
    "node", "index", "name", "uuid", "memory_total_bytes", "memory_used_bytes",
    "utilization_gpu_pct", "temperature_c", "power_draw_w", "processes",
}


def test_gpus_json_lists_every_gpu_with_the_documented_keys(monkeypatch, capsys):
    FakeNvml([FakeGpu(uuid="GPU-a"), FakeGpu(name="NVIDIA A10", uuid="GPU-b")]).install(monkeypatch)
    assert main(["gpus", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["nvml"] == "ok" and doc["reason"] is None
    assert [g["uuid"] for g in doc["gpus"]] == ["GPU-a", "GPU-b"]
    for gpu in doc["gpus"]:
        assert REQUIRED_GPU_KEYS <= gpu.keys()
    assert doc["gpus"][1]["name"] == "NVIDIA A10"


def test_gpus_json_without_a_driver_exits_0_and_says_why(monkeypatch, capsys):
    FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND).install(monkeypatch)
    assert main(["gpus", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["nvml"] == "unavailable" and doc["gpus"] == []
    assert "No NVIDIA driver" in doc["reason"]
    assert doc["hosts"][0]["host"]["memory_total_bytes"] > 0


def test_gpus_text_shows_na_for_fields_nvml_cannot_give(monkeypatch, capsys):
    FakeNvml([FakeGpu(fail={"nvmlDeviceGetPowerUsage": pynvml.NVML_ERROR_NOT_SUPPORTED})]).install(monkeypatch)
    assert main(["gpus"]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H100 80GB HBM3" in out and "n/a" in out


def test_gpus_simulated_is_labelled(capsys):
    assert main(["gpus", "--simulated", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["simulated"] is True and len(doc["gpus"]) == 7


@pytest.mark.parametrize("argv", [["--bogus"], ["gpus", "--nope"], ["--refresh", "zero"], ["--refresh", "-1"], ["nosuchcommand"]])
def test_bad_flags_and_values_give_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fleetdeck")


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("fleetdeck ")


def test_a_malformed_fleet_config_names_file_and_key(tmp_path, capsys):
    cfg = tmp_path / "fleet.toml"
    cfg.write_text('refresh_s = "fast"\n[[node]]\nname = "a"\n')
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "refresh_s" in err and "node[0].ssh" in err


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip().splitlines()[-1]
    return set(json.loads(out))


HEAVY = {"litellm", "torch", "vllm", "unsloth", "transformers", "peft"}


def test_gpus_command_loads_neither_textual_nor_heavy_packages():
    mods = _modules_after(
        "import io, contextlib\nfrom fleetdeck.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()): main(['gpus', '--simulated', '--json'])"
    )
    assert "textual" not in mods
    assert not (HEAVY & mods)


def test_the_dashboard_never_loads_litellm_torch_vllm_or_unsloth():
    # Every module of the dashboard, not a sample: a screen that imported torch at the top would show here.
    mods = _modules_after(
        "import importlib, pkgutil, tui, tui.screens\n"
        "for m in pkgutil.walk_packages(tui.__path__, 'tui.'):\n"
        "    importlib.import_module(m.name)\n"
        "import tui.app\n"
    )
    assert "textual" in mods
    assert not (HEAVY & mods)


def test_output_cut_short_by_its_reader_ends_quietly(tmp_path):
    """`fleetdeck audit --json | head -1`: the reader closes the pipe while fleetdeck still writes (more
    than a pipe holds); it ends without a traceback."""
    from engine.audit import trail as audit
    from store.db import open_store

    store = open_store(tmp_path / "fd.db")
    for i in range(600):
        audit.append(store, "server.start", f"q-{i}", "done", params={"server": f"q-{i}"})
    proc = subprocess.Popen([sys.executable, "-m", "fleetdeck", "audit", "--json", "--store", str(tmp_path / "fd.db")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"["
    proc.stdout.close()
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert proc.wait(timeout=60) == 141 and "Traceback" not in err, err


def test_paths_in_the_fleet_config_expand_the_home_folder_once_for_every_use(tmp_path, monkeypatch):
    from fleet.config import load_fleet_config

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = tmp_path / "fleet.toml"
    cfg.write_text('adapter_roots = ["~/adapters"]\n[models]\nroot = "~/models"\n'
                   '[slurm]\nenabled = true\nconf = "~/slurm.conf"\n')
    config = load_fleet_config(cfg, required=True)
    assert config.adapter_roots == [tmp_path / "adapters"]
    assert (config.models.root, config.slurm.conf) == (tmp_path / "models", tmp_path / "slurm.conf")
