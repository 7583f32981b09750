"""The GPU check script's CPU half: its nvidia-smi comparison (with a stand-in nvidia-smi and faked NVML)
and its fine-tune flow through the real CLI on the CPU. On a GPU machine the same script runs whole."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.fakes.fake_nvml import MIB, FakeGpu, FakeNvml

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["gpu_check"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _fake_smi(tmp_path: Path, gpu: FakeGpu, driver: str, uuid: str | None = None) -> str:
    row = (f"0, {uuid or gpu.uuid}, {gpu.name}, {gpu.total // MIB}, {gpu.used // MIB + 100}, {gpu.util + 3}, "
           f"{gpu.temp + 1}, {gpu.power_mw / 1000 + 12:.2f}, {driver}")
    script = tmp_path / "nvidia-smi"
    script.write_text(f"#!{sys.executable}\nprint({row!r})\n")
    script.chmod(0o755)
    return str(script)


@pytest.fixture
def nvml(monkeypatch):
    gpu = FakeGpu()
    fake = FakeNvml([gpu])
    fake.install(monkeypatch)
    return gpu, fake


def test_the_comparison_passes_on_agreeing_readings_and_the_job_runs_on_cpu(nvml, tmp_path, capsys):
    gpu, fake = nvml
    smi = _fake_smi(tmp_path, gpu, fake.driver)
    rc = _load().main(["--device", "cpu", "--steps", "2", "--work", str(tmp_path / "work"), "--nvidia-smi", smi])
    out = capsys.readouterr().out
    assert rc == 0, out
    for line in ("ok   [0] uuid", "ok   [0] memory.total MiB", "ok   [0] memory.used MiB", "ok   driver version",
                 "ok   job finished", "n/a  job's process attributed on its GPU", "planner estimate"):
        assert line in out, out


def test_a_disagreeing_field_fails_the_check(nvml, tmp_path, capsys):
    gpu, fake = nvml
    mod = _load()
    smi = mod.nvidia_smi(_fake_smi(tmp_path, gpu, fake.driver, uuid="GPU-not-the-same"))
    checks = mod.compare_gpus(smi, mod.fleetdeck_gpus())
    failed = [c.what for c in checks if c.ok is False]
    assert failed == ["[0] uuid"]
