"""`fleetdeck kill PID`: end a process that holds a GPU of this host (the Fleet screen's ctrl+k).

The same engine function as the screen: the pid must hold a GPU now (NVML is asked again), SIGTERM,
then SIGKILL after the grace period; audited, refused read-only. A node over SSH is not reached: its
agent has no op to signal processes, so the kill is run on that node.
"""

from __future__ import annotations

import argparse
from typing import Any

from fleetdeck.argtypes import number
from fleetdeck.cmdutil import err
from fleetdeck.mutating import mutating


def register(sub: Any) -> None:
    p = sub.add_parser("kill", parents=[sub.common],
                       help="end a process that holds a GPU of this host (SIGTERM, then SIGKILL; audited)")
    p.add_argument("pid", type=int, help="the process id, as `fleetdeck gpus` or the Fleet screen shows it")
    p.add_argument("--grace", type=number(0.0, 600.0), default=5.0, metavar="SECONDS",
                   help="seconds between SIGTERM and SIGKILL (default 5)")
    p.add_argument("--node", help="a node of the fleet config: refused there (its agent cannot signal processes), "
                   "with what to do instead")
    p.set_defaults(handler=run_kill)


@mutating("process.kill", lambda a: f"pid {a.pid}")
def run_kill(args: argparse.Namespace) -> int:
    import socket

    from engine.nodes.processes import KillRequest
    from fleet.procs import describe_process
    from fleetdeck.node_cli import node_errors, ops_of

    try:
        with ops_of(args) as ops:
            if args.node:
                req = KillRequest(node=args.node, pid=args.pid, gpu="", command="")
            else:
                seen = describe_process(args.pid, None)
                req = KillRequest(node=socket.gethostname(), pid=args.pid, gpu="", command=seen.command, user=seen.user)
            print(ops.kill_process(req, grace_s=args.grace))
    except node_errors() as exc:
        return err(str(exc), who="fleetdeck kill")
    return 0
