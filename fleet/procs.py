"""Process attribution: who owns a pid that NVML lists, and what it is.

A vLLM server is recognised from its command line (``vllm serve MODEL`` or the OpenAI API server
module), a fleetdeck job from the flag the engine gives every job process (JOB_FLAG). A process that exits between NVML listing it
and psutil inspecting it is reported with what NVML knew, never raised.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass

import psutil

from fleet.model import GpuProcess, HostInfo, ProcessKind


# Every process fleetdeck starts for a job (fine-tune, merge, quantize) carries this flag and the job's id
# on its command line: the engine puts it there, so a GPU's process list names the job without this
# layer knowing which module runs it.
JOB_FLAG = "--fleetdeck-job"


@dataclass(slots=True, frozen=True)
class Attribution:
    kind: ProcessKind
    model: str | None = None
    port: int | None = None


def _flag_value(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def classify_cmdline(argv: list[str]) -> Attribution:
    """Say what a command line is. Pure, so it is tested without processes."""
    if not argv:
        return Attribution("other")
    joined = " ".join(argv)
    base_names = [os.path.basename(a) for a in argv[:3]]
    port_text = _flag_value(argv, "--port")
    port = int(port_text) if port_text and port_text.isdigit() else None

    job = _flag_value(argv, JOB_FLAG)
    if job:
        return Attribution("finetune", model=job)
    if "fleetdeck" in joined and " proxy" in joined:
        return Attribution("proxy", port=port or 4000)

    is_vllm_serve = False
    model: str | None = None
    for i, name in enumerate(base_names):
        if name.startswith("vllm") and i + 1 < len(argv) and argv[i + 1] == "serve":
            is_vllm_serve = True
            if i + 2 < len(argv) and not argv[i + 2].startswith("-"):
                model = argv[i + 2]
            break
    if "vllm.entrypoints.openai.api_server" in joined:
        is_vllm_serve = True
    if is_vllm_serve:
        model = model or _flag_value(argv, "--model")
        return Attribution("vllm", model=model, port=port or 8000)
    return Attribution("other")


def describe_process(pid: int, gpu_memory_bytes: int | None) -> GpuProcess:
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            argv = proc.cmdline()
            user = proc.username()
            name = proc.name()
    except psutil.NoSuchProcess:
        return GpuProcess(pid=pid, gpu_memory_bytes=gpu_memory_bytes, command="(exited)")
    except (psutil.AccessDenied, psutil.ZombieProcess):
        # Another user's process in a container without /proc access: NVML still knows its memory.
        return GpuProcess(pid=pid, gpu_memory_bytes=gpu_memory_bytes, command="(no permission)")
    attribution = classify_cmdline(argv)
    command = " ".join(argv) if argv else name
    return GpuProcess(
        pid=pid,
        gpu_memory_bytes=gpu_memory_bytes,
        kind=attribution.kind,
        user=user,
        command=command,
        model=attribution.model,
        port=attribution.port,
    )


def host_info() -> HostInfo:
    vm = psutil.virtual_memory()
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return HostInfo(
        cpu_pct=psutil.cpu_percent(interval=None),
        cpu_count=psutil.cpu_count(),
        memory_total_bytes=vm.total,
        memory_used_bytes=vm.total - vm.available,
        load_avg=load,
    )


def stop_child(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 5.0,
               sig: int = signal.SIGTERM) -> int:
    """End a child this process started and reap it: `sig`, then SIGKILL after `timeout`; its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()
