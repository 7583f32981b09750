"""`fleetdeck nodes ls` (each node's fleetdeck and protocol, and how to upgrade one that does not match) and
`fleetdeck nodes install NODE [--bundle DIR]` (engine/bundle/push.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fleetdeck.mutating import mutating
from fleetdeck.tables import print_table


def _default_bundle() -> Path:
    from store.paths import data_dir

    return data_dir() / "bundle"


def register(sub: Any) -> None:
    p = sub.add_parser("nodes", parents=[sub.common], help="the fleet's nodes: versions, install and upgrade over SSH")
    nodes = p.add_subparsers(dest="nodes_command", metavar="COMMAND", required=True, parser_class=type(p))
    ls = nodes.add_parser("ls", parents=[sub.common], help="each node's fleetdeck version and agent protocol")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=run_ls)
    inst = nodes.add_parser("install", parents=[sub.common],
                            help="install or upgrade fleetdeck on a node from an offline bundle, over SSH",
                            description="Copies the bundle to the node over SSH (as the fleet config reaches it), "
                                        "installs it in a virtual environment with the node's own Python, records "
                                        "the agent's place in the fleet config and checks that it answers. The same "
                                        "bundle again changes nothing; a newer one upgrades, keeping the node's "
                                        "config, profiles, store and running servers.")
    inst.add_argument("node", help="a node of the fleet config")
    inst.add_argument("--bundle", type=Path, metavar="DIR", default=None,
                      help="the bundle folder (`fleetdeck bundle --out DIR`; default: the data folder's bundle/)")
    inst.add_argument("--json", action="store_true")
    inst.set_defaults(handler=run_install)


def _config_path(args: argparse.Namespace) -> Path:
    from store.paths import default_fleet_config

    return Path(args.config) if args.config else default_fleet_config()


def run_ls(args: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from engine.bundle.push import probe
    from fleet.protocol import PROTOCOL_VERSION
    from fleetdeck import __version__
    from fleetdeck.cmdutil import err, fleet_config_of
    from store.config_files import ConfigError

    try:
        config = fleet_config_of(args)
    except ConfigError as exc:
        return err(str(exc))
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(config.node)))) as pool:
        links = list(pool.map(probe, config.node))
    rows: list[dict[str, Any]] = []
    for node, link in zip(config.node, links):
        upgrade = f"fleetdeck nodes install {node.name} --bundle DIR"
        if link.status == "incompatible":
            note = f"INCOMPATIBLE: upgrade with `{upgrade}`"
        elif link.status == "connected" and link.agent_version != __version__:
            note = f"differs from this dashboard's {__version__}: `{upgrade}`"
        elif link.status != "connected":
            note = f"{link.error or link.status}; to bootstrap: `{upgrade}`"
        else:
            note = ""
        rows.append({"node": node.name, "ssh": node.ssh, "state": link.status, "fleetdeck": link.agent_version,
                     "protocol": link.agent_protocol, "agent_command": list(node.agent_command), "note": note})
    if args.json:
        print(json.dumps({"dashboard": {"fleetdeck": __version__, "protocol": PROTOCOL_VERSION}, "nodes": rows},
                         indent=2))
        return 0
    if not rows:
        print("no nodes in the fleet config (add [[node]] tables: name, ssh)")
        return 0
    print(f"this dashboard: fleetdeck {__version__}, protocol v{PROTOCOL_VERSION}")
    print_table(["node", "ssh", "state", "fleetdeck", "protocol", "note"],
                [[r["node"], r["ssh"], r["state"].upper() if r["state"] == "incompatible" else r["state"],
                  r["fleetdeck"] or "-", f"v{r['protocol']}" if r["protocol"] is not None else "-", r["note"]]
                 for r in rows])
    return 0


@mutating("node.install", lambda a: a.node)
def run_install(args: argparse.Namespace) -> int:
    from engine.bundle.push import InstallFailed, InstallRefused, install_on_node
    from fleetdeck.cmdutil import err, fleet_config_of
    from store.config_files import ConfigError

    try:
        config = fleet_config_of(args)
    except ConfigError as exc:
        return err(str(exc))
    bundle = (args.bundle or _default_bundle()).expanduser()
    if not (bundle / "manifest.json").is_file():
        return err(f"no bundle at {bundle} (make one with `fleetdeck bundle --out DIR`, then --bundle DIR)")
    try:
        outcome = install_on_node(config, _config_path(args), args.node, bundle)
    except InstallRefused as exc:
        return err(f"nodes install: refused: {exc}")
    except InstallFailed as exc:
        return err(f"nodes install: {exc}", code=1)
    if args.json:
        print(json.dumps(outcome.to_json(), indent=2))
        return 0
    if outcome.status == "already":
        print(f"{outcome.node}: already at {outcome.version}; nothing changed")
        return 0
    verb = f"upgraded {outcome.previous} -> {outcome.version}" if outcome.status == "upgraded" else f"installed {outcome.version}"
    print(f"{outcome.node}: {verb}; its agent answers as fleetdeck {outcome.version}")
    if outcome.config_changed:
        print(f"agent_command recorded in {_config_path(args)}: {' '.join(outcome.agent_command)}")
    return 0
