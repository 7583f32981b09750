"""Starting, watching and stopping vLLM servers.

The launcher builds `vllm serve`'s argument list (never a shell string), pins the chosen GPUs with
CUDA_VISIBLE_DEVICES, turns on runtime LoRA updating when LoRA is on, starts the server in its own
session with its output in a log file (so it outlives the dashboard), and records pid, process create
time, command, GPUs, port and log in the store. State comes from the process and the HTTP API:
starting (alive, not answering /health), ready (/health 200 and /v1/models), crashed (gone without
being stopped; the log tail says why), stopped.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import httpx
import psutil

from engine import audit, managed
from engine.http_auth import bearer
from engine.managed import LocalGpus, ManagedRecord
from engine.logs import tail
from engine.vllm.diagnose import diagnose
from engine.vllm.profile import VLLM_LORA_RANKS, Profile

if TYPE_CHECKING:
    from store.db import Store

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


class ServerState(StrEnum):
    """A server's state, stored as its text."""

    STARTING = "starting"  # launched (or submitted to Slurm); not answering yet
    READY = "ready"  # its own process answers /health
    CRASHED = "crashed"  # it ended without being stopped (the reason says why)
    STOPPED = "stopped"  # stopped by an operator


LIVE = (ServerState.STARTING, ServerState.READY)
ENDED = (ServerState.STOPPED, ServerState.CRASHED)


@dataclass
class ServerRecord(ManagedRecord):
    KIND: ClassVar[str] = "server"
    LISTED_BY: ClassVar[str] = "fleetdeck serve ls"
    STATES: ClassVar[type[ServerState]] = ServerState

    state: ServerState

    @property
    def base_url(self) -> str:
        host = self.slurm.host if self.slurm is not None else None  # a Slurm server listens on the node Slurm chose
        return f"http://{host or '127.0.0.1'}:{self.port}"

    @property
    def served_name(self) -> str:
        return str(self.spec.get("served_model_name") or self.spec.get("model", ""))

    @property
    def api_key(self) -> str | None:
        """The server's key, from the environment variable its profile names (never stored)."""
        env_name = self.spec.get("api_key_env")
        return os.environ.get(env_name, "") or None if env_name else None

    def to_json(self) -> dict[str, Any]:
        d = self.to_doc()
        d["base_url"] = self.base_url
        return d


def vllm_installed(cmd: Sequence[str]) -> bool:
    return shutil.which(cmd[0]) is not None or Path(cmd[0]).exists()


def vllm_command(profile: Profile, require_installed: bool = True) -> list[str]:
    """The vLLM command line's start; `require_installed=False` for a dry run, which only prints it."""
    from store.paths import overrides

    env = overrides().vllm
    cmd = shlex.split(env) if env else (profile.command() or ["vllm"])
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
    from engine.router.config import is_loopback

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
    from engine.kvfit.local_models import configured_roots, vllm_model_arg

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
    from engine.adapters import AdapterError, read_adapter

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


