"""Helper processes a dashboard starts for itself, recorded so that they end with it.

The demo's backend (which runs the simulated upstreams, the proxy and the traffic, and starts the demo's
simulated servers and job) is such a helper: it must end when the dashboard does, on `q`, SIGHUP,
SIGTERM, terminal loss or any other exit. Each helper is recorded as it starts, by pid *and* process
create time, one JSON line per helper in a file of the dashboard's own (appended, so the dashboard and
the backend can both write to it). Ending them walks that record: a pid whose create time differs is
someone else's process now and is never signalled. A dashboard killed outright (SIGKILL) cannot end
anything; the next run reads the same record and ends what is left.

Servers and jobs an operator launches are not helpers: they outlive the dashboard by design.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class Helper:
    pid: int
    create_time: float
    what: str
    group: bool  # it leads its own process group: a signal to the group reaches what it started in it

    def process(self) -> psutil.Process | None:
        """The helper's process if it still runs (the same process: pid and create time), else None."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) >= 1.0 or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None


class HelperLedger:
    """The record of one dashboard's helpers (a JSON-lines file)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def add(self, pid: int, what: str, group: bool = False) -> Helper | None:
        """Record a helper that was just started; None if it is already gone (nothing to end)."""
        try:
            helper = Helper(pid, psutil.Process(pid).create_time(), what, group)
        except psutil.Error:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(asdict(helper)) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line)  # one write of a short line: appends from two processes do not interleave
        finally:
            os.close(fd)
        return helper

    def entries(self) -> list[Helper]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                doc = json.loads(line)
                out.append(Helper(int(doc["pid"]), float(doc["create_time"]), str(doc["what"]), bool(doc["group"])))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line of a writer that was killed mid-write
        return out

    def alive(self) -> list[Helper]:
        return [h for h in self.entries() if h.process() is not None]

    def end_all(self, timeout: float = 15.0) -> list[Helper]:
        """End every recorded helper that still runs and everything it started (its process tree, taken
        before the first signal): SIGTERM first, so each ends what it runs in order, then SIGKILL what is
        left after `timeout`. The record is removed. Returns the helpers that were running."""
        running: list[tuple[Helper, psutil.Process]] = []
        for h in self.entries():
            proc = h.process()
            if proc is not None:
                running.append((h, proc))
        tree: list[psutil.Process] = []
        for h, proc in running:
            try:
                tree += proc.children(recursive=True)
            except psutil.Error:
                pass
            _signal(h, proc, signal.SIGTERM)
        _, still = psutil.wait_procs([p for _, p in running], timeout=timeout)
        for h, proc in running:
            if proc in still:
                _signal(h, proc, signal.SIGKILL)
        # Descendants that outlived their helper (a child in a session of its own): by the Process
        # objects taken above, which psutil refuses to signal once their pid belongs to another process.
        leftovers = [p for p in tree if _running(p)]
        for p in leftovers:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, still = psutil.wait_procs(leftovers, timeout=min(timeout, 5.0))
        for p in still:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(still, timeout=2.0)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        return [h for h, _ in running]


def _running(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _signal(helper: Helper, proc: psutil.Process, sig: int) -> None:
    try:
        if helper.group and os.getpgid(helper.pid) == helper.pid:
            os.killpg(helper.pid, sig)
        else:
            proc.send_signal(sig)
    except (psutil.Error, ProcessLookupError, PermissionError):
        pass

