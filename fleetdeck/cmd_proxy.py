"""`fleetdeck proxy`: the OpenAI-compatible routing proxy, headless (systemd) or managed by the dashboard."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fleetdeck.cmdutil import add_fleet_config_option, one_line


def register(sub: Any) -> None:
    p = sub.add_parser("proxy", help="run the OpenAI-compatible routing proxy (SLM first, escalate on low confidence)")
    p.add_argument("--router-config", dest="router_config", metavar="FILE",
                   help="router config TOML (default: $FLEETDECK_ROUTER_CONFIG or ~/.config/fleetdeck/router.toml)")
    add_fleet_config_option(p)
    p.add_argument("--store", metavar="PATH", default=argparse.SUPPRESS, help="SQLite store for the ledger")
    p.add_argument("--host", help="address to listen on (default from the config: 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default from the config: 4000)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from engine.router.config import load_router_config
    from engine.router.server import ProxyStartError, serve
    from store.config_files import ConfigError
    from store.db import StoreError
    from store.paths import default_router_config, default_store_path

    path = Path(args.router_config) if args.router_config else default_router_config()
    try:
        config = load_router_config(path)
    except ConfigError as exc:
        print(f"fleetdeck proxy: {one_line(exc)}", file=sys.stderr)
        return 2
    if args.port is not None and not 1 <= args.port <= 65535:
        print("fleetdeck proxy: --port must be 1-65535", file=sys.stderr)
        return 2
    store = Path(args.store) if args.store else default_store_path()
    try:
        serve(config, store, args.host, args.port, config_path=path)
    except (ProxyStartError, StoreError) as exc:
        print(f"fleetdeck proxy: {exc}", file=sys.stderr)
        return 2
    return 0
