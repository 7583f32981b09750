"""TOML configuration validated into pydantic models, with errors that name file, key and expectation.

`load_toml_model` is the one loader every config file goes through (fleet, launch profiles, router,
fine-tune specs), so every config error reads the same way.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """A config file is missing, not TOML, or does not validate. The message is for the operator."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _key_path(loc: tuple[object, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(str(item))
    return ".".join(parts) or "(top level)"


def format_validation_error(path: Path | str, exc: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for err in exc.errors():
        key = _key_path(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        got = err.get("input")
        shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def parse_toml_model(path: Path | str, text: str, model: type[M]) -> M:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from exc


def load_toml_model(path: Path | str, model: type[M]) -> M:
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{p}: file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read: {exc}") from exc
    return parse_toml_model(p, text, model)


class NodeConfig(Strict):
    name: str = Field(min_length=1)
    # ssh reads an argument that starts with "-" as an option (-oProxyCommand=... runs a command).
    ssh: str = Field(min_length=1, pattern=r"^[^-\s][^\s]*$",
                     description="an SSH destination: host, user@host or a ~/.ssh/config alias")
    ssh_options: list[str] = Field(default_factory=list)
    agent_command: list[str] = Field(default_factory=list, description="default: fleetdeck agent --stdio")


class AuditSettings(Strict):
    syslog: bool = Field(default=False, description="also send each audit record to the system log (RFC 5424)")
    syslog_socket: Path = Field(default=Path("/dev/log"), description="the local syslog/journald socket")
    retention_days: float = Field(default=6 * 365, ge=1, le=100 * 365, description="HIPAA: six years")


class ModelSettings(Strict):
    """Where merged and quantized models go, and the Python that runs llm-compressor."""

    root: Path | None = Field(default=None, description="default: the data folder's models/")
    quantize_python: Path | None = Field(default=None, description="a virtual environment's python with llmcompressor")


class SlurmSettings(Strict):
    """The site's Slurm: fine-tunes handed to it with `--slurm`, its queue on the Fleet screen."""

    enabled: bool = False
    conf: Path | None = Field(default=None, description="SLURM_CONF for the client commands (default: Slurm's own)")
    bin_dir: Path | None = Field(default=None, description="where sbatch, squeue, ... are (default: PATH)")
    partition: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]+$")
    account: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]+$")
    qos: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]+$")
    gpu_request: Literal["gres", "gpus"] = Field(default="gres", description="--gres=gpu:N or --gpus=N")
    gpu_memory_gib: float | None = Field(default=None, gt=0, description="per GPU, to check a job's VRAM estimate")
    signal_before_s: int = Field(default=300, ge=10, le=86400, description="checkpoint signal before the time limit")


class FleetConfig(Strict):
    refresh_s: float = Field(default=1.0, ge=0.2, le=60.0)
    history_every_s: float = Field(default=5.0, ge=1.0, le=3600.0)
    adapter_roots: list[Path] = Field(default_factory=list)
    read_only: bool = False
    node: list[NodeConfig] = Field(default_factory=list)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)


def load_fleet_config(path: Path | str | None, required: bool = False) -> FleetConfig:
    """The fleet config; a missing default file is an empty fleet (just this host)."""
    from store.paths import default_fleet_config

    p = Path(path) if path else default_fleet_config()
    if not p.exists() and not required and path is None:
        return FleetConfig()
    return load_toml_model(p, FleetConfig)


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


def named_tomls(roots: list[Path]) -> dict[str, Path]:
    """`NAME.toml` files in the folders, by name; the first folder that has a name wins."""
    found: dict[str, Path] = {}
    for root in roots:
        if root.is_dir():
            for p in sorted(root.glob("*.toml")):
                found.setdefault(p.stem, p)
    return found


def toml_by_name(kind: str, name: object, roots: list[Path]) -> Path:
    """A config by its name in this host's own folders: never a path, so a name from the network cannot
    reach a file the host's operator did not put there."""
    import re

    found = named_tomls(roots)
    if isinstance(name, str) and re.match(NAME_PATTERN, name) and name in found:
        return found[name]
    known = ", ".join(sorted(found)) or f"none (folders: {', '.join(str(r) for r in roots)})"
    raise ValueError(f"no {kind} named {name!r} on this host; known: {known}")
