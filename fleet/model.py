"""Data that crosses the fleet seam: one node's snapshot, its GPUs and their processes.

Every NVML-derived field is optional: ``None`` means "not available on this GPU" (NotSupported,
NoPermission, ...), and screens render it as ``n/a``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

ProcessKind = Literal["vllm", "finetune", "proxy", "other"]
NvmlState = Literal["ok", "unavailable"]


@dataclass(slots=True)
class GpuProcess:
    pid: int
    gpu_memory_bytes: int | None
    kind: ProcessKind = "other"
    user: str | None = None
    command: str = ""
    model: str | None = None  # vLLM: the served model; fine-tune: the job id
    port: int | None = None


@dataclass(slots=True)
class MigDevice:
    index: int
    uuid: str | None
    memory_total_bytes: int | None
    memory_used_bytes: int | None


@dataclass(slots=True)
class GpuSnapshot:
    node: str
    index: int
    name: str
    uuid: str
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    utilization_gpu_pct: float | None = None
    utilization_memory_pct: float | None = None
    temperature_c: float | None = None
    power_draw_w: float | None = None
    power_limit_w: float | None = None
    fan_pct: float | None = None
    clock_sm_mhz: int | None = None
    clock_sm_max_mhz: int | None = None
    clock_mem_mhz: int | None = None
    performance_state: int | None = None
    throttle_reasons: list[str] | None = None
    ecc_uncorrected_volatile: int | None = None
    ecc_corrected_volatile: int | None = None
    pci_bus_id: str | None = None
    mig_enabled: bool | None = None
    mig_devices: list[MigDevice] = field(default_factory=list)
    processes: list[GpuProcess] = field(default_factory=list)
    lost: bool = False
    error: str | None = None  # a per-GPU failure that is not a missing field

    @property
    def key(self) -> str:
        return f"{self.node}/{self.uuid}"

    @property
    def memory_free_bytes(self) -> int | None:
        if self.memory_total_bytes is None or self.memory_used_bytes is None:
            return None
        return self.memory_total_bytes - self.memory_used_bytes

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class HostInfo:
    """What a host without GPUs (or without a driver) can still tell the operator."""

    cpu_pct: float | None = None
    cpu_count: int | None = None
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    load_avg: tuple[float, float, float] | None = None


@dataclass(slots=True)
class NodeSnapshot:
    node: str
    taken_at: float  # unix seconds
    nvml: NvmlState
    reason: str | None = None  # why NVML is unavailable, with what to do
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    simulated: bool = False
    gpus: list[GpuSnapshot] = field(default_factory=list)
    host: HostInfo = field(default_factory=HostInfo)
    # How the dashboard reaches the node: None for this host; for a remote node connected |
    # connecting | unreachable | incompatible (the screens read this, never the reason's wording).
    link: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def gpus_at(self, indices: list[int]) -> list[GpuSnapshot]:
        """The GPUs with these indices, in that order; ValueError naming the missing ones and those there are."""
        by_index = {g.index: g for g in self.gpus}
        missing = [i for i in indices if i not in by_index]
        if missing:
            raise ValueError(f"no GPU {missing} on {self.node} (it has {sorted(by_index)})")
        return [by_index[i] for i in indices]
