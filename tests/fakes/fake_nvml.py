"""A fake NVML, installed by replacing pynvml's functions (the way gpustat's tests do).

Each FakeGpu can fail chosen functions with a chosen NVML error code, or fall off the bus.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

MIB = 1024**2


@dataclass
class FakeProcess:
    pid: int
    used: int | None


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-11111111-2222-3333-4444-555555555555"
    total: int = 81559 * MIB
    used: int = 1024 * MIB
    util: int = 37
    mem_util: int = 20
    temp: int = 54
    power_mw: int = 250_000
    limit_mw: int = 700_000
    fan: int = 40
    sm: int = 1755
    sm_max: int = 1980
    mem_clock: int = 2619
    pstate: int = 0
    throttle: int = 0
    ecc_uncorrected: int = 0
    ecc_corrected: int = 3
    mig: bool = False
    mig_devices: list[tuple[str, int, int]] = field(default_factory=list)  # (uuid, total, used)
    processes: list[FakeProcess] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)  # function name -> NVML_ERROR_* code
    lost: bool = False


class FakeNvml:
    def __init__(self, gpus: list[FakeGpu], init_error: int | None = None, driver: str = "550.54.15") -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.driver = driver
        self.calls: dict[str, int] = {}

    # Handles are ("gpu", index) or ("mig", index, slot).
    def _gpu(self, handle: Any, fn: str) -> FakeGpu:
        self.calls[fn] = self.calls.get(fn, 0) + 1
        gpu = self.gpus[handle[1]]
        if gpu.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        if fn in gpu.fail:
            raise pynvml.NVMLError(gpu.fail[fn])
        return gpu

    def install(self, monkeypatch: Any) -> "FakeNvml":
        def init() -> None:
            if self.init_error is not None:
                raise pynvml.NVMLError(self.init_error)

        def handle_by_index(i: int) -> tuple:
            if i >= len(self.gpus):
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return ("gpu", i)

        def memory_info(h: tuple) -> Any:
            if h[0] == "mig":
                uuid, total, used = self.gpus[h[1]].mig_devices[h[2]]
                return SimpleNamespace(total=total, used=used, free=total - used)
            g = self._gpu(h, "nvmlDeviceGetMemoryInfo")
            return SimpleNamespace(total=g.total, used=g.used, free=g.total - g.used)

        def uuid(h: tuple) -> str:
            if h[0] == "mig":
                return self.gpus[h[1]].mig_devices[h[2]][0]
            return self._gpu(h, "nvmlDeviceGetUUID").uuid

        def clock(h: tuple, kind: int) -> int:
            g = self._gpu(h, "nvmlDeviceGetClockInfo")
            return g.sm if kind == pynvml.NVML_CLOCK_SM else g.mem_clock

        def ecc(h: tuple, kind: int, counter: int) -> int:
            g = self._gpu(h, "nvmlDeviceGetTotalEccErrors")
            return g.ecc_uncorrected if kind == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED else g.ecc_corrected

        def mig_handle(h: tuple, slot: int) -> tuple:
            g = self._gpu(h, "nvmlDeviceGetMigDeviceHandleByIndex")
            if slot >= len(g.mig_devices):
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
            return ("mig", h[1], slot)

        def procs(h: tuple) -> list:
            g = self._gpu(h, "nvmlDeviceGetComputeRunningProcesses")
            return [SimpleNamespace(pid=p.pid, usedGpuMemory=p.used) for p in g.processes]

        simple = {
            "nvmlDeviceGetName": lambda g: g.name,
            "nvmlDeviceGetUtilizationRates": lambda g: SimpleNamespace(gpu=g.util, memory=g.mem_util),
            "nvmlDeviceGetTemperature": lambda g, *_: g.temp,
            "nvmlDeviceGetPowerUsage": lambda g: g.power_mw,
            "nvmlDeviceGetEnforcedPowerLimit": lambda g: g.limit_mw,
            "nvmlDeviceGetFanSpeed": lambda g: g.fan,
            "nvmlDeviceGetMaxClockInfo": lambda g, *_: g.sm_max,
            "nvmlDeviceGetPerformanceState": lambda g: g.pstate,
            "nvmlDeviceGetCurrentClocksThrottleReasons": lambda g: g.throttle,
            "nvmlDeviceGetPciInfo": lambda g: SimpleNamespace(busId=b"00000000:18:00.0"),
            "nvmlDeviceGetMigMode": lambda g: (1 if g.mig else 0, 1 if g.mig else 0),
            "nvmlDeviceGetMaxMigDeviceCount": lambda g: 7 if g.mig else 0,
            "nvmlDeviceGetGraphicsRunningProcesses": lambda g: [],
        }

        def wrap(fn_name: str, fn: Any) -> Any:
            return lambda h, *args: fn(self._gpu(h, fn_name), *args)

        patches: dict[str, Any] = {
            "nvmlInit": init,
            "nvmlShutdown": lambda: None,
            "nvmlSystemGetDriverVersion": lambda: self.driver,
            "nvmlSystemGetCudaDriverVersion": lambda: 12040,
            "nvmlDeviceGetCount": lambda: len(self.gpus),
            "nvmlDeviceGetHandleByIndex": handle_by_index,
            "nvmlDeviceGetMemoryInfo": memory_info,
            "nvmlDeviceGetUUID": uuid,
            "nvmlDeviceGetClockInfo": clock,
            "nvmlDeviceGetTotalEccErrors": ecc,
            "nvmlDeviceGetMigDeviceHandleByIndex": mig_handle,
            "nvmlDeviceGetComputeRunningProcesses": procs,
        }
        for name, fn in simple.items():
            patches[name] = wrap(name, fn)
        for name, fn in patches.items():
            monkeypatch.setattr(pynvml, name, fn)
        return self