def preflight(profile: Profile, gpus: Sequence[Any]) -> Any:
    """The planner's verdict for exactly these GPUs: the tightest one decides, with its live free memory.

    A profile for vLLM's CPU build (VLLM_CPU_KVCACHE_SPACE set) is planned against that KV space, in the
    CPU backend's 128-token blocks, with no GPU at all.
    """
    from dataclasses import replace

    from engine.kvfit import ArchError, FitRequest, load_model, plan

    cpu_kv = profile.cpu_kv_cache_bytes
    if cpu_kv is None and len(gpus) != profile.tensor_parallel_size:
        raise LaunchError(f"the profile asks for tensor_parallel_size {profile.tensor_parallel_size} but "
                          f"{len(gpus)} GPU(s) were chosen")
    try:
        arch, exact = load_model(profile.model)
    except ArchError as exc:
        raise UnplannableError(f"cannot plan {profile.model}: {exc} (--force starts it anyway)") from exc
    if profile.quantization != "none" and arch.quantization.method == "none":
        from engine.kvfit.arch import QUANT_BY_VLLM_NAME

        arch = replace(arch, quantization=QUANT_BY_VLLM_NAME[profile.quantization])
    if cpu_kv is not None:
        return plan(arch, FitRequest(available_kv_bytes=cpu_kv, max_model_len=profile.max_model_len,
                                     allow_long_max_model_len=allow_long_max_model_len(profile),
                                     kv_cache_dtype=profile.kv_cache_dtype, block_size=cpu_block_size(arch),
                                     tensor_parallel_size=profile.tensor_parallel_size, weight_bytes_total=exact))
    from engine.kvfit.plan import vllm_view_of

    views = [vllm_view_of(g) for g in gpus]  # a MIG GPU is one slice to vLLM
    total, free, used, note = min(views, key=lambda v: (v[1] if v[1] is not None else v[0] or 0))
    tightest = gpus[views.index((total, free, used, note))]
    fit = FitRequest(
        gpu_memory_bytes=total, gpu_memory_utilization=profile.gpu_memory_utilization,
        tensor_parallel_size=profile.tensor_parallel_size, max_model_len=profile.max_model_len,
        kv_cache_dtype=profile.kv_cache_dtype, free_memory_bytes=free, notes=[note] if note else [],
        other_process_bytes=used, gpu_name=tightest.name, weight_bytes_total=exact,
        max_num_seqs=profile.max_num_seqs, max_num_batched_tokens=profile.max_num_batched_tokens,
        enforce_eager=profile.enforce_eager, kv_cache_memory_bytes=profile.kv_cache_memory_bytes,
        allow_long_max_model_len=allow_long_max_model_len(profile),
    )
    if profile.vllm_version:
        fit = replace(fit, vllm_version=profile.vllm_version)
    return plan(arch, fit)


def start(store: Store, profile: Profile, gpus: Sequence[int], *, gpu_snapshots: Sequence[Any] | None = None,
          port: int | None = None, force: bool = False, adapter_roots: list[Path] | None = None,
          node: str | None = None, log_dir: Path | None = None, slurm: Any = None) -> tuple[ServerRecord, Any]:
    """Start a server (or, with `slurm`, a jobs.SlurmRequest, submit it to Slurm); returns its record and
    the planner's verdict. Raises LaunchError on refusal."""
    where = str(managed.SlurmGpus(slurm.gpus) if slurm is not None else LocalGpus(tuple(gpus)))
    with audit.audited("server.start", profile.name, refusals=(LaunchError, ValueError), profile=profile.name,
                       model=profile.model, gpus=where, port=port, force=force) as entry:
        check_exposure(profile, listen_host(profile, slurm=slurm is not None))  # refused (and audited) first
        if slurm is not None:
            from engine.vllm import slurm_server

            chosen = port or (free_port(taken=_ports_taken(store)) if profile.port == "auto" else int(profile.port))
            rec, verdict = slurm_server.submit(store, profile, slurm, port=chosen, force=force,
                                               adapter_roots=adapter_roots, log_dir=log_dir)
        else:
            rec, verdict = _start(store, profile, gpus, gpu_snapshots=gpu_snapshots, port=port, force=force,
                                  adapter_roots=adapter_roots, node=node, log_dir=log_dir)
        entry.target = entry.params["server"] = rec.id
        return rec, verdict


