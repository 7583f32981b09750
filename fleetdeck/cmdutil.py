"""What every subcommand module needs from its arguments: the store, the fleet config, a one-line error."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet.config import FleetConfig
    from store.db import Store


def err(msg: str, code: int = 2, who: str = "fleetdeck") -> int:
    print(f"{who}: {msg}", file=sys.stderr)
    return code


def store_of(args: argparse.Namespace) -> Store:
    from store.db import open_store
    from store.paths import default_store_path

    return open_store(Path(args.store) if args.store else default_store_path())


def fleet_config_of(args: argparse.Namespace) -> FleetConfig:
    """The fleet config `--config` names (which must then exist), else the default one (or none)."""
    from fleet.config import load_fleet_config

    return load_fleet_config(args.config, required=args.config is not None)
