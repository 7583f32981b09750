"""Where fleetdeck keeps its files (XDG through platformdirs), and the environment's overrides."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs
from pydantic_settings import BaseSettings, SettingsConfigDict

APP = "fleetdeck"


class EnvOverrides(BaseSettings):
    """Every FLEETDECK_* variable that overrides a default, in one place. Read afresh on each call of
    `overrides()` (a test or a wrapper script may set one between commands); an empty value is unset."""

    model_config = SettingsConfigDict(env_prefix="FLEETDECK_", env_ignore_empty=True, extra="ignore")

    store: Path | None = None  # the SQLite store
    config: Path | None = None  # the fleet config
    router_config: Path | None = None  # the routing proxy's config
    profiles: str = ""  # more vLLM profile folders, os.pathsep-separated, searched first
    specs: str = ""  # more fine-tune spec folders, os.pathsep-separated, searched first
    vllm: str | None = None  # the vLLM command line (shell words), before any profile's vllm_command

    @property
    def profile_roots(self) -> list[Path]:
        return [Path(p) for p in self.profiles.split(os.pathsep) if p]

    @property
    def spec_roots(self) -> list[Path]:
        return [Path(p) for p in self.specs.split(os.pathsep) if p]


def overrides() -> EnvOverrides:
    return EnvOverrides()


def data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP))


def config_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP))


def state_dir() -> Path:
    """Logs and progress files of managed processes."""
    return Path(platformdirs.user_state_dir(APP))


def default_store_path() -> Path:
    return overrides().store or data_dir() / "fleetdeck.db"


def default_fleet_config() -> Path:
    return overrides().config or config_dir() / "fleet.toml"


def default_router_config() -> Path:
    return overrides().router_config or config_dir() / "router.toml"


def private_dir(path: Path) -> Path:
    """A folder only this user can enter (0700), made so if it exists with wider permissions."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        if path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
            path.chmod(0o700)
    except OSError:
        pass
    return path


def make_private(path: Path) -> None:
    """An existing file of ours at 0600 (a store, its WAL, a log written before umask was set)."""
    try:
        st = path.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            path.chmod(0o600)
    except OSError:
        pass
