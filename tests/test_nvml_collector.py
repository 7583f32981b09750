"""The NVML collector against a fake pynvml: fields, per-field and per-GPU failures, no driver, lost GPUs."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pynvml
import pytest

from fleet.nvml import NvmlCollector, decode_throttle_reasons
from fleet.procs import classify_cmdline, describe_process
from tests.fakes.fake_nvml import MIB, FakeGpu, FakeNvml, FakeProcess


def two_gpus() -> list[FakeGpu]:
    return [
        FakeGpu(uuid="GPU-aaaa", processes=[FakeProcess(os.getpid(), 512 * MIB)]),
        FakeGpu(name="NVIDIA A10", uuid="GPU-bbbb", total=23028 * MIB, used=20000 * MIB, util=91),
    ]


def test_reads_every_field_of_every_gpu(monkeypatch):
    FakeNvml(two_gpus()).install(monkeypatch)
    snap = NvmlCollector(node="n1").snapshot()
    assert snap.nvml == "ok" and snap.reason is None
    assert snap.driver_version == "550.54.15" and snap.cuda_driver_version == "12.4"
    a, b = snap.gpus
    assert (a.index, a.name, a.uuid) == (0, "NVIDIA H100 80GB HBM3", "GPU-aaaa")
    assert a.memory_total_bytes == 81559 * MIB and a.memory_used_bytes == 1024 * MIB
    assert a.utilization_gpu_pct == 37 and a.temperature_c == 54
    assert a.power_draw_w == 250.0 and a.power_limit_w == 700.0
    assert a.clock_sm_mhz == 1755 and a.clock_mem_mhz == 2619 and a.clock_sm_max_mhz == 1980
    assert a.ecc_uncorrected_volatile == 0 and a.ecc_corrected_volatile == 3
    assert a.pci_bus_id == "00000000:18:00.0"
    assert b.name == "NVIDIA A10" and b.utilization_gpu_pct == 91
    (proc,) = a.processes
    assert proc.pid == os.getpid() and proc.gpu_memory_bytes == 512 * MIB
    assert proc.user and proc.command and proc.kind == "other"


@pytest.mark.parametrize(
    "code",
    [pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_NO_PERMISSION, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND],
)
def test_a_field_nvml_cannot_give_is_none_on_that_gpu_only(monkeypatch, code):
    gpus = two_gpus()
    gpus[0].fail = {
        "nvmlDeviceGetPowerUsage": code,
        "nvmlDeviceGetFanSpeed": code,
        "nvmlDeviceGetTotalEccErrors": code,
        "nvmlDeviceGetCurrentClocksThrottleReasons": code,
        "nvmlDeviceGetComputeRunningProcesses": code,
    }
    FakeNvml(gpus).install(monkeypatch)
    a, b = NvmlCollector(node="n1").snapshot().gpus
    assert a.power_draw_w is None and a.fan_pct is None and a.ecc_uncorrected_volatile is None
    assert a.throttle_reasons is None and a.processes == []
    assert not a.lost and a.temperature_c == 54  # the rest of the GPU is still read
    assert b.power_draw_w == 250.0 and b.fan_pct == 40


def test_no_driver_is_a_state_with_a_reason_and_host_figures(monkeypatch):
    FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND).install(monkeypatch)
    snap = NvmlCollector(node="n1").snapshot()
    assert snap.nvml == "unavailable" and snap.gpus == []
    assert "No NVIDIA driver" in snap.reason and "nvidia-smi" in snap.reason
    assert snap.host.memory_total_bytes and snap.host.cpu_count


def test_driver_not_loaded_says_so(monkeypatch):
    FakeNvml([], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED).install(monkeypatch)
    snap = NvmlCollector(node="n1").snapshot()
    assert "not loaded" in snap.reason and "modprobe" in snap.reason


def test_init_is_retried_later_not_every_poll(monkeypatch):
    now = [1000.0]
    fake = FakeNvml(two_gpus(), init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED).install(monkeypatch)
    collector = NvmlCollector(node="n1", retry_init_s=30, clock=lambda: now[0])
    assert collector.snapshot().nvml == "unavailable"
    fake.init_error = None
    now[0] += 5
    assert collector.snapshot().nvml == "unavailable"  # not retried yet
    now[0] += 30
    assert collector.snapshot().nvml == "ok"  # the driver came up: picked up without a restart


def test_a_gpu_that_falls_off_the_bus_is_marked_lost_and_keeps_its_name(monkeypatch):
    gpus = two_gpus()
    FakeNvml(gpus).install(monkeypatch)
    collector = NvmlCollector(node="n1")
    collector.snapshot()
    gpus[1].lost = True
    a, b = collector.snapshot().gpus
    assert not a.lost and a.utilization_gpu_pct == 37
    assert b.lost and b.name == "NVIDIA A10" and b.uuid == "GPU-bbbb"
    assert "fell off the bus" in b.error
    gpus[1].lost = False
    assert not collector.snapshot().gpus[1].lost


def test_slow_fields_are_read_less_often_than_fast_ones(monkeypatch):
    now = [0.0]
    fake = FakeNvml(two_gpus()).install(monkeypatch)
    collector = NvmlCollector(node="n1", slow_every_s=30, clock=lambda: now[0])
    for _ in range(5):
        collector.snapshot()
        now[0] += 1
    assert fake.calls["nvmlDeviceGetName"] == 2  # once per GPU
    assert fake.calls["nvmlDeviceGetUtilizationRates"] == 10
    now[0] += 30
    collector.snapshot()
    assert fake.calls["nvmlDeviceGetName"] == 4


def test_mig_devices_are_listed(monkeypatch):
    gpu = FakeGpu(mig=True, mig_devices=[("MIG-1", 10 * 1024 * MIB, MIB), ("MIG-2", 20 * 1024 * MIB, 5 * MIB)])
    FakeNvml([gpu]).install(monkeypatch)
    (g,) = NvmlCollector(node="n1").snapshot().gpus
    assert g.mig_enabled is True
    assert [m.uuid for m in g.mig_devices] == ["MIG-1", "MIG-2"]
    assert g.mig_devices[1].memory_total_bytes == 20 * 1024 * MIB


def test_throttle_reasons_are_named():
    mask = pynvml.nvmlClocksThrottleReasonSwPowerCap | pynvml.nvmlClocksThrottleReasonHwThermalSlowdown
    assert decode_throttle_reasons(mask) == ["power cap", "hw thermal"]
    assert decode_throttle_reasons(0) == []


def test_a_process_that_exited_before_inspection_is_reported_not_raised():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    described = describe_process(proc.pid, 123)
    assert described.command == "(exited)" and described.gpu_memory_bytes == 123


def test_a_running_vllm_server_is_recognised_with_model_and_port(tmp_path):
    script = tmp_path / "vllm"
    script.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(30)\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    proc = subprocess.Popen([str(script), "serve", "/models/qwen3-8b-awq", "--port", "8123"])
    try:
        from tests.helpers import wait_for

        assert wait_for(lambda: describe_process(proc.pid, None).kind == "vllm", timeout=60)
        described = describe_process(proc.pid, None)
        assert described.model == "/models/qwen3-8b-awq" and described.port == 8123
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    "argv, kind, model, port",
    [
        (["/usr/bin/vllm", "serve", "mistral-7b", "--port=9000"], "vllm", "mistral-7b", 9000),
        (["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "m"], "vllm", "m", 8000),
        (["python3", "-m", "engine.finetune.runner", "--fleetdeck-job", "j7"], "finetune", "j7", None),
        (["/venvs/quant/bin/python", "-m", "engine.finetune.transform", "quantize", "--fleetdeck-job=q1"], "finetune", "q1", None),
        (["/usr/bin/python3", "/opt/fleetdeck/bin/fleetdeck", "proxy"], "proxy", None, 4000),
        (["python", "train.py"], "other", None, None),
        ([], "other", None, None),
    ],
)
def test_command_lines_are_classified(argv, kind, model, port):
    a = classify_cmdline(argv)
    assert (a.kind, a.model, a.port) == (kind, model, port)


def test_the_transform_process_takes_the_flag_that_names_its_job():
    """transform.py runs in a foreign venv and spells the flag out; it must stay fleet.procs.JOB_FLAG."""
    import subprocess
    import sys

    from fleet.procs import JOB_FLAG

    out = subprocess.run([sys.executable, "-m", "engine.finetune.transform", "--help"], capture_output=True, text=True)
    assert JOB_FLAG in out.stdout
