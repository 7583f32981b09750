"""CPU cost of one dashboard refresh with 64 simulated GPUs (8 nodes x 8), and launch-to-first-frame.

Prints figures; never part of the test run. Usage: python bench/bench_fleet.py [--refreshes N]

- poll: FleetPoller.poll() over the 64 simulated GPUs (snapshot, history rings), CPU seconds each;
- render: the Fleet screen's cell-by-cell update plus Textual's repaint, measured inside a headless app;
- nvml: our NVML collector over a fake pynvml with 8 GPUs (the cost of our code, not the driver's);
- first frame: a fresh interpreter, from process start to the first rendered fleet, headless;
- live: the app itself, headless at 200x80, polling 64 GPUs every second for 30 s: CPU % of one core
  from getrusage, against the same app not polling.
The aim: poll + render under 5% of one core at a 1 s refresh; first frame under 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def bench_poll(n: int) -> float:
    from fleet.poller import FleetPoller
    from fleet.simulated import large_fleet

    clock = [1_790_000_000.0]
    poller = FleetPoller(large_fleet(8, 8, clock=lambda: clock[0]))
    poller.poll()
    start = time.process_time()
    for _ in range(n):
        clock[0] += 1
        poller.poll()
    return (time.process_time() - start) / n


def bench_render(n: int) -> tuple[float, float]:
    from fleet.config import FleetConfig
    from fleet.simulated import large_fleet
    from tui.app import AppOptions, FleetDeckApp

    clock = [1_790_000_000.0]
    nodes = large_fleet(8, 8, clock=lambda: clock[0])
    app = FleetDeckApp(AppOptions(sources_factory=lambda: nodes, config=FleetConfig(), simulated=True, poll=False))
    result: dict[str, float] = {}

    async def run() -> None:
        async with app.run_test(size=(200, 80)) as pilot:
            await pilot.pause()
            await app.workers.wait_for_complete()
            app.poll_once_sync()
            await pilot.pause()
            screen = app.screen
            poll_only = 0.0
            render_only = 0.0
            total_start = time.process_time()
            for _ in range(n):
                clock[0] += 1
                t0 = time.process_time()
                app.poller.poll()
                t1 = time.process_time()
                screen.render_fleet(app.poller)  # type: ignore[attr-defined]
                t2 = time.process_time()
                await pilot.pause()  # let Textual repaint what changed
                poll_only += t1 - t0
                render_only += t2 - t1
            total = time.process_time() - total_start
            result["cells"] = render_only / n
            result["refresh"] = (total - poll_only) / n

    asyncio.run(run())
    return result["cells"], result["refresh"]


def bench_nvml(n: int) -> float:
    import pytest

    from fleet.nvml import NvmlCollector
    from tests.fakes.fake_nvml import FakeGpu, FakeNvml

    mp = pytest.MonkeyPatch()
    try:
        FakeNvml([FakeGpu(uuid=f"GPU-{i}") for i in range(8)]).install(mp)
        collector = NvmlCollector(node="bench")
        collector.snapshot()
        start = time.process_time()
        for _ in range(n):
            collector.snapshot()
        return (time.process_time() - start) / n
    finally:
        mp.undo()


FIRST_FRAME = r"""
import os, sys, time, psutil
t0 = psutil.Process().create_time()
sys.path.insert(0, os.environ["FD_ROOT"])
from fleet.config import FleetConfig
from tui.app import AppOptions, FleetDeckApp
from tui.screens.fleet import FleetScreen
orig = FleetScreen.render_fleet
def first(self, poller):
    orig(self, poller)
    def done():
        print(f"{time.time() - t0:.3f}")
        self.app.exit()
    self.call_after_refresh(done)
FleetScreen.render_fleet = first
from fleet.simulated import demo_fleet
FleetDeckApp(AppOptions(sources_factory=lambda: list(demo_fleet()), config=FleetConfig(), simulated=True)).run(headless=True)
"""


LIVE = r"""
import os, sys, time, resource
sys.path.insert(0, os.environ["FD_ROOT"])
from fleet.config import FleetConfig
from fleet.simulated import large_fleet
from tui.app import AppOptions, FleetDeckApp
seconds = float(sys.argv[1]); poll = sys.argv[2] == "poll"
app = FleetDeckApp(AppOptions(sources_factory=lambda: large_fleet(8, 8), config=FleetConfig(refresh_s=1.0),
                              simulated=True, poll=poll))
marks = {}
def start():
    marks["cpu"] = resource.getrusage(resource.RUSAGE_SELF)
    marks["wall"] = time.perf_counter()
    app.set_timer(seconds, finish)
def finish():
    r = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r.ru_utime - marks["cpu"].ru_utime) + (r.ru_stime - marks["cpu"].ru_stime)
    print(f"{cpu / (time.perf_counter() - marks['wall']) * 100:.2f}")
    app.exit()
app.call_later(lambda: app.set_timer(3.0, start))  # after start-up and the first frames
app.run(headless=True, size=(200, 80))
"""


def bench_live(seconds: float) -> tuple[float, float]:
    """The app as it runs: 1 s polls of 64 GPUs for `seconds`, CPU % of one core, and the idle baseline."""
    env = dict(os.environ, FD_ROOT=str(ROOT))
    out = {}
    for mode in ("poll", "idle"):
        r = subprocess.run([sys.executable, "-c", LIVE, str(seconds), mode], capture_output=True, text=True, env=env, timeout=seconds + 60)
        out[mode] = float(r.stdout.strip().splitlines()[-1])
    return out["poll"], out["idle"]


def bench_first_frame(runs: int) -> list[float]:
    times = []
    env = dict(os.environ, FD_ROOT=str(ROOT))
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", FIRST_FRAME], capture_output=True, text=True, env=env, timeout=60)
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--refreshes", type=int, default=200)
    parser.add_argument("--launches", type=int, default=5)
    parser.add_argument("--live-seconds", type=float, default=30.0)
    args = parser.parse_args()
    n = args.refreshes

    poll = bench_poll(n)
    cells, refresh = bench_render(n)
    nvml = bench_nvml(n)
    first = bench_first_frame(args.launches)
    live, idle = bench_live(args.live_seconds)
    per_refresh = poll + refresh
    print(f"fleet: 8 nodes x 8 GPUs = 64 simulated GPUs, {n} refreshes")
    print(f"  poll (snapshots + history)      {poll * 1e3:8.2f} ms CPU / refresh")
    print(f"  screen cell updates             {cells * 1e3:8.2f} ms CPU / refresh")
    print(f"  screen updates + Textual repaint{refresh * 1e3:8.2f} ms CPU / refresh")
    print(f"  total at a 1 s refresh          {per_refresh * 100:8.2f} % of one core (in Pilot, whose pauses cost too)")
    print(f"the app as it runs, headless, 200x80, {args.live_seconds:.0f} s:")
    print(f"  polling 64 GPUs every 1 s       {live:8.2f} % of one core (aim < 5 %)")
    print(f"  same app, not polling (idle)    {idle:8.2f} % of one core; polling adds {live - idle:.2f} points")
    print(f"  NVML collector, 8 fake GPUs     {nvml * 1e3:8.2f} ms CPU / refresh (our code, not the driver)")
    print(f"first frame (process start -> fleet drawn), {len(first)} launches:")
    print(f"  median {sorted(first)[len(first) // 2]:.3f} s, max {max(first):.3f} s (aim < 1 s)")


if __name__ == "__main__":
    main()
