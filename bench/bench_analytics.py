"""Router analytics at scale: 30 days of rollups for 10 tasks at 5 million requests a day each.

Back-fills a store (minute, hour and day rollups for the whole month, as a busy proxy leaves them),
then times each screen's queries and `fleetdeck report`. Aim: every query under 50 ms.
Usage: python bench/bench_analytics.py [--tasks 10] [--per-day 5000000]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(fn, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--per-day", type=float, default=5_000_000)
    args = ap.parse_args()

    from engine.router.demo import DemoTask, backfill, demo_router_toml
    from store.analytics import current_month, month_report
    from store.db import open_store
    from engine.router.figures import load_cost_data, load_router_data

    tasks = tuple(DemoTask(f"task-{i:02d}", args.per_day / 24, 0.05 + 0.01 * i, 0.8, 300, 40, drifts=i == 3)
                  for i in range(args.tasks))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        store = open_store(path)
        now = time.time()
        t = time.perf_counter()
        rows = backfill(store, now, tasks, days=30, daily_only_days=335, minute_hours=30 * 24)
        fill_s = time.perf_counter() - t
        cfg = Path(tmp) / "router.toml"
        cfg.write_text(demo_router_toml("http://127.0.0.1:9", 4000).replace("ticket-routing", "task-00"))
        sizes = {t: store.execute(f"SELECT count(*) FROM {t}")[0][0] for t in ("rollup_minute", "rollup_hour", "rollup_day")}
        print(f"back-filled {rows:,} rollup rows in {fill_s:.1f} s ({sizes}); "
              f"{args.tasks} tasks x {args.per_day:,.0f} requests/day x 30 days = {args.tasks * args.per_day * 30:,.0f} requests")
        print(f"store size {path.stat().st_size / 1e6:.1f} MB")
        from store.analytics import drift_for_tasks, escalation_series, monthly_history, totals_by_task

        names = [t.name for t in tasks]
        print("each query:")
        queries = {
            "totals, last hour": lambda: totals_by_task(store, now - 3600, now, histograms=False),
            "totals + histograms, last day": lambda: totals_by_task(store, now - 86400, now),
            "totals, last 30 days": lambda: totals_by_task(store, now - 30 * 86400, now, histograms=False),
            "drift of every task": lambda: drift_for_tasks(store, now, names),
            "escalation series, 1 h": lambda: escalation_series(store, "task-03", now - 3600, now),
            "escalation series, 1 day": lambda: escalation_series(store, "task-03", now - 86400, now),
            "escalation series, 30 days": lambda: escalation_series(store, "task-03", now - 30 * 86400, now),
            "12 months of costs": lambda: monthly_history(store, now, 12, 1.2, 2),
        }
        for name, fn in queries.items():
            print(f"  {name:34} {timed(fn):8.1f} ms (median of 5; aim < 50 ms)")
        print("each screen's refresh (all its queries together, in its worker):")
        figures = {
            "Router screen, window 1 h": lambda: load_router_data(store, cfg, "task-03", 3600, now),
            "Router screen, window 1 day": lambda: load_router_data(store, cfg, "task-03", 86400, now),
            "Router screen, window 30 days": lambda: load_router_data(store, cfg, "task-03", 30 * 86400, now),
            "Cost screen (month + 12 months)": lambda: load_cost_data(store, cfg, now),
            "month report (in process)": lambda: month_report(store, current_month(now), now, 1.2, 2),
        }
        for name, fn in figures.items():
            print(f"  {name:34} {timed(fn):8.1f} ms (median of 5)")
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "fleetdeck", "report", "--json", "--store", str(path), "--router-config", str(cfg)],
                             capture_output=True, text=True, cwd=ROOT)
        print(f"  {'`fleetdeck report --json` (process)':34} {(time.perf_counter() - t) * 1000:8.1f} ms wall, exit {out.returncode}"
              " (includes interpreter start)")
        store.close()


if __name__ == "__main__":
    main()
