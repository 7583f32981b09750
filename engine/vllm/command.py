"""What a vLLM server is started with: its argument list (never a shell string) and environment, where it
listens, the exposure check, the adapters it preloads, and the planner's verdict for the GPUs it gets.

Shared by the launcher (a local process) and slurm_server (a Slurm job): both start the same argv.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from engine.adapters.registry import AdapterError, read_adapter
from engine.kvfit import ArchError, FitRequest, load_model, plan
from engine.kvfit.arch import QUANT_BY_VLLM_NAME
from engine.kvfit.local_models import configured_roots, vllm_model_arg
from engine.kvfit.overhead import vllm_view_of
from engine.router.config import is_loopback
from engine.vllm.profile import Profile
from store.paths import overrides

GIB = 1024**3
CPU_BLOCK_SIZE = 128  # vLLM's CPU backend pages its KV cache in 128-token blocks
CPU_MLA_REFERENCE_BLOCK_SIZE = 16  # ... but its reference MLA decode kernel takes 16-token blocks only


def cpu_has_amx(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has AMX tiles (vLLM's CPU platform picks its AMX MLA backend then)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    return "amx_tile" in cpuinfo.split()


def cpu_block_size(arch: Any, amx: bool | None = None) -> int:
    """The block size vLLM's CPU platform gives a model's KV cache (vllm/platforms/cpu.py): 128 tokens, except
    an MLA model (DeepSeek-V2/V3 layouts) on a CPU without AMX, which the reference CPU MLA backend serves
    with 16-token blocks only. The planner pages with the same block, or its block count is off."""
    if getattr(arch, "is_mla", False) and not (cpu_has_amx() if amx is None else amx):
        return CPU_MLA_REFERENCE_BLOCK_SIZE
    return CPU_BLOCK_SIZE


class LaunchError(Exception):
    """The server was not started; the message says why (with the planner's figures when it refused)."""


class UnplannableError(LaunchError):
    """The planner cannot size this profile here (model on another mount, unknown architecture): --force starts it."""


# vLLM's OpenAI server as a module: what vLLM's CPU build runs (its `vllm` console script looks up the
# distribution name `vllm` and fails). It takes `--model M` where the `vllm` CLI takes `serve M`.
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def vllm_installed(cmd: Sequence[str]) -> bool:
    return shutil.which(cmd[0]) is not None or Path(cmd[0]).exists()


def vllm_command(profile: Profile, require_installed: bool = True) -> list[str]:
    """The vLLM command line's start; `require_installed=False` for a dry run, which only prints it."""
    env = overrides().vllm
    try:
        cmd = shlex.split(env) if env else (profile.command() or ["vllm"])
    except ValueError as exc:  # the profile's was checked when it was read; FLEETDECK_VLLM is checked here
        raise LaunchError(f"FLEETDECK_VLLM is not a command line ({exc}): {(env or '')[:80]!r}") from None
    if not cmd or not cmd[0].strip():
        raise LaunchError("FLEETDECK_VLLM is empty: unset it, or name the vLLM command")
    if require_installed and not vllm_installed(cmd):
        raise LaunchError(
            f"cannot find the vLLM command {cmd[0]!r}: install it (pip install 'fleetdeck[serve]' on a GPU host) "
            "or point FLEETDECK_VLLM / the profile's vllm_command at it"
        )
    return cmd


def free_port(start: int = 8000, end: int = 8999, taken: set[int] | None = None) -> int:
    """The first port that is free now and not promised to a server that is still starting."""
    for port in range(start, end):
        if taken and port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise LaunchError(f"no free port between {start} and {end}")


def os_port(taken: set[int] | None = None) -> int:
    """A port the OS picks now from its ephemeral range (bind to port 0), not one promised to a server that
    is still starting. Free on every interface when chosen, like free_port's."""
    for _ in range(64):
        with socket.socket() as s:
            s.bind(("0.0.0.0", 0))
            port: int = s.getsockname()[1]
        if not taken or port not in taken:
            return port
    raise LaunchError("the OS offered no port that is not promised to a starting server")


def choose_port(setting: int | str, taken: set[int] | None = None) -> int:
    """The port a profile's `port` setting gives now: a number as it is, "auto" the first free from 8000,
    "os" one the OS picks."""
    if setting == "os":
        return os_port(taken)
    if setting == "auto":
        return free_port(taken=taken)
    return int(setting)


LOOPBACK = "127.0.0.1"
ALL_INTERFACES = "0.0.0.0"


def listen_host(profile: Profile, slurm: bool = False) -> str:
    """Where a server listens: the profile's host; else loopback, where this host's proxy, dashboard and
    agent reach it (vLLM's own default is every interface); else, for a Slurm server, every interface of
    the compute node, which Slurm picks only when the job starts and which the login node must reach."""
    if profile.host:
        return profile.host
    return ALL_INTERFACES if slurm else LOOPBACK


def check_exposure(profile: Profile, host: str) -> None:
    """A server reachable from the network answers only clients with its key, unless the profile says
    `allow_unauthenticated = true` outright. Raises LaunchError."""
    if is_loopback(host) or profile.allow_unauthenticated:
        return
    if not profile.api_key_env:
        raise LaunchError(f"refusing to start {profile.name} listening on {host} without an API key: set api_key_env "
                          "in the profile (an environment variable holding the key), leave host unset for 127.0.0.1, "
                          "or set allow_unauthenticated = true")
    if not os.environ.get(profile.api_key_env):
        raise LaunchError(f"refusing to start {profile.name} listening on {host}: api_key_env names "
                          f"{profile.api_key_env}, which is not set here, so the server would have no key")


def build_launch(profile: Profile, gpus: Sequence[int], port: int, lora_modules: dict[str, str],
                 host: str | None = None, require_installed: bool = True) -> tuple[list[str], dict[str, str]]:
    cmd = vllm_command(profile, require_installed)
    # A hub id found only in a [models] root is handed to vLLM as that folder; clients still ask for the
    # served name, which defaults to the id.
    model = vllm_model_arg(profile.model, configured_roots())
    model_args = ["--model", model] if cmd[-1] == API_SERVER_MODULE else ["serve", model]
    argv = cmd + model_args + [
        "--host", host or listen_host(profile),
        "--port", str(port),
        "--served-model-name", profile.served_name,
        "--tensor-parallel-size", str(profile.tensor_parallel_size),
        "--max-model-len", str(profile.max_model_len),
        "--gpu-memory-utilization", str(profile.gpu_memory_utilization),
        "--kv-cache-dtype", profile.kv_cache_dtype,
    ]
    if profile.quantization != "none":
        argv += ["--quantization", profile.quantization]
    for flag, value in (("--max-num-seqs", profile.max_num_seqs), ("--max-num-batched-tokens", profile.max_num_batched_tokens),
                        ("--kv-cache-memory-bytes", profile.kv_cache_memory_bytes)):
        if value is not None:
            argv += [flag, str(value)]
    if profile.enforce_eager:
        argv.append("--enforce-eager")
    env = {**profile.env, "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus), "HF_HUB_OFFLINE": "1"}
    if profile.lora.enable:
        argv += ["--enable-lora", "--max-loras", str(profile.lora.max_loras), "--max-lora-rank", str(profile.lora.max_lora_rank)]
        if lora_modules:
            argv += ["--lora-modules", *(f"{n}={p}" for n, p in lora_modules.items())]
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if profile.api_key_env:
        # vLLM reads VLLM_API_KEY: the key never shows in `ps`.
        env["VLLM_API_KEY"] = os.environ.get(profile.api_key_env, "")
    argv += profile.extra_args
    return argv, env


def resolve_preload(profile: Profile, adapter_roots: list[Path]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in profile.lora.preload:
        name, _, path = item.partition("=")
        if not path:
            candidates = [Path(r) / name for r in adapter_roots]
            found = next((c for c in candidates if (c / "adapter_config.json").is_file()), None)
            if found is None:
                raise LaunchError(f"preload adapter {name!r} is in none of the adapter roots ({', '.join(map(str, adapter_roots)) or 'none set'})")
            path = str(found)
        try:
            read_adapter(Path(path))
        except AdapterError as exc:
            raise LaunchError(f"preload adapter {name!r}: {exc}") from exc
        out[name] = path
    return out


def allow_long_max_model_len(profile: Profile) -> bool:
    """Whether the profile's environment sets VLLM_ALLOW_LONG_MAX_MODEL_LEN (vLLM reads it as a boolean)."""
    return profile.env.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "").strip().lower() in ("1", "true", "yes")


def profile_lora(profile: Profile) -> Any:
    """The planner's LoRA settings for a profile's [lora] (None when LoRA is off): vLLM allocates their buffers
    out of the KV budget. A rank vLLM refuses is refused before this (launcher); --force plans it at the next
    rank up, as the buffers would be at least that large."""
    from engine.kvfit.lora import VLLM_LORA_RANKS, LoraSettings

    if not profile.lora.enable and "--enable-lora" not in profile.extra_args:
        return None
    if not profile.lora.enable:  # LoRA switched on in extra_args only: vLLM's defaults, unless they say more
        return LoraSettings.from_vllm_args(1, 16, profile.extra_args)
    rank = next((r for r in VLLM_LORA_RANKS if r >= profile.lora.max_lora_rank), VLLM_LORA_RANKS[-1])
    # what the profile's extra vLLM arguments change (--max-cpu-loras, --lora-target-modules, --fully-sharded-loras)
    return LoraSettings.from_vllm_args(profile.lora.max_loras, rank, profile.extra_args)


def preflight(profile: Profile, gpus: Sequence[Any]) -> Any:
    """The planner's verdict for exactly these GPUs: the tightest one decides, with its live free memory.

    A profile for vLLM's CPU build (VLLM_CPU_KVCACHE_SPACE set) is planned against that KV space, in the
    CPU backend's 128-token blocks, with no GPU at all.
    """
    cpu_kv = profile.cpu_kv_cache_bytes
    if cpu_kv is None and len(gpus) != profile.tensor_parallel_size:
        raise LaunchError(f"the profile asks for tensor_parallel_size {profile.tensor_parallel_size} but "
                          f"{len(gpus)} GPU(s) were chosen")
    try:
        arch, exact = load_model(profile.model)
    except ArchError as exc:
        raise UnplannableError(f"cannot plan {profile.model}: {exc} (--force starts it anyway)") from exc
    if profile.quantization != "none" and arch.quantization.method == "none":
        arch = replace(arch, quantization=QUANT_BY_VLLM_NAME[profile.quantization])
    try:
        lora = profile_lora(profile)
    except ValueError as exc:  # LoraError: [lora] settings vLLM would refuse
        raise UnplannableError(f"cannot plan {profile.model}: [lora] {exc} (--force starts it anyway)") from exc
    if cpu_kv is not None:
        return plan(arch, FitRequest(available_kv_bytes=cpu_kv, lora=lora, max_model_len=profile.max_model_len,
                                     allow_long_max_model_len=allow_long_max_model_len(profile),
                                     kv_cache_dtype=profile.kv_cache_dtype, block_size=cpu_block_size(arch),
                                     tensor_parallel_size=profile.tensor_parallel_size, weight_bytes_total=exact))
    views = [vllm_view_of(g) for g in gpus]  # a MIG GPU is one slice to vLLM
    total, free, used, note = min(views, key=lambda v: (v[1] if v[1] is not None else v[0] or 0))
    tightest = gpus[views.index((total, free, used, note))]
    request = FitRequest(
        gpu_memory_bytes=total, gpu_memory_utilization=profile.gpu_memory_utilization,
        tensor_parallel_size=profile.tensor_parallel_size, max_model_len=profile.max_model_len,
        kv_cache_dtype=profile.kv_cache_dtype, free_memory_bytes=free, notes=[note] if note else [],
        other_process_bytes=used, gpu_name=tightest.name, weight_bytes_total=exact,
        max_num_seqs=profile.max_num_seqs, max_num_batched_tokens=profile.max_num_batched_tokens,
        enforce_eager=profile.enforce_eager, kv_cache_memory_bytes=profile.kv_cache_memory_bytes,
        allow_long_max_model_len=allow_long_max_model_len(profile), lora=lora,
    )
    if profile.vllm_version:
        request.vllm_version = profile.vllm_version
    return plan(arch, request)


