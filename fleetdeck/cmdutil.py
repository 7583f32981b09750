"""What every subcommand module needs from its arguments: the store, the fleet config, the router config and a
one-line error."""

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


def store_path_of(args: argparse.Namespace) -> Path:
    from store.paths import default_store_path

    return Path(args.store) if getattr(args, "store", None) else default_store_path()


def store_of(args: argparse.Namespace, create: bool = True) -> Store:
    """The store `--store` (or FLEETDECK_STORE, or the default) names. A command that only reads passes
    create=False: a mistyped path is then "no store at PATH", never a new empty store that reads as "nothing
    there" (or an audit trail that verifies as intact). A read-only run (`--read-only`, `read_only = true`)
    opens it read-only whatever the command: nothing of the file is created, migrated or changed (a refusal's
    audit record goes through the audit trail's own connection)."""
    from engine.audit import trail as audit
    from store.db import StoreError, open_store

    path = store_path_of(args)
    if audit.is_read_only():
        if not path.exists():
            raise StoreError(f"no store at {path}: a read-only run does not create one (check --store or "
                             "FLEETDECK_STORE; a command that starts work, without --read-only, creates it)")
        return open_store(path, read_only=True)
    if not create and not path.exists():
        raise StoreError(f"no store at {path} (check --store or FLEETDECK_STORE; commands that start work create it)")
    return open_store(path)


def listing_store_of(args: argparse.Namespace) -> Store | None:
    """The store for a command that lists what is recorded (serve ls, finetune ls, adapters ls/show): None when the
    default store does not exist yet (a fresh install: nothing recorded, nothing created); a store named by
    --store or FLEETDECK_STORE must exist ("no store at PATH")."""
    import os

    explicit = bool(getattr(args, "store", None) or os.environ.get("FLEETDECK_STORE"))
    if not explicit and not store_path_of(args).exists():
        return None
    return store_of(args, create=False)


def fleet_config_of(args: argparse.Namespace) -> FleetConfig:
    """The fleet config `--config` names (which must then exist), else the default one (or none)."""
    from fleet.config import load_fleet_config

    return load_fleet_config(args.config, required=args.config is not None)


def add_fleet_config_option(p: argparse.ArgumentParser) -> None:
    """`--config` after a subcommand that also reads a router config: the fleet config, as everywhere (the old
    router-config meaning still works, with a deprecation notice: route_router_config)."""
    p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                   help="the fleet config, as for every command (a router config here is deprecated: --router-config)")


# The top-level tables of a router config; a fleet config has none of them (fleet.config.FleetConfig).
_ROUTER_KEYS = frozenset({"task", "pricing", "proxy"})


def is_router_config(path: str | Path) -> bool:
    """Whether a TOML file is a router config (by its content: [[task]], [pricing] or [proxy])."""
    import tomllib

    from store.config_files import MAX_CONFIG_BYTES
    from store.files import read_regular

    try:  # a regular file only: a pipe named as --config would block here, before the loader could name it
        data = tomllib.loads(read_regular(Path(path).expanduser(), MAX_CONFIG_BYTES).decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError, ValueError):
        return False  # the fleet config's loader names what is wrong with it
    return bool(_ROUTER_KEYS & data.keys())


def route_router_config(args: argparse.Namespace, who: str) -> int | None:
    """`--config` is the fleet config for every command. A router config given as `--config` (the old spelling of
    report/proxy/calibrate/whatif) becomes `--router-config`, with a one-line deprecation notice, where the command
    reads one, and is refused where it does not. Runs before the audit session is opened, so the session reads
    the node's real fleet config (its read_only, its audit settings), never a router config in its place.
    Returns an exit code when the command must not run."""
    if args.config is None or not is_router_config(args.config):
        return None
    if not hasattr(args, "router_config"):
        return err(f"{args.config} is a router config; --config takes the fleet config (fleet.toml)", who=who)
    if args.router_config is not None:
        return err(f"{args.config} is a router config, and --router-config names one already; --config takes "
                   "the fleet config", who=who)
    print(f"{who}: deprecated: --config {args.config} is a router config; use --router-config "
          "(--config is the fleet config for every command)", file=sys.stderr)
    args.router_config, args.config = args.config, None
    return None


def check_fleet_config(args: argparse.Namespace, who: str) -> int | None:
    """The fleet config the command reads (the one `--config` names, which must exist, or the default one when
    present) must validate: a missing file, bad TOML or a mistyped key is one line and exit 2."""
    from fleet.config import load_fleet_config
    from store.config_files import ConfigError

    try:
        load_fleet_config(args.config, required=args.config is not None)
    except ConfigError as exc:
        return err(one_line(exc), who=who)
    return None


def one_line(exc: BaseException | str) -> str:
    """A config error's lines (file, then one per key) joined into the one line a command prints."""
    return "; ".join(part.strip() for part in str(exc).splitlines() if part.strip()).replace(
        "invalid configuration;", "invalid configuration:")
