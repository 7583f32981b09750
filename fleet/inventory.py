"""Which GPUs a node has, to check a start's GPU indices against: a request names GPUs the node has.

NVML decides when it reads (a simulated node's GPUs are its readings too); its last readings when they
are stale (a hung driver). A node where NVML has never read (the library missing, a driver it cannot
talk to) still has the GPUs its NVIDIA driver shows: one folder per GPU under /proc/driver/nvidia/gpus.
A node that shows none has none: a start naming GPU 7 there is refused, not handed to CUDA to guess.
"""

from __future__ import annotations

from pathlib import Path

from fleet.model import NodeSnapshot

DRIVER_GPUS = Path("/proc/driver/nvidia/gpus")  # the driver's own list: one folder per GPU, by PCI address


def gpu_inventory(snap: NodeSnapshot) -> list[int]:
    """The GPU indices this node has: its snapshot's (live or stale), else as many as its driver lists."""
    if snap.gpus:
        return sorted(g.index for g in snap.gpus)
    try:
        return list(range(sum(1 for p in DRIVER_GPUS.iterdir() if p.is_dir())))
    except OSError:  # no NVIDIA driver loaded: no GPU
        return []


def check_gpus(snap: NodeSnapshot, gpus: list[int]) -> None:
    """ValueError, in one line, when a GPU index is not one this node has (with the ones it has, and why
    NVML could not say, when it could not)."""
    have = gpu_inventory(snap)
    missing = [g for g in gpus if g not in have]
    if missing:
        why = f"; NVML: {snap.reason}" if snap.nvml != "ok" and snap.reason else ""
        raise ValueError(f"no GPU {missing} on {snap.node} (it has {have if have else 'no GPU'}{why})")
