"""The fleet config (fleet.toml): nodes, adapter roots, audit, models and Slurm, validated by
store/config_files.py's loader like every other config file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from store.config_files import HomePath, Strict, load_toml_model


class NodeConfig(Strict):
    # A node's name is a part of ids and GPU fields (`@gpu-02:q-1`, `gpu-02/3`): a ":", "/", "@" or space in it
    # would split there, and its records could be neither shown nor stopped by their ids.
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="a node name: letters, digits, '.', '_' and '-'")
    # ssh reads an argument that starts with "-" as an option (-oProxyCommand=... runs a command).
    ssh: str = Field(min_length=1, pattern=r"^[^-\s][^\s]*$",
                     description="an SSH destination: host, user@host or a ~/.ssh/config alias")
    ssh_options: list[str] = Field(default_factory=list)
    agent_command: list[str] = Field(default_factory=list, description="default: fleetdeck agent --stdio")
    hello_timeout_s: float = Field(default=20.0, gt=0, le=3600,
                                   description="how long SSH and the agent's start may take before its hello "
                                               "(raise it for a node that is slow to start Python)")


class AuditSettings(Strict):
    syslog: bool = Field(default=False, description="also send each audit record to the system log (RFC 5424)")
    syslog_socket: Path = Field(default=Path("/dev/log"), description="the local syslog/journald socket")
    retention_days: float = Field(default=6 * 365, ge=1, le=100 * 365, description="HIPAA: six years")
    key_file: HomePath | None = Field(default=None, description="the audit chain's HMAC key; its checkpoints go "
                                      "beside it (default: the XDG state folder's fleetdeck/audit/audit.key)")


class ModelSettings(Strict):
    """Where merged and quantized models go, and the Python that runs llm-compressor."""

    root: HomePath | None = Field(default=None, description="default: the data folder's models/")
    quantize_python: HomePath | None = Field(default=None, description="a virtual environment's python with llmcompressor")
    # Folders of models, read as vLLM would find them: ORG/NAME or NAME folders holding a config.json,
    # or a Hugging Face cache layout (models--ORG--NAME). Searched after the hub cache.
    roots: list[HomePath] = Field(default_factory=list, description="folders holding model folders")


class SlurmSettings(Strict):
    """The site's Slurm: fine-tunes handed to it with `--slurm`, its queue on the Fleet screen."""

    enabled: bool = False
    conf: HomePath | None = Field(default=None, description="SLURM_CONF for the client commands (default: Slurm's own)")
    bin_dir: HomePath | None = Field(default=None, description="where sbatch, squeue, ... are (default: PATH)")
    partition: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]+$")
    account: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]+$")
    qos: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]+$")
    gpu_request: Literal["gres", "gpus"] = Field(default="gres", description="--gres=gpu:N or --gpus=N")
    gpu_memory_gib: float | None = Field(default=None, gt=0, description="per GPU, to check a job's VRAM estimate")
    signal_before_s: int = Field(default=300, ge=10, le=86400, description="checkpoint signal before the time limit")


class FleetConfig(Strict):
    refresh_s: float = Field(default=1.0, ge=0.2, le=60.0)
    history_every_s: float = Field(default=5.0, ge=1.0, le=3600.0)
    adapter_roots: list[HomePath] = Field(default_factory=list)
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


def set_agent_command(path: Path, node: str, command: list[str]) -> None:
    """Rewrite one [[node]]'s agent_command in place and atomically (tomlkit: the operator's comments,
    order and layout stay); the result must load, or nothing is written. Callers audit."""
    import os

    import tomlkit

    from store.config_files import parse_toml_model

    doc = tomlkit.parse(path.read_text(encoding="utf-8"))
    entry = next((n for n in doc.get("node", []) if n.get("name") == node), None)
    if entry is None:
        raise KeyError(f"no [[node]] named {node!r} in {path}")
    entry["agent_command"] = command
    text = tomlkit.dumps(doc)
    parse_toml_model(path, text, FleetConfig)  # never write a config the dashboard would refuse
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        os.chmod(tmp, path.stat().st_mode & 0o777)
    except OSError:
        pass
    tmp.replace(path)
