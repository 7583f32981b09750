"""The dashboard's lifetime (a mixin of FleetDeckApp): what it started for itself (the demo's backend) ends
with it, once, whatever asks first: q, SIGHUP or SIGTERM (caught by fleetdeck/dashboard.py), or a terminal
that hangs up without a signal. The ending never depends on the app's own loop, which a dead terminal can stall.
"""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from tui.app import AppOptions


class Lifetime:
    """Ending what the dashboard started for itself. FleetDeckApp sets the state in its __init__."""

    options: AppOptions
    poller: Any  # fleet.poller.FleetPoller: its node sources
    _demo_proc: Any
    _ending: bool
    _ending_lock: threading.Lock
    _ender: threading.Thread | None
    _loop_ref: Any
    _exit_asked: bool
    _exit_thread_started: bool

    if TYPE_CHECKING:
        def exit(self, result: Any = None, return_code: int = 0, message: Any = None) -> None: ...

    # -- lifetime -------------------------------------------------------------------------------
    # The ending runs in a thread of its own, once, whatever asks for it first: a signal, the terminal
    # watch, or `fleetdeck` after the app returns (which waits for it). It never depends on the app's
    # own loop or exit, which a dead terminal can stall.
    def _watch_terminal(self) -> None:
        """A stdin that hangs up without a signal (the terminal gone) ends the dashboard like SIGHUP.
        SIGHUP and SIGTERM themselves are caught by `fleetdeck` (fleetdeck/dashboard.py:_run_app), which calls
        terminal_lost()."""
        self._loop_ref = asyncio.get_running_loop()
        if self._exit_asked:
            self.exit(return_code=129)
            return
        stdin = sys.__stdin__
        if stdin is not None and os.isatty(stdin.fileno()):
            fd = stdin.fileno()

            def watch() -> None:
                poll = select.poll()
                poll.register(fd, 0)  # no events asked: only POLLHUP/POLLERR/POLLNVAL come back, no input is taken
                while not self._ending:
                    if poll.poll(500):
                        self.terminal_lost()
                        return

            threading.Thread(target=watch, name="terminal-watch", daemon=True).start()

    def terminal_lost(self) -> None:
        """The terminal is gone (SIGHUP, a hung-up stdin) or the process was asked to end (SIGTERM): end
        the helpers, then the app; safe from a signal handler or any thread. Should the app's exit hang on
        a dead terminal, the process ends once the helpers are gone."""
        ender = self.begin_ending()

        def then_exit() -> None:
            if ender is not None:
                ender.join()
            loop = self._loop_ref
            if loop is None:
                self._exit_asked = True  # not mounted yet: it exits as it mounts
            else:
                try:
                    loop.call_soon_threadsafe(lambda: self.exit(return_code=129))
                except RuntimeError:  # the loop has already closed: the app is on its way out
                    pass
            threading.Event().wait(10.0)
            os._exit(129)

        if not self._exit_thread_started:
            self._exit_thread_started = True
            threading.Thread(target=then_exit, name="hangup-exit", daemon=True).start()

    def begin_ending(self) -> threading.Thread | None:
        """Start ending what this dashboard started for itself (once; later calls return the same
        thread); no helper starts after this."""
        with self._ending_lock:
            if self._ending:
                return self._ender
            self._ending = True
            if self.options.end_helpers is None:
                self._close_sources()
                return None
            end_helpers = self.options.end_helpers

            def end() -> None:
                self._close_sources()
                end_helpers()

            # Not a daemon: the interpreter waits for it, so an exit cannot cut the ending short.
            self._ender = threading.Thread(target=end, name="end-helpers")
            self._ender.start()
            return self._ender

    def _close_sources(self) -> None:
        """Stop the node sources first: a remote node's connection loop would otherwise start its agent
        again while the helpers end (the demo's flaky sim-remote-04 reconnects every few seconds), and an
        app whose loop a dead terminal stalls never reaches on_unmount, where they are closed otherwise."""
        poller = getattr(self, "poller", None)  # not made yet when the ending comes before the app mounts
        if poller is not None:
            poller.close()

    def end_helpers(self) -> None:
        """End what this dashboard started for itself, and wait until it has ended."""
        ender = self.begin_ending()
        if ender is not None:
            ender.join()

    def _start_demo_backend(self, store_path: Path) -> None:
        """`fleetdeck demo`: simulated servers, a fine-tune, simulated SLM/frontier upstreams and the real
        proxy, in a process group of their own (no terminal signal reaches them: the dashboard ends them,
        by the pid and create time recorded in the demo's helper record; and the backend ends itself if
        the dashboard is gone)."""
        home = self.options.demo_home
        assert home is not None  # only started for `fleetdeck demo`, which gives its folder
        home.backend.mkdir(parents=True, exist_ok=True)
        me = psutil.Process(os.getpid())
        with self._ending_lock:
            if self._ending:
                return  # the dashboard is already going: nothing new starts
            with open(home.backend / "demo-backend.log", "ab") as log:
                self._demo_proc = subprocess.Popen(
                    [sys.executable, "-m", "fleetdeck", "demo-backend", "--store", str(store_path), "--dir", str(home.root),
                     "--owner", f"{me.pid}:{me.create_time()}"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                )
            home.helpers.add(self._demo_proc.pid, "demo backend", group=True)
