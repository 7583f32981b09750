"""Ending a process that holds a GPU (the Fleet screen's guarded kill, nvitop's habit).

A kill names a pid the dashboard saw on a GPU of a node, with the command line it saw. Before any
signal the node is asked again (NVML, on this host): the pid must still hold one of its GPUs and still
run the same command, so a pid reused since the screen drew it is never signalled. The process gets
SIGTERM, then SIGKILL after a grace period. Every try is audited (done, refused with why, failed), and
a read-only fleetdeck refuses it like any other change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import psutil

from engine.audit import trail as audit


class KillError(Exception):
    """The process was not signalled; the message says why in one line."""


@dataclass(frozen=True)
class KillRequest:
    node: str
    pid: int
    gpu: str  # the GPU it was seen on, as shown ("0", "0,1")
    command: str  # the command line the operator saw and confirmed
    user: str | None = None
    simulated: bool = False


def _gpu_pids_here() -> set[int]:
    from fleet.source import snapshot_here

    snap = snapshot_here()
    return {p.pid for g in snap.gpus for p in g.processes}


def kill_gpu_process(req: KillRequest, gpu_pids: Callable[[], set[int]] = _gpu_pids_here,
                     grace_s: float = 5.0) -> str:
    params = {"node": req.node, "pid": req.pid, "gpu": req.gpu, "user": req.user, "command": req.command[:200]}
    with audit.audited("process.kill", f"{req.node}:{req.pid}", refusals=(KillError,), **params):
        return _kill(req, gpu_pids, grace_s)


def _kill(req: KillRequest, gpu_pids: Callable[[], set[int]], grace_s: float) -> str:
    if req.simulated:
        raise KillError(f"{req.node} is a simulated node: pid {req.pid} stands in for a GPU process and is "
                        "not signalled from here (stop its server on Servers or its job on Jobs)")
    if req.pid <= 1:
        raise KillError(f"pid {req.pid} is not a process to signal")
    if req.pid == os.getpid() or req.pid in {p.pid for p in psutil.Process().parents()}:
        raise KillError(f"pid {req.pid} is fleetdeck itself or one of its parents")
    if req.pid not in gpu_pids():
        raise KillError(f"pid {req.pid} no longer holds a GPU of {req.node}")
    try:
        proc = psutil.Process(req.pid)
        argv = proc.cmdline()
        seen = " ".join(argv) if argv else proc.name()
    except psutil.NoSuchProcess:
        raise KillError(f"pid {req.pid} has already ended") from None
    except psutil.AccessDenied:
        raise KillError(f"pid {req.pid} belongs to {req.user or 'another user'}: not permitted") from None
    if req.command and not req.command.startswith("(") and seen != req.command:
        raise KillError(f"pid {req.pid} now runs another command ({seen[:60]}): not signalled")
    try:
        proc.terminate()
        _, alive = psutil.wait_procs([proc], timeout=grace_s)
        if alive:
            proc.kill()
            psutil.wait_procs(alive, timeout=grace_s)
            return f"pid {req.pid} on {req.node} ended (SIGKILL after {grace_s:.0f} s)"
    except psutil.NoSuchProcess:
        pass
    except psutil.AccessDenied:
        raise KillError(f"pid {req.pid} belongs to {req.user or 'another user'}: not permitted") from None
    return f"pid {req.pid} on {req.node} ended (SIGTERM)"
