"""`fleetdeck slurm`: the cluster as Slurm sees it (partitions, nodes with allocated GPUs, the queue)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fleetdeck.node_cli import node_errors, ops_of


def register(sub: Any) -> None:
    p = sub.add_parser("slurm", parents=[sub.common], help="the Slurm cluster: partitions, nodes and GPUs, queue")
    p.add_argument("--json", action="store_true")
    p.add_argument("--node", help="ask this node of the fleet config (a login node) for its Slurm's view")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from engine.slurm import client as slurm
    from fleetdeck.cmdutil import fleet_config_of
    from store.config_files import ConfigError

    if args.node:  # a login node's Slurm, as its agent reads it
        try:
            with ops_of(args) as ops:
                view = ops.slurm_view().to_json()
        except node_errors() as exc:
            print(f"fleetdeck slurm: {exc}", file=sys.stderr)
            return 2
        return _show(args, view)
    try:
        config = fleet_config_of(args)
    except ConfigError as exc:
        print(f"fleetdeck slurm: {exc}", file=sys.stderr)
        return 2
    if not config.slurm.enabled:
        print("fleetdeck slurm: Slurm is not configured: set [slurm] enabled = true in the fleet config", file=sys.stderr)
        return 2
    return _show(args, slurm.cluster(config.slurm).to_json())


def _show(args: argparse.Namespace, view: dict[str, Any]) -> int:
    from engine.slurm import client as slurm

    if args.json:
        print(json.dumps(view, indent=2))
    else:
        from fleetdeck.tables import print_renderable

        print_renderable(slurm.view_renderable(view))
    return 0 if view["error"] is None else 2
