"""`fleetdeck` and `fleetdeck demo`: the dashboard itself, on this host's fleet config or on the demo's simulated
nodes, and its lifetime (what it started for itself ends with it, whatever ends it). The command line imports
this module only to run a dashboard, so no other subcommand loads Textual.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

from engine.audit import trail as audit
from engine.demo.home import DemoBusy, DemoHome, DemoProcesses, stop_everything
from fleet.config import FleetConfig
from fleet.remote import RemoteNode
from fleet.simulated import demo_fleet
from fleet.source import LocalNode
from fleetdeck.cmdutil import err, fleet_config_of, store_path_of
from store.config_files import ConfigError
from store.db import open_store
from store.paths import default_router_config
from tui.app import AppOptions, FleetDeckApp


def remote_sources(config: Any) -> list[Any]:
    return [RemoteNode.over_ssh(n.name, n.ssh, list(n.ssh_options), n.agent_command or None,
                                read_only=config.read_only, hello_timeout_s=n.hello_timeout_s)
            for n in config.node]


def cmd_dashboard(args: argparse.Namespace, demo: bool) -> int:
    if demo and (args.read_only or audit.is_read_only()):
        # The demo is a simulation that runs by writing: its folder, its store, its servers' logs, the traffic of its
        # proxy. Read-only writes nothing on the node; so the demo does not run read-only rather than run half-way.
        home = DemoHome.default()
        return err(f"the demo does not run read-only (--read-only or read_only = true): it starts simulated servers, "
                   f"jobs and traffic that write its folder {home.root}; `fleetdeck --read-only` watches this host")
    try:
        config = fleet_config_of(args) if not demo else FleetConfig()
    except ConfigError as exc:
        return err(str(exc))
    if args.refresh:
        config = config.model_copy(update={"refresh_s": args.refresh})
    if args.read_only:
        config = config.model_copy(update={"read_only": True})
    if demo:
        return _run_demo(args, config)

    def factory() -> list[Any]:
        return [LocalNode(), *remote_sources(config)]

    return _run_app(AppOptions(sources_factory=factory, store_path=store_path_of(args), config=config,
                               router_config=default_router_config(), watch_terminal=True), config)


def _run_demo(args: argparse.Namespace, config: Any) -> int:
    """`fleetdeck demo`: the dashboard on simulated nodes, with the demo's own folder (engine/demo/home.py)."""
    home = DemoHome.default()
    if args.store:
        return err(f"the demo keeps its own store ({home.store}); --store is not for the demo "
                   "(`fleetdeck demo --reset` clears it)")
    try:
        lock = home.lock()  # held until this process ends; an earlier demo's leftovers are ours to end
    except DemoBusy as exc:
        return err(str(exc))
    try:
        if args.reset:
            ended = home.reset()
            print(f"fleetdeck: demo cleared ({home.root} removed" + (f"; ended {', '.join(ended)}" if ended else "")
                  + "). `fleetdeck demo` starts it afresh.")
            return 0
        ended = home.end_leftovers()
        notice = None
        if ended:
            notice = f"An earlier demo had left these running; they were ended: {', '.join(ended)}"
            print(f"fleetdeck: {notice}", file=sys.stderr)
        home.prepare()
        remote_store = home.root / "sim-remote-04.db"
        config = config.model_copy(update={"adapter_roots": [home.adapters]})
        live = DemoProcesses(home.store)

        def factory() -> list[Any]:
            # A fourth node behind the real agent protocol (over a pipe, not SSH) that drops every
            # 45 s and is reconnected with backoff, as a flaky remote node would be. Its own store (and,
            # through the environment, the demo's profiles and log folder), as a node has its own.
            agent = ["env", f"FLEETDECK_PROFILES={home.profiles}", f"FLEETDECK_SPECS={home.specs}", f"XDG_STATE_HOME={home.root / 'sim-remote-04'}",
                     sys.executable, "-m", "fleetdeck", "agent", "--stdio", "--simulated", "--node-name", "sim-remote-04",
                     "--exit-after", "45", "--store", str(remote_store), "--config", str(home.remote_config)]
            flaky = RemoteNode("sim-remote-04", agent, backoff_s=(3.0, 10.0))
            flaky.simulated = True
            return [*demo_fleet(live=live), flaky]

        def end_demo() -> None:
            """Everything the demo started, helpers first (the backend stops its own servers and job), then
            whatever is still live in the demo's stores (what the operator started from its dialogs)."""
            try:  # the terminal may be gone (a hangup): then there is no one to tell
                print("fleetdeck: ending the demo's backend, proxy, simulated servers and jobs…", file=sys.stderr,
                      flush=True)
            except OSError:
                pass
            home.helpers.end_all(timeout=30.0)  # the backend stops the proxy, its servers and its job first
            for path in (home.store, remote_store):
                if path.exists():
                    store = open_store(path)
                    try:
                        stop_everything(store)
                    finally:
                        store.close()

        options = AppOptions(sources_factory=factory, store_path=home.store, config=config, simulated=True,
                             router_config=home.router_config, demo_backend=True, demo_home=home,
                             folders=home.folders(), end_helpers=end_demo, watch_terminal=True, start_notice=notice)
        try:
            return _run_app(options, config)
        finally:
            live.close()
    finally:
        os.close(lock)


def on_signal(app: Any) -> Any:
    """The SIGHUP/SIGTERM handler: it hands the ending to a thread of its own and returns. A handler runs in
    the main thread between two of its bytecodes, which may be inside the ending's lock (starting the
    ending's thread, or the demo backend): taking that lock in the handler deadlocked the dashboard for
    good (a hangup followed by a SIGTERM, seen in the hangup test: the process spun until SIGKILL)."""

    def handler(signum: int, frame: Any) -> None:
        threading.Thread(target=app.terminal_lost, name=f"signal-{signum}", daemon=True).start()

    return handler


def _run_app(options: Any, config: Any) -> int:
    """Run the dashboard; whatever ends it (q, SIGHUP, SIGTERM, a lost terminal, an error), what it
    started for itself is ended before this returns (options.end_helpers, through app.end_helpers)."""
    app = FleetDeckApp(options)
    # Python-level handlers (not the event loop's: those are taken down when the loop closes, and a
    # second SIGHUP would then kill the process halfway through ending its helpers).
    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, on_signal(app))
    with audit.session(options.store_path, "tui", read_only=config.read_only, key_file=config.audit.key_file,
                       syslog_socket=config.audit.syslog_socket if config.audit.syslog else None):
        try:
            app.run()
        finally:
            app.end_helpers()
    return app.return_code or 0
