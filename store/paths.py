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
