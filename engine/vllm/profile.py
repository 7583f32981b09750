"""Launch profiles (TOML in configs/profiles/): what `vllm serve` gets, validated."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from engine.kvfit.lora import VLLM_LORA_RANKS as VLLM_LORA_RANKS  # the ranks vLLM accepts: the planner's list
from store.config_files import Strict, load_toml_model


class LoraSettings(Strict):
    enable: bool = False
    max_loras: int = Field(default=4, ge=1)
    max_lora_rank: int = Field(default=64, ge=1)
    preload: list[str] = Field(default_factory=list, description="adapter names (from the adapter roots) or name=path")


class Profile(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    model: str = Field(min_length=1, description="local model folder (air-gapped) or a model id")
    served_model_name: str | None = None
    tensor_parallel_size: int = Field(default=1, ge=1)
    quantization: str = "none"  # one of QUANT_BY_VLLM_NAME (the planner sizes the weights by it)
    kv_cache_dtype: str = "auto"  # one of KV_DTYPES
    max_model_len: int = Field(default=8192, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    # What the planner must know because vLLM sizes memory by it (each also goes on vLLM's command line).
    max_num_seqs: int | None = Field(default=None, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    enforce_eager: bool = False
    kv_cache_memory_bytes: int | None = Field(default=None, ge=1, description="vLLM's explicit KV cache size")
    vllm_version: str | None = Field(default=None, pattern=r"^\d+\.\d+(\.\d+)?$",
                                     description="the vLLM this profile runs, where its memory accounting differs")
    # "auto": the first free port from 8000 (vLLM's own default, what firewalls are opened for); "os": one the
    # OS picks from its ephemeral range, outside every conventional range (the demo's simulated servers: a
    # test run or a real service on 8000.. on the same host is never in their way).
    port: int | Literal["auto", "os"] = "auto"
    # Where the server listens. Unset: 127.0.0.1 (the proxy, the dashboard and the node's agent all reach it
    # there), or for a Slurm server every interface of the node Slurm picks, since the login node must
    # reach it. A host other than loopback needs api_key_env, or allow_unauthenticated = true said outright.
    host: str | None = Field(default=None, description="address to listen on (default 127.0.0.1)")
    allow_unauthenticated: bool = False
    api_key_env: str | None = None
    lora: LoraSettings = Field(default_factory=LoraSettings)
    extra_args: list[str] = Field(default_factory=list)
    vllm_command: list[str] | str | None = None
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for the server, e.g. "
                                "VLLM_CPU_KVCACHE_SPACE for vLLM's CPU build")

    @field_validator("quantization", "kv_cache_dtype")
    @classmethod
    def _known_name(cls, v: str, info: ValidationInfo) -> str:
        from engine.kvfit.arch import QUANT_BY_VLLM_NAME
        from engine.kvfit.kv_cache import KV_DTYPES

        allowed = sorted(QUANT_BY_VLLM_NAME) if info.field_name == "quantization" else list(KV_DTYPES)
        if v not in allowed:
            raise ValueError(f"one of {', '.join(allowed)}")
        return v

    @field_validator("model", "served_model_name", "extra_args", "vllm_command", "env", "api_key_env")
    @classmethod
    def _no_nul(cls, v: object) -> object:
        """What becomes an argument or the environment of a process: a NUL there is refused by exec at launch
        (a ValueError from deep inside subprocess), so it is refused here, where the file and key are named."""
        items = v.items() if isinstance(v, dict) else v if isinstance(v, list) else [v]
        for item in items:
            for text in item if isinstance(item, tuple) else (item,):
                if isinstance(text, str) and "\x00" in text:
                    raise ValueError("holds a NUL character, which no command line or environment can carry")
        return v

    @field_validator("vllm_command")
    @classmethod
    def _command(cls, v: list[str] | str | None) -> list[str] | str | None:
        if isinstance(v, str):
            try:
                words = shlex.split(v)
            except ValueError as exc:  # an unbalanced quote
                raise ValueError(f"not a command line ({exc})") from None
        else:
            words = v or []
        if v is not None and (not words or not all(w.strip() for w in words)):
            raise ValueError("names the vLLM command: a program and its arguments, none of them empty")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        import math

        for key in v:
            if not key.replace("_", "").isalnum() or key[:1].isdigit():
                raise ValueError(f"{key!r} is not an environment variable name")
            if key in ("VLLM_API_KEY", "CUDA_VISIBLE_DEVICES"):
                raise ValueError(f"{key} is set by fleetdeck (api_key_env and --gpus), not by the profile")
        space = v.get("VLLM_CPU_KVCACHE_SPACE")
        if space is not None:
            # The planner sizes a CPU server's KV cache by it, as vLLM does: a number of GiB, or nothing planned.
            try:
                gib = float(space)
            except ValueError:
                gib = math.nan
            if not (math.isfinite(gib) and 0 < gib <= 1 << 20):
                raise ValueError(f"VLLM_CPU_KVCACHE_SPACE is the KV cache's size in GiB, a positive number (got {space[:40]!r})")
        return v

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        import ipaddress
        import re

        if v is None:
            return v
        try:
            return str(ipaddress.ip_address(v.strip("[]")))
        except ValueError:
            pass
        if not re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*", v):
            raise ValueError(f"an IP address or a host name, got {v!r}")
        return v

    @field_validator("port")
    @classmethod
    def _port(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 65535:
            raise ValueError('port must be 1-65535 or "auto"')
        return v

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def cpu_kv_cache_bytes(self) -> int | None:
        """vLLM's CPU build sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB), not from GPU memory."""
        space = self.env.get("VLLM_CPU_KVCACHE_SPACE")
        return int(float(space) * 1024**3) if space else None  # checked when the profile was read

    def command(self) -> list[str]:
        if isinstance(self.vllm_command, str):
            return shlex.split(self.vllm_command)
        return list(self.vllm_command) if self.vllm_command else []


def load_profile(path: str | Path) -> Profile:
    return load_toml_model(path, Profile)


def find_profile(name_or_path: str, roots: list[Path]) -> Path:
    """A profile by path, or by name in the profile folders (a folder of that name elsewhere is not a profile)."""
    p = Path(name_or_path).expanduser()
    if p.suffix == ".toml" or p.is_file():
        return p
    for root in roots:
        candidate = root / f"{name_or_path}.toml"
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(r) for r in roots) or "(none)"
    raise FileNotFoundError(f"no profile {name_or_path!r}: give a .toml path or put {name_or_path}.toml in {searched}")


def profile_roots() -> list[Path]:
    from store.paths import config_dir, overrides

    return overrides().profile_roots + [config_dir() / "profiles", Path.cwd() / "configs" / "profiles"]


def named_profiles() -> dict[str, Path]:
    from store.config_files import named_tomls

    return named_tomls(profile_roots())


def parse_gpus(text: str) -> list[int]:
    try:
        gpus = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--gpus takes indices like 0 or 0,1, got {text!r}") from None
    if not gpus or len(set(gpus)) != len(gpus) or min(gpus) < 0:
        raise ValueError(f"--gpus takes distinct indices like 0 or 0,1, got {text!r}")
    return gpus