def _start(store: Store, profile: Profile, gpus: Sequence[int], *, gpu_snapshots: Sequence[Any] | None,
           port: int | None, force: bool, adapter_roots: list[Path] | None, node: str | None,
           log_dir: Path | None) -> tuple[ServerRecord, Any]:
    from store.paths import private_dir, state_dir

    if profile.lora.enable and profile.lora.max_lora_rank not in VLLM_LORA_RANKS and not force:
        raise LaunchError(f"max_lora_rank {profile.lora.max_lora_rank} is not one vLLM accepts "
                          f"({', '.join(map(str, VLLM_LORA_RANKS))}): it would refuse to start. Use the next one up "
                          f"({next((r for r in VLLM_LORA_RANKS if r >= profile.lora.max_lora_rank), 512)}); "
                          "--force starts it anyway")
    verdict = None
    warning = None
    if gpu_snapshots is not None or profile.cpu_kv_cache_bytes is not None:
        try:
            verdict = preflight(profile, gpu_snapshots or [])
        except UnplannableError as exc:
            if not force:
                raise
            warning = f"started without a plan: {exc}"
        if verdict is not None and not verdict.fits and not force:
            raise LaunchError(f"preflight: DOES NOT FIT: {verdict.reason} (--force starts it anyway)")
    elif not force:
        raise LaunchError("the GPUs could not be checked (no NVML readings); --force starts it anyway")
    else:
        warning = "started without a plan: the GPUs could not be checked (no NVML readings)"
    lora_modules = resolve_preload(profile, adapter_roots or []) if profile.lora.enable else {}
    if port is None and profile.port == "auto":
        chosen_port = free_port(taken=_ports_taken(store))
    else:
        chosen_port = port or int(profile.port)
    argv, env = build_launch(profile, gpus, chosen_port, lora_modules)
    sid = f"{profile.name}-{uuid.uuid4().hex[:6]}"
    logs = private_dir(log_dir or (state_dir() / "servers"))
    log_path = logs / f"{sid}.log"
    with open(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
        log.write(f"# fleetdeck: {' '.join(shlex.quote(a) for a in argv)}\n".encode())
    try:
        pid, create_time = managed.spawn(argv, env, str(log_path))
    except OSError as exc:
        raise LaunchError(f"could not start {argv[0]}: {exc}") from exc
    shown_env = {k: ("***" if k == "VLLM_API_KEY" else v) for k, v in env.items()}
    rec = ServerRecord(
        id=sid, name=profile.name, node=node or socket.gethostname(), pid=pid, create_time=create_time,
        argv=argv, env=shown_env, gpus=LocalGpus(tuple(gpus)), port=chosen_port, log_path=str(log_path),
        spec=profile.model_dump(mode="json"), state=ServerState.STARTING, reason=warning, started_at=time.time(),
        predicted_kv_tokens=verdict.kv_tokens if verdict is not None else None,
    )
    rec.save(store)
    return rec, verdict


def _ports_taken(store: Store) -> set[int]:
    return {r.port for r in list_servers(store) if r.state in LIVE and r.port}


def probe(rec: ServerRecord, timeout: float = 1.0) -> bool:
    try:
        if httpx.get(f"{rec.base_url}/health", timeout=timeout, trust_env=False).status_code != 200:
            return False
        return httpx.get(f"{rec.base_url}/v1/models", timeout=timeout, headers=bearer(rec.api_key),
                         trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def answered_by_own_process(rec: ServerRecord) -> bool:
    """The socket listening on the server's port belongs to its own process tree.

    A port chosen by free_port is only free when it was chosen: until the server binds it (seconds for
    the simulator, minutes for a real vLLM loading weights) another process may take it, and its
    answers to /health must not make this server "ready". Processes we cannot inspect (another user's,
    an adopted pid) leave the HTTP answer as the only evidence, so it is trusted.
    """
    if rec.pid is None or not rec.port:
        return True
    try:
        root = psutil.Process(rec.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    for proc in tree:
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied:
            return True
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == rec.port for c in conns):
            return True
    return False


# vLLM V1 runs the model in a child process titled "VLLM::EngineCore" (the kernel keeps 15 characters).
ENGINE_TITLE = "VLLM::EngineCor"


def _engine_process(pid: int) -> psutil.Process | None:
    try:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                if child.name().startswith(ENGINE_TITLE) or any("EngineCore" in a for a in child.cmdline()[:1]):
                    return child
            except psutil.Error:
                continue
    except psutil.Error:
        return None
    return None


def engine_lost(rec: ServerRecord) -> str | None:
    """Why the server cannot serve although its API process lives: its engine process died.

    /health alone is not enough: vLLM's API server can answer it while the engine behind it is gone.
    The engine is remembered (pid and create time) the first time it is seen; a server without one
    (the simulator, or vLLM's older single-process engine) is judged by its API process alone.
    """
    if rec.pid is None:
        return None
    if rec.engine_pid is None:
        engine = _engine_process(rec.pid)
        if engine is not None:
            try:
                rec.engine_pid, rec.engine_create_time = engine.pid, engine.create_time()
            except psutil.Error:  # it ended between the two calls: the next refresh decides
                return None
        return None
    if managed.alive(rec.engine_pid, rec.engine_create_time):
        return None
    return (f"vLLM's engine process (pid {rec.engine_pid}) died while its API server (pid {rec.pid}) still runs: "
            "requests cannot be served. Fix: restart the server (`r` on the Servers screen, or serve stop then start); "
            "the log may say why it died.")


def refresh(store: Store, rec: ServerRecord) -> ServerRecord:
    """Bring a record up to date with the process and the HTTP API; write changes back."""
    if rec.state in ENDED:
        return rec
    if rec.slurm is not None:
        from dataclasses import replace

        from engine.vllm import slurm_server

        before_slurm = (rec.state, rec.reason, replace(rec.slurm))
        slurm_server.refresh(rec)
        if (rec.state, rec.reason, rec.slurm) != before_slurm:
            rec.save(store)
        return rec
    before = (rec.state, rec.reason, rec.engine_pid)
    alive = rec.alive()
    # Probed before the engine is looked for: vLLM answers only once its engine runs, so a server first
    # seen ready has its engine recorded in the same refresh (a kill of it right after is then noticed).
    # Ready only when the answer comes from this server's own processes, not another on the same port.
    answers = alive and probe(rec) and (rec.state == ServerState.READY or answered_by_own_process(rec))
    lost = engine_lost(rec) if alive else None
    if not alive:
        # A stop may have ended it since this copy of the record was read (the Servers screen refreshes
        # while an operator stops): the stop's record stands, it is not a crash.
        stored = managed.find(store, ServerRecord, rec.id)
        if stored is not None and stored.state in ENDED:
            return stored
        rec.state = ServerState.CRASHED
        rec.ended_at = rec.ended_at or time.time()
        d = diagnose(tail(rec.log_path, 200))
        rec.reason = d.text() if d else "the process exited; see the log (`fleetdeck serve logs " + rec.id + "`)"
    elif lost:
        rec.state = ServerState.CRASHED
        rec.ended_at = rec.ended_at or time.time()
        rec.reason = lost
    elif answers:
        rec.state = ServerState.READY
    # Alive but not answering: a starting server stays starting, and a ready one that misses a probe
    # stays ready (a busy server can be slow to answer).
    if rec.state == ServerState.READY and rec.reason and rec.reason.startswith("started without a plan"):
        rec.reason = None
    if (rec.state, rec.reason, rec.engine_pid) != before:
        rec.save(store)
    return rec


def list_servers(store: Store, include_ended: bool = True) -> list[ServerRecord]:
    recs = managed.load_all(store, ServerRecord)
    return [r for r in recs if include_ended or r.state != ServerState.STOPPED]


def get(store: Store, sid: str) -> ServerRecord:
    return managed.get(store, ServerRecord, sid, LaunchError)




def prune(store: Store) -> list[ServerRecord]:
    """Forget the servers that have ended (stopped, crashed): their records leave the store, their log
    files stay on disk (a crash's diagnosis can still be read there). Audited as one action."""
    return managed.prune(store, ServerRecord, ENDED, refresh)


def stop(store: Store, rec: ServerRecord, timeout: float = 20.0) -> ServerRecord:
    """SIGTERM the server's process group, then SIGKILL after the timeout."""
    with audit.audited("server.stop", rec.id, server=rec.id):
        # Refreshed first: a server that crashed since it was last looked at keeps its diagnosis.
        return _stop(store, refresh(store, rec), timeout)


def _stop(store: Store, rec: ServerRecord, timeout: float) -> ServerRecord:
    if rec.slurm is not None:
        from engine import slurm
        from engine.vllm import slurm_server

        try:
            slurm_server.stop(rec, timeout)
        except slurm.SlurmError as exc:
            raise LaunchError(f"cannot stop Slurm job {rec.slurm.id}: {exc}") from exc
    else:
        rec.terminate(timeout, whole_group=True)
    if rec.state == ServerState.CRASHED:
        # What is left of a crashed server (an API process whose engine died) is ended, but the record
        # stays what it was: the crash and its diagnosis are the history an operator needs.
        rec.ended_at = rec.ended_at or time.time()
    else:
        rec.state = ServerState.STOPPED
        rec.ended_at = time.time()
        rec.reason = "stopped by the operator"
    rec.save(store)
    return rec


def wait_ready(store: Store, rec: ServerRecord, timeout: float = 600.0, poll: float = 0.5) -> ServerRecord:
    deadline = time.time() + timeout
    while time.time() < deadline:
        rec = refresh(store, rec)
        if rec.state != ServerState.STARTING:
            return rec
        time.sleep(poll)
    return rec
