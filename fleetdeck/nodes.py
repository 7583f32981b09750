"""The command line's way to another node: connect through its agent, ask, print the answer."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def remote_node(config: Any, name: str) -> Any:
    """Connect to a node of the fleet config through its agent; raises AgentError if it does not answer.

    The first session decides: it ends connected, incompatible or unreachable, bounded by the node's
    hello_timeout_s (ssh's ConnectTimeout is inside it). A clock of its own here would be a second,
    shorter limit that a slow but working node (a loaded machine starting Python) could miss."""
    import time

    from fleet.remote import AgentError, RemoteNode

    node = next((n for n in config.node if n.name == name), None)
    if node is None:
        raise AgentError(f"no node {name!r} in the fleet config (nodes: {', '.join(n.name for n in config.node) or 'none'})")
    remote = RemoteNode.over_ssh(node.name, node.ssh, list(node.ssh_options), node.agent_command or None,
                                 hello_timeout_s=node.hello_timeout_s)
    safety_net = time.monotonic() + node.hello_timeout_s + 30  # only if the session's own watchdog never fires
    while remote.link.status == "connecting" and time.monotonic() < safety_net:
        time.sleep(0.1)
    if remote.link.status != "connected":
        remote.close()
        raise AgentError(f"{name}: {remote.link.error or 'no answer from its agent'}")
    return remote


def on_node(args: argparse.Namespace, op: str, payload: dict[str, Any]) -> int:
    """Ask the node's agent (which checks and audits it there); print what it answers."""
    from fleetdeck.cmdutil import fleet_config_of
    from fleet.remote import AgentError

    try:
        remote = remote_node(fleet_config_of(args), args.node)
        try:
            result = remote.request(op, {k: v for k, v in payload.items() if v is not None}, timeout=120)
        finally:
            remote.close()
    except AgentError as exc:
        print(f"fleetdeck: {exc}", file=sys.stderr)
        return 2
    print(result if isinstance(result, str) else json.dumps(result, indent=2))
    return 0
