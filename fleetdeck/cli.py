"""The `fleetdeck` command. Each subcommand imports what it needs when it runs, so `fleetdeck gpus`
and `fleetdeck proxy` never load Textual and the dashboard never loads litellm.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Sequence

from fleetdeck import __version__
from fleetdeck.argtypes import positive_seconds

if TYPE_CHECKING:
    from fleet.source import NodeSource

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2), not a screenful."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"fleetdeck: {message}", file=sys.stderr)
    return code


def _store_path(args: argparse.Namespace) -> Path:
    from store.paths import default_store_path

    return Path(args.store) if args.store else default_store_path()


def build_parser() -> argparse.ArgumentParser:
    # The global options are accepted before or after the subcommand (`fleetdeck demo --store X`).
    common = _Parser(add_help=False)
    common.add_argument("--store", metavar="PATH", default=argparse.SUPPRESS,
                        help="SQLite store (default: $FLEETDECK_STORE or the XDG data dir)")
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="fleet config TOML (default: $FLEETDECK_CONFIG or the XDG config dir)")
    common.add_argument("--refresh", type=positive_seconds, metavar="SECONDS", default=argparse.SUPPRESS,
                        help="poll interval of the dashboard")
    common.add_argument("--read-only", action="store_true", default=argparse.SUPPRESS,
                        help="watch only: no launches, stops or swaps")
    parser = _Parser(
        prog="fleetdeck",
        description="Terminal dashboard for on-prem GPU fleets serving small fine-tuned language models.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"fleetdeck {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.common = common  # type: ignore[attr-defined]

    demo = sub.add_parser("demo", parents=[common], help="open the dashboard on the built-in simulated fleet")
    demo.add_argument("--reset", action="store_true",
                      help="end what the demo started and clear its folder (store, profiles, logs), then exit")

    gpus = sub.add_parser("gpus", parents=[common], help="one-shot snapshot of this host's GPUs (like nvidia-smi / gpustat)")
    gpus.add_argument("--json", action="store_true", help="print JSON")
    gpus.add_argument("--simulated", action="store_true", help="read the simulated demo fleet instead of NVML")

    agent = sub.add_parser("agent", parents=[common], help="the node agent the dashboard runs over SSH (JSON lines)")
    agent.add_argument("--stdio", action="store_true", required=True, help="speak on stdin/stdout")
    agent.add_argument("--simulated", action="store_true", help="serve a simulated node instead of NVML")
    agent.add_argument("--node-name", help="the name to report (default: the hostname)")
    agent.add_argument("--exit-after", type=positive_seconds, metavar="SECONDS", help=argparse.SUPPRESS)  # demo: a node that drops

    # Started by `fleetdeck demo`; no help= so it is not listed (argparse shows help=SUPPRESS as "==SUPPRESS==").
    backend = sub.add_parser("demo-backend")
    backend.add_argument("--store", required=True)
    backend.add_argument("--dir", required=True)
    backend.add_argument("--rate", type=float, default=4.0)
    backend.add_argument("--owner", help="PID:CREATE_TIME of the dashboard; the backend ends when it is gone")

    from fleetdeck import commands

    for register in commands.REGISTRY:
        register(sub)  # type: ignore[arg-type]
    return parser


# Options whose values are signed percentages: `--frontier-price-change -50%` must not read as an option.
SIGNED_OPTIONS = ("--frontier-price-change", "--volume-change")


def _join_signed_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in SIGNED_OPTIONS and i + 1 < len(argv) and argv[i + 1][:1] in "-+":
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    # Everything fleetdeck and the processes it starts write (stores, journals, logs, job folders,
    # adapters) is for this user only; group/other get nothing.
    os.umask(0o077)
    parser = build_parser()
    args = parser.parse_args(_join_signed_values(list(sys.argv[1:] if argv is None else argv)))
    for name, default in (("store", None), ("config", None), ("refresh", None), ("read_only", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    from store.config_files import ConfigError
    from store.db import StoreError, corrupt_message, is_corrupt

    from engine.audit import trail as audit
    from fleetdeck.cmdutil import route_router_config

    code = route_router_config(args, f"fleetdeck {args.command or ''}".strip())
    if code is not None:
        return code
    if getattr(args, "config", None):
        # The fleet config named here is this host's for everything the command reads, not only what reads
        # args.config: a launch looks up `[models] roots` through the default path (an agent started with
        # --config used to serve from the default file's roots while listing its own).
        os.environ["FLEETDECK_CONFIG"] = str(Path(args.config).absolute())
    # Errors whose message is written for the operator (a config that does not validate, a store that
    # is not ours): one line and exit 2, wherever in a command they surface, never a traceback.
    try:
        with audit_session(args, "demo" if args.command == "demo-backend" else "cli"):
            return _dispatch(args)
    except (ConfigError, StoreError) as exc:
        from fleetdeck.cmdutil import one_line

        return fail(one_line(exc))
    except audit.ReadOnlyError as exc:
        return fail(str(exc))
    except sqlite3.DatabaseError as exc:
        # A damaged page can surface in any query of any command, long after the store opened: one line
        # that says which file and what to do, not SQLite's traceback.
        if not is_corrupt(exc):
            raise
        return fail(corrupt_message(_store_path(args), exc))
    except BrokenPipeError:
        # `fleetdeck report --json | head`: the reader has what it wanted; no traceback for it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        # A path the system refuses (a name too long, a folder where a file goes, no permission) can surface
        # wherever a command touches one it was given: one line naming the file and the system's reason.
        return fail(os_error_line(exc))


def os_error_line(exc: OSError) -> str:
    name = exc.filename if isinstance(exc.filename, str) else None
    shown = name if name is None or len(name) <= 120 else name[:60] + "…" + name[-40:]
    what = exc.strerror or type(exc).__name__
    return f"{shown!r}: {what}" if shown else f"{what}"


def audit_session(args: argparse.Namespace, source: str, read_only: bool | None = None) -> Any:
    """Every change this command makes is audited in its store; `--read-only` (or the fleet config's
    `read_only`) refuses them all, recorded."""
    from engine.audit import trail as audit
    from fleet.config import load_fleet_config
    from store.config_files import ConfigError

    try:
        config = load_fleet_config(args.config)
    except ConfigError:
        config = None  # the command that needs the config says what is wrong with it
    if read_only is None:
        read_only = bool(args.read_only or (config is not None and config.read_only))
    settings = config.audit if config is not None else None
    syslog = settings.syslog_socket if settings is not None and settings.syslog else None
    store = Path(args.store) if args.store else _store_path(args)
    return audit.session(store, source, read_only=read_only, syslog_socket=syslog,
                         node=getattr(args, "node_name", None), key_file=settings.key_file if settings else None)


def _dispatch(args: argparse.Namespace) -> int:
    from fleetdeck.cmdutil import check_fleet_config

    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is not None:
        from fleetdeck import mutating

        inner = handler

        def checked(a: argparse.Namespace) -> int:
            # Inside the audit wrapper: a change refused for a bad config is still recorded as refused.
            code = check_fleet_config(a, f"fleetdeck {a.command}")
            return code if code is not None else inner(a)

        if hasattr(handler, "audit"):
            checked.audit = handler.audit  # type: ignore[attr-defined]
        return mutating.run(checked, args)
    if args.command not in ("demo", "demo-backend"):  # the demo runs on its own settings
        code = check_fleet_config(args, f"fleetdeck {args.command or ''}".strip())
        if code is not None:
            return code
    if args.command == "gpus":
        return cmd_gpus(args)
    # The dashboard's module loads Textual: imported only when a dashboard runs (never for `fleetdeck gpus`).
    from fleetdeck.dashboard import cmd_dashboard

    if args.command == "demo":
        return cmd_dashboard(args, demo=True)
    if args.command == "agent":
        return cmd_agent(args)
    if args.command == "demo-backend":
        from engine.router.demo import run_backend

        owner = None
        if args.owner:
            pid, _, created = args.owner.partition(":")
            owner = (int(pid), float(created))
        return run_backend(Path(args.store), Path(args.dir), args.rate, owner)
    return cmd_dashboard(args, demo=False)


def cmd_gpus(args: argparse.Namespace) -> int:
    if args.simulated:
        from fleet.simulated import demo_fleet

        snaps = [node.snapshot() for node in demo_fleet()]
    else:
        from fleet.source import snapshot_here

        snaps = [snapshot_here()]
    if args.json:
        print(json.dumps(gpus_json(snaps), indent=2))
        return 0
    print_gpus(snaps)
    return 0


def gpus_json(snaps: list[Any]) -> dict[str, Any]:
    first = snaps[0]
    ok = all(s.nvml == "ok" for s in snaps)
    doc: dict[str, Any] = {
        "host": first.node,
        "nvml": "ok" if ok else "unavailable",
        "reason": None if ok else "; ".join(f"{s.node}: {s.reason}" for s in snaps if s.nvml != "ok"),
        "driver_version": first.driver_version,
        "cuda_driver_version": first.cuda_driver_version,
        "simulated": any(s.simulated for s in snaps),
        "taken_at": first.taken_at,
        "gpus": [g.to_json() for s in snaps for g in s.gpus],
    }
    if not ok:
        doc["hosts"] = [
            {"node": s.node, "nvml": s.nvml, "reason": s.reason, "host": _asdict(s.host)} for s in snaps
        ]
    return doc


def _asdict(obj: object) -> dict[str, Any]:
    from dataclasses import asdict

    fields: dict[str, Any] = asdict(obj)  # type: ignore[call-overload]
    return fields


def print_gpus(snaps: list[Any]) -> None:
    from fleetdeck.tables import print_table
    from tui.format import gib, local_time

    for s in snaps:
        head = f"{s.node}  {local_time(s.taken_at, '%Y-%m-%d %H:%M:%S')}"
        if s.simulated:
            head += "  SIMULATED"
        if s.nvml != "ok":
            print(f"{head}\n  NVML unavailable: {s.reason}")
            h = s.host
            if h.memory_total_bytes:
                print(f"  CPU {h.cpu_pct or 0:.0f}% of {h.cpu_count} cores · memory "
                      f"{gib(h.memory_used_bytes)}/{gib(h.memory_total_bytes)} GiB")
            continue
        print(f"{head}  driver {s.driver_version}")
        rows = []
        for g in s.gpus:
            if g.lost:
                rows.append([g.index, g.name, "LOST", "", "", "", g.error or ""])
                continue
            rows.append([
                g.index, g.name, "n/a" if g.temperature_c is None else f"{g.temperature_c:.0f}°C",
                "n/a" if g.utilization_gpu_pct is None else f"{g.utilization_gpu_pct:.0f}%",
                f"{gib(g.memory_used_bytes)}/{gib(g.memory_total_bytes)} GiB",
                "n/a" if g.power_draw_w is None else f"{g.power_draw_w:.0f} W",
                " ".join(f"{p.kind}:{p.model or p.pid}({gib(p.gpu_memory_bytes)}G)" for p in g.processes),
            ])
        print_table(["GPU", "name", "temp", "util", "memory", "power", "work"], rows,
                    right={"GPU", "temp", "util", "memory", "power"}, indent=2)


def cmd_agent(args: argparse.Namespace) -> int:
    import threading

    from engine.nodes.agent import Agent
    from fleetdeck.cmdutil import fleet_config_of
    from store.config_files import ConfigError

    source: NodeSource
    if args.simulated:
        from fleet.simulated import demo_fleet

        live = None
        if args.store:  # a simulated node with a store of its own holds what that store runs (the demo's node)
            from engine.demo.home import DemoProcesses

            live = DemoProcesses(Path(args.store), one_node=True)
        source = demo_fleet(live=live)[0]
        if args.node_name:
            source.name = args.node_name
    else:
        from fleet.source import LocalNode

        source = LocalNode(args.node_name)
    try:
        config = fleet_config_of(args)
    except ConfigError as exc:
        return fail(str(exc))
    if args.exit_after:
        # A daemon: the agent still ends at EOF on stdin (its dashboard gone, even by kill -9) rather than
        # linger until the timer fires (up to --exit-after seconds of a demo left behind).
        drop = threading.Timer(args.exit_after, lambda: os._exit(0))
        drop.daemon = True
        drop.start()
    read_only = bool(args.read_only or config.read_only)
    agent = Agent(source, Path(args.store) if args.store else None, list(config.adapter_roots), __version__,
                  read_only=read_only, slurm=config.slurm, model_roots=list(config.models.roots))
    from engine.audit import trail as audit

    with audit.session(Path(args.store) if args.store else _store_path(args), "agent", read_only=read_only,
                       node=source.name if hasattr(source, "name") else None, key_file=config.audit.key_file,
                       syslog_socket=config.audit.syslog_socket if config.audit.syslog else None):
        return agent.serve(sys.stdin, sys.stdout)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
