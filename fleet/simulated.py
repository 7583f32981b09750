"""The simulated fleet: nodes with realistic GPUs whose figures move like a serving fleet's.

Used by `fleetdeck demo`, the UI tests and the benchmarks. Every snapshot says ``simulated=True`` so
the screen always labels it. Randomness is seeded, so a test sees the same fleet every run.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Literal

from fleet.model import GpuProcess, GpuSnapshot, HostInfo, NodeSnapshot

MIB = 1024**2


@dataclass(frozen=True, slots=True)
class GpuModel:
    name: str
    memory_mib: int  # what NVML reports as total
    power_limit_w: float
    sm_max_mhz: int
    mem_mhz: int


H100_80GB = GpuModel("NVIDIA H100 80GB HBM3", 81559, 700.0, 1980, 2619)
A100_80GB = GpuModel("NVIDIA A100-SXM4-80GB", 81920, 400.0, 1410, 1593)
L40S = GpuModel("NVIDIA L40S", 46068, 350.0, 2520, 9001)
A10 = GpuModel("NVIDIA A10", 23028, 150.0, 1695, 6251)
RTX_4090 = GpuModel("NVIDIA GeForce RTX 4090", 24564, 450.0, 2520, 10501)


WorkKind = Literal["vllm", "finetune", "idle"]  # what keeps a simulated GPU busy


@dataclass(frozen=True, slots=True)
class SimProcess:
    """A real process that runs on a simulated GPU: one of the demo's simulated vLLM servers or fine-tunes,
    with its own pid, so the Fleet screen shows what the Servers and Jobs screens show."""

    gpu: int
    kind: Literal["vllm", "finetune"]
    pid: int
    model: str | None = None
    port: int | None = None
    memory_fraction: float = 0.0  # of the GPU's memory (vLLM takes gpu_memory_utilization of it)...
    memory_bytes: int | None = None  # ...or what it holds (a fine-tune's estimate)
    user: str = "svc-llm"
    command: str = ""


# What runs on a node's simulated GPUs now: the node's name in, its processes out.
LiveProcesses = Callable[[str], list[SimProcess]]


@dataclass(slots=True)
class SimWorkload:
    """What runs on one simulated GPU: a process and how hard it works."""

    kind: WorkKind
    model: str | None = None
    port: int | None = None
    memory_fraction: float = 0.0
    base_util: float = 0.0
    pid: int = 0


class SimulatedNode:
    def __init__(
        self,
        name: str,
        gpus: list[tuple[GpuModel, SimWorkload]],
        seed: int = 0,
        clock: Callable[[], float] = time.time,
        live: LiveProcesses | None = None,
    ) -> None:
        self.name = name
        self.simulated = True
        self._gpus = gpus
        self._live = live  # given: the GPUs hold what it reports (the fixed workloads are not used)
        self._rng = random.Random(seed)
        self._clock = clock
        self._t0 = clock()
        self._walk = [0.0 for _ in gpus]
        self._uuids = [
            f"GPU-{seed:04x}{i:04x}-5117-{self._rng.randrange(16**4):04x}-{self._rng.randrange(16**12):012x}"
            for i in range(len(gpus))
        ]

    def _live_workloads(self) -> list[tuple[SimWorkload, list[GpuProcess]]] | None:
        """Per GPU, a workload standing for what runs there and the real processes, from `live`."""
        if self._live is None:
            return None
        try:
            found = self._live(self.name)
        except Exception:  # a store being written or gone: the GPUs read idle until the next poll
            found = []
        out = []
        for i, (model, _) in enumerate(self._gpus):
            here = [p for p in found if p.gpu == i]
            total = model.memory_mib * MIB
            procs = [GpuProcess(pid=p.pid, kind=p.kind,
                                gpu_memory_bytes=p.memory_bytes if p.memory_bytes is not None else int(total * p.memory_fraction),
                                user=p.user, command=p.command, model=p.model, port=p.port) for p in here]
            held = sum(p.gpu_memory_bytes or 0 for p in procs)
            kind: WorkKind = "finetune" if any(p.kind == "finetune" for p in here) else "vllm" if here else "idle"
            base = 88.0 if kind == "finetune" else 45.0 + 8 * len(here)
            out.append((SimWorkload(kind, memory_fraction=held / total, base_util=base), procs))
        return out

    def snapshot(self) -> NodeSnapshot:
        now = self._clock()
        t = now - self._t0
        gpus = []
        live = self._live_workloads()
        for i, (model, work) in enumerate(self._gpus):
            if live is not None:
                work = live[i][0]
            self._walk[i] = max(-20.0, min(20.0, self._walk[i] + self._rng.uniform(-4, 4)))
            wave = 15.0 * math.sin(t / 40.0 + i)
            util = 0.0 if work.kind == "idle" else max(0.0, min(100.0, work.base_util + wave + self._walk[i]))
            total = model.memory_mib * MIB
            used = int(total * work.memory_fraction) + 512 * MIB if work.kind != "idle" else 4 * MIB
            if work.kind == "finetune" and live is None:
                used += int(MIB * 600 * (1 + math.sin(t / 7.0)))  # activations breathe with the step
            power = model.power_limit_w * (0.1 + 0.8 * util / 100.0)
            procs = []
            if live is not None:
                procs = live[i][1]
            elif work.kind != "idle":
                procs.append(
                    GpuProcess(
                        pid=work.pid,
                        gpu_memory_bytes=used - 4 * MIB,
                        kind=work.kind,
                        user="svc-llm" if work.kind == "vllm" else "mlops",
                        command=(
                            f"vllm serve {work.model} --port {work.port}"
                            if work.kind == "vllm"
                            else f"python -m engine.finetune.runner --job-id {work.model}"
                        ),
                        model=work.model,
                        port=work.port,
                    )
                )
            gpus.append(
                GpuSnapshot(
                    node=self.name,
                    index=i,
                    name=model.name,
                    uuid=self._uuids[i],
                    memory_total_bytes=total,
                    memory_used_bytes=min(used, total),
                    utilization_gpu_pct=round(util, 0),
                    utilization_memory_pct=round(util * 0.6, 0),
                    temperature_c=round(32 + util * 0.45 + self._rng.uniform(-1, 1), 0),
                    power_draw_w=round(power, 1),
                    power_limit_w=model.power_limit_w,
                    fan_pct=None if "H100" in model.name or "A100" in model.name else round(30 + util * 0.5),
                    clock_sm_mhz=int(model.sm_max_mhz * (0.35 + 0.65 * util / 100.0)),
                    clock_sm_max_mhz=model.sm_max_mhz,
                    clock_mem_mhz=model.mem_mhz,
                    performance_state=0 if util > 5 else 8,
                    throttle_reasons=["idle"] if util < 5 else (["power cap"] if util > 92 else []),
                    ecc_uncorrected_volatile=0,
                    ecc_corrected_volatile=0,
                    pci_bus_id=f"00000000:{0x18 + 0x10 * i:02X}:00.0",
                    mig_enabled=False,
                    processes=procs,
                )
            )
        return NodeSnapshot(
            node=self.name,
            taken_at=now,
            nvml="ok",
            driver_version="550.127.05 (simulated)",
            cuda_driver_version="12.4",
            simulated=True,
            gpus=gpus,
            host=HostInfo(
                cpu_pct=round(20 + 10 * math.sin(t / 30.0), 1),
                cpu_count=64,
                memory_total_bytes=512 * 1024**3,
                memory_used_bytes=int(180 * 1024**3),
                load_avg=(8.2, 7.9, 7.5),
            ),
        )

    def close(self) -> None:
        pass


def demo_fleet(clock: Callable[[], float] = time.time, live: LiveProcesses | None = None) -> list[SimulatedNode]:
    """The fleet `fleetdeck demo` shows: a serving node, an inference node and a workstation.

    With `live`, the GPUs hold the processes it reports (the demo: its simulated servers and jobs, as
    recorded in its store); without, fixed workloads (tests, `gpus --simulated`, the benchmarks)."""
    return [
        SimulatedNode(
            "sim-h100-01",
            [
                (H100_80GB, SimWorkload("vllm", "mistral-7b-instruct-awq", 8001, 0.90, 62, 41021)),
                (H100_80GB, SimWorkload("vllm", "qwen3-8b-awq", 8002, 0.90, 48, 41377)),
                (H100_80GB, SimWorkload("finetune", "ft-tickets-v4", None, 0.22, 88, 43110)),
                (H100_80GB, SimWorkload("idle")),
            ],
            seed=1,
            clock=clock,
            live=live,
        ),
        SimulatedNode(
            "sim-a10-02",
            [
                (A10, SimWorkload("vllm", "phi-3.5-mini-instruct-awq", 8001, 0.88, 55, 2210)),
                (A10, SimWorkload("vllm", "llama-3.2-3b-instruct", 8002, 0.88, 35, 2291)),
            ],
            seed=2,
            clock=clock,
            live=live,
        ),
        SimulatedNode(
            "sim-ws-4090",
            [(RTX_4090, SimWorkload("vllm", "qwen3-4b-awq", 8000, 0.85, 20, 7781))],
            seed=3,
            clock=clock,
            live=live,
        ),
    ]


def large_fleet(nodes: int = 8, gpus_per_node: int = 8, clock: Callable[[], float] = time.time) -> list[SimulatedNode]:
    """A bigger fleet for benchmarks: ``nodes`` x ``gpus_per_node`` H100s, mostly serving."""
    fleet = []
    for n in range(nodes):
        gpus = []
        for g in range(gpus_per_node):
            work = (
                SimWorkload("vllm", f"model-{g % 3}", 8000 + g, 0.9, 40 + 5 * (g % 5), 10000 + 100 * n + g)
                if g % 4 != 3
                else SimWorkload("idle")
            )
            gpus.append((H100_80GB, work))
        fleet.append(SimulatedNode(f"sim-node-{n:02d}", gpus, seed=100 + n, clock=clock))
    return fleet
