"""`fleetdeck models ls [--node N] [--json]`: the models a node holds where its vLLM finds them offline
(engine/kvfit/local_models.py), read on that node by its agent."""

from __future__ import annotations

import argparse
import json
from typing import Any

from fleetdeck.tables import print_table


def register(sub: Any) -> None:
    p = sub.add_parser("models", parents=[sub.common], help="models on disk: the Hugging Face cache and [models] roots")
    models = p.add_subparsers(dest="models_command", metavar="COMMAND", required=True, parser_class=type(p))
    ls = models.add_parser("ls", parents=[sub.common], help="name or path, architecture, dtype or quantization, size, context")
    ls.add_argument("--node", help="a node of the fleet config (its agent reads its own disks)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=run_ls)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def run_ls(args: argparse.Namespace) -> int:
    from engine.kvfit.local_models import hub_cache_dir, list_local
    from fleetdeck.cmdutil import err, fleet_config_of
    from store.config_files import ConfigError

    try:
        config = fleet_config_of(args)
    except ConfigError as exc:
        return err(str(exc))
    if args.node:
        from fleetdeck.node_cli import node_errors, ops_of

        try:
            with ops_of(args) as ops:
                found = ops.models()
        except node_errors() as exc:
            return err(str(exc))
        where = args.node
    else:
        found = list_local(list(config.models.roots))
        where = f"this host (Hugging Face cache {hub_cache_dir()}; roots: {', '.join(map(str, config.models.roots)) or 'none'})"
    if args.json:
        print(json.dumps([m.to_json() for m in found], indent=2))
        return 0
    if not found:
        print(f"no models on {where}")
        return 0
    print_table(["model", "architecture", "dtype / quant", "size", "context", "path"],
                [[m.name, m.architecture or "-", m.quantization or m.dtype or "-", _size(m.size_bytes),
                  f"{m.context_limit:,}" if m.context_limit else "-", m.error and f"unreadable: {m.error}" or m.path]
                 for m in found], right={"size", "context"})
    return 0
