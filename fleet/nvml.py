"""The NVML collector: every pynvml call goes through one query seam.

A field NVML cannot give on this GPU (NotSupported, NoPermission, FunctionNotFound, ...) becomes
``None`` ("n/a" on screen). A GPU that falls off the bus is marked lost and keeps its identity from
the cache. A host without a driver is a state with a reason, never a traceback. Slow-changing fields
(name, UUID, totals, limits, ECC, MIG layout) are read every ``slow_every_s``; the rest every poll.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import pynvml

from fleet.model import GpuProcess, GpuSnapshot, MigDevice, NodeSnapshot
from fleet.procs import describe_process, host_info

# Failures that mean "this field is not available here" rather than "the GPU is broken".
_FIELD_UNAVAILABLE = (
    pynvml.NVMLError_NotSupported,
    pynvml.NVMLError_NoPermission,
    pynvml.NVMLError_FunctionNotFound,
    pynvml.NVMLError_NotFound,
    pynvml.NVMLError_NoData,
    pynvml.NVMLError_InvalidArgument,
    pynvml.NVMLError_Unknown,
)

_THROTTLE_NAMES = {
    "GpuIdle": "idle",
    "ApplicationsClocksSetting": "app clocks",
    "SwPowerCap": "power cap",
    "HwSlowdown": "hw slowdown",
    "SyncBoost": "sync boost",
    "SwThermalSlowdown": "sw thermal",
    "HwThermalSlowdown": "hw thermal",
    "HwPowerBrakeSlowdown": "power brake",
    "DisplayClockSetting": "display clocks",
}

DRIVER_HELP = (
    "Check the driver with `nvidia-smi`; if it fails, install the NVIDIA driver or load its kernel "
    "module (`sudo modprobe nvidia`). fleetdeck keeps showing this host's CPU and memory meanwhile."
)


class GpuLost(Exception):
    pass


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_throttle_reasons(mask: int) -> list[str]:
    reasons = []
    for suffix, label in _THROTTLE_NAMES.items():
        bit = getattr(pynvml, f"nvmlClocksThrottleReason{suffix}", None)
        if bit and mask & bit:
            reasons.append(label)
    return reasons


def unavailable_reason(exc: BaseException) -> str:
    """Name why NVML could not start, and what to do."""
    if isinstance(exc, pynvml.NVMLError_LibraryNotFound):
        what = "No NVIDIA driver found on this host (libnvidia-ml.so is missing)."
    elif isinstance(exc, pynvml.NVMLError_DriverNotLoaded):
        what = "The NVIDIA driver is installed but not loaded."
    elif isinstance(exc, pynvml.NVMLError_NoPermission):
        what = "No permission to open the NVIDIA devices (/dev/nvidia*)."
    elif isinstance(exc, pynvml.NVMLError_LibRmVersionMismatch):
        what = "The NVIDIA driver library and kernel module versions differ (reboot after a driver upgrade)."
    else:
        what = f"NVML could not start: {exc}."
    return f"{what} {DRIVER_HELP}"


@dataclass
class _Slow:
    read_at: float
    name: str
    uuid: str
    memory_total_bytes: int | None
    power_limit_w: float | None
    clock_sm_max_mhz: int | None
    pci_bus_id: str | None
    ecc_uncorrected_volatile: int | None
    ecc_corrected_volatile: int | None
    mig_enabled: bool | None
    mig_devices: list[MigDevice] = field(default_factory=list)


class NvmlCollector:
    """Reads this host's GPUs. Thread-safe: the TUI polls it from a worker thread."""

    def __init__(
        self,
        node: str | None = None,
        slow_every_s: float = 30.0,
        process_cache_s: float = 10.0,
        retry_init_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node = node or socket.gethostname()
        self.slow_every_s = slow_every_s
        self.process_cache_s = process_cache_s
        self.retry_init_s = retry_init_s
        self._clock = clock
        self._lock = threading.Lock()
        self._initialised = False
        self._reason: str | None = None
        self._last_init_try = -1e18
        self._driver: str | None = None
        self._cuda: str | None = None
        self._slow: dict[int, _Slow] = {}
        self._lost: set[int] = set()
        self._procs: dict[int, tuple[float, GpuProcess]] = {}

    # -- the query seam -------------------------------------------------------------------------
    def _q(self, fn: str, *args: Any) -> Any:
        """Call ``pynvml.<fn>``; a field NVML cannot give is None; a lost GPU raises GpuLost."""
        try:
            return getattr(pynvml, fn)(*args)
        except pynvml.NVMLError_GpuIsLost as exc:
            raise GpuLost(str(exc)) from exc
        except _FIELD_UNAVAILABLE:
            return None
        except AttributeError:  # an older pynvml without this function
            return None

    # -- lifecycle ------------------------------------------------------------------------------
    def _ensure_init(self) -> bool:
        if self._initialised:
            return True
        now = self._clock()
        if now - self._last_init_try < self.retry_init_s:
            return False
        self._last_init_try = now
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self._reason = unavailable_reason(exc)
            return False
        except OSError as exc:  # a broken library on the loader path
            self._reason = unavailable_reason(exc)
            return False
        self._initialised = True
        self._reason = None
        self._driver = _opt_text(self._q("nvmlSystemGetDriverVersion"))
        cuda = self._q("nvmlSystemGetCudaDriverVersion")
        self._cuda = f"{cuda // 1000}.{(cuda % 1000) // 10}" if isinstance(cuda, int) else None
        return True

    def close(self) -> None:
        with self._lock:
            if self._initialised:
                try:
                    pynvml.nvmlShutdown()
                except pynvml.NVMLError:
                    pass
                self._initialised = False

    # -- reading --------------------------------------------------------------------------------
    def snapshot(self) -> NodeSnapshot:
        with self._lock:
            now = self._clock()
            snap = NodeSnapshot(node=self.node, taken_at=now, nvml="unavailable", host=host_info())
            if not self._ensure_init():
                snap.reason = self._reason
                return snap
            snap.nvml = "ok"
            snap.driver_version = self._driver
            snap.cuda_driver_version = self._cuda
            try:
                count = self._q("nvmlDeviceGetCount")
                if count is None:
                    snap.nvml = "unavailable"
                    snap.reason = "NVML started but cannot count the GPUs. " + DRIVER_HELP
                    return snap
                for index in range(count):
                    snap.gpus.append(self._read_gpu(index, now))
            except pynvml.NVMLError as exc:
                # NVML itself failed (a driver reload leaves the old session uninitialised): start over
                # on the next read rather than failing every read from now on.
                try:
                    pynvml.nvmlShutdown()
                except pynvml.NVMLError:
                    pass
                self._initialised = False
                self._last_init_try = -1e18
                snap.nvml, snap.gpus = "unavailable", []
                snap.reason = f"NVML failed ({exc}); it is re-initialised on the next read. " + DRIVER_HELP
                return snap
            self._forget_exited(now)
            return snap

    def _read_gpu(self, index: int, now: float) -> GpuSnapshot:
        slow = self._slow.get(index)
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError as exc:
            return self._lost_gpu(index, slow, f"cannot open GPU {index}: {exc}")
        try:
            if slow is None or now - slow.read_at >= self.slow_every_s or index in self._lost:
                slow = self._read_slow(handle, now)
                self._slow[index] = slow
                self._lost.discard(index)
            return self._read_fast(index, handle, slow, now)
        except GpuLost as exc:
            self._lost.add(index)
            return self._lost_gpu(index, slow, f"GPU fell off the bus ({exc}); check `nvidia-smi` and dmesg")

    def _lost_gpu(self, index: int, slow: _Slow | None, error: str) -> GpuSnapshot:
        return GpuSnapshot(
            node=self.node,
            index=index,
            name=slow.name if slow else "unknown GPU",
            uuid=slow.uuid if slow else f"index-{index}",
            memory_total_bytes=slow.memory_total_bytes if slow else None,
            lost=True,
            error=error,
        )

    def _read_slow(self, handle: Any, now: float) -> _Slow:
        mem = self._q("nvmlDeviceGetMemoryInfo", handle)
        limit_mw = self._q("nvmlDeviceGetEnforcedPowerLimit", handle)
        pci = self._q("nvmlDeviceGetPciInfo", handle)
        mig = self._q("nvmlDeviceGetMigMode", handle)
        mig_enabled = bool(mig[0]) if isinstance(mig, (list, tuple)) and mig else None
        slow = _Slow(
            read_at=now,
            name=_opt_text(self._q("nvmlDeviceGetName", handle)) or "unknown GPU",
            uuid=_opt_text(self._q("nvmlDeviceGetUUID", handle)) or f"handle-{id(handle)}",
            memory_total_bytes=getattr(mem, "total", None),
            power_limit_w=limit_mw / 1000.0 if limit_mw is not None else None,
            clock_sm_max_mhz=self._q("nvmlDeviceGetMaxClockInfo", handle, pynvml.NVML_CLOCK_SM),
            pci_bus_id=_opt_text(getattr(pci, "busId", None)) if pci is not None else None,
            ecc_uncorrected_volatile=self._q(
                "nvmlDeviceGetTotalEccErrors",
                handle,
                pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                pynvml.NVML_VOLATILE_ECC,
            ),
            ecc_corrected_volatile=self._q(
                "nvmlDeviceGetTotalEccErrors",
                handle,
                pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
                pynvml.NVML_VOLATILE_ECC,
            ),
            mig_enabled=mig_enabled,
        )
        if mig_enabled:
            slow.mig_devices = self._read_mig(handle)
        return slow

    def _read_mig(self, handle: Any) -> list[MigDevice]:
        devices = []
        count = self._q("nvmlDeviceGetMaxMigDeviceCount", handle) or 0
        for i in range(count):
            mig = self._q("nvmlDeviceGetMigDeviceHandleByIndex", handle, i)
            if mig is None:
                continue
            mem = self._q("nvmlDeviceGetMemoryInfo", mig)
            devices.append(
                MigDevice(
                    index=i,
                    uuid=_opt_text(self._q("nvmlDeviceGetUUID", mig)),
                    memory_total_bytes=getattr(mem, "total", None),
                    memory_used_bytes=getattr(mem, "used", None),
                )
            )
        return devices

    def _read_fast(self, index: int, handle: Any, slow: _Slow, now: float) -> GpuSnapshot:
        mem = self._q("nvmlDeviceGetMemoryInfo", handle)
        util = self._q("nvmlDeviceGetUtilizationRates", handle)
        power_mw = self._q("nvmlDeviceGetPowerUsage", handle)
        throttle = self._q("nvmlDeviceGetCurrentClocksThrottleReasons", handle)
        gpu = GpuSnapshot(
            node=self.node,
            index=index,
            name=slow.name,
            uuid=slow.uuid,
            memory_total_bytes=getattr(mem, "total", None) or slow.memory_total_bytes,
            memory_used_bytes=getattr(mem, "used", None),
            utilization_gpu_pct=_opt_float(getattr(util, "gpu", None)),
            utilization_memory_pct=_opt_float(getattr(util, "memory", None)),
            temperature_c=_opt_float(
                self._q("nvmlDeviceGetTemperature", handle, pynvml.NVML_TEMPERATURE_GPU)
            ),
            power_draw_w=power_mw / 1000.0 if power_mw is not None else None,
            power_limit_w=slow.power_limit_w,
            fan_pct=_opt_float(self._q("nvmlDeviceGetFanSpeed", handle)),
            clock_sm_mhz=self._q("nvmlDeviceGetClockInfo", handle, pynvml.NVML_CLOCK_SM),
            clock_sm_max_mhz=slow.clock_sm_max_mhz,
            clock_mem_mhz=self._q("nvmlDeviceGetClockInfo", handle, pynvml.NVML_CLOCK_MEM),
            performance_state=self._q("nvmlDeviceGetPerformanceState", handle),
            throttle_reasons=decode_throttle_reasons(throttle) if throttle is not None else None,
            ecc_uncorrected_volatile=slow.ecc_uncorrected_volatile,
            ecc_corrected_volatile=slow.ecc_corrected_volatile,
            pci_bus_id=slow.pci_bus_id,
            mig_enabled=slow.mig_enabled,
            mig_devices=slow.mig_devices,
        )
        gpu.processes = self._read_processes(handle, now)
        return gpu

    def _read_processes(self, handle: Any, now: float) -> list[GpuProcess]:
        seen: dict[int, int | None] = {}
        for fn in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            for info in self._q(fn, handle) or []:
                used = getattr(info, "usedGpuMemory", None)
                seen[info.pid] = used if isinstance(used, int) else None
        result = []
        for pid, used in seen.items():
            cached = self._procs.get(pid)
            if cached is None or now - cached[0] >= self.process_cache_s:
                proc = describe_process(pid, used)
                self._procs[pid] = (now, proc)
            else:
                proc = replace(cached[1], gpu_memory_bytes=used)
            result.append(proc)
        return result

    def _forget_exited(self, now: float) -> None:
        stale = [pid for pid, (at, _) in self._procs.items() if now - at > 10 * self.process_cache_s]
        for pid in stale:
            del self._procs[pid]


def _opt_text(value: Any) -> str | None:
    return None if value is None else _text(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
