"""Where fleetdeck keeps its files (XDG through platformdirs), and the overrides."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "fleetdeck"


def data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP))


def config_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP))


def state_dir() -> Path:
    """Logs and progress files of managed processes."""
    return Path(platformdirs.user_state_dir(APP))


def default_store_path() -> Path:
    env = os.environ.get("FLEETDECK_STORE")
    return Path(env) if env else data_dir() / "fleetdeck.db"


def default_fleet_config() -> Path:
    env = os.environ.get("FLEETDECK_CONFIG")
    return Path(env) if env else config_dir() / "fleet.toml"


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
