"""`fleetdeck calibrate` and `fleetdeck whatif`: planning the threshold and the month's cost."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetdeck.cmdutil import add_fleet_config_option, one_line
from fleetdeck.cmdutil import store_of as _store
from fleetdeck.mutating import mutating
from fleetdeck.tables import print_table

if TYPE_CHECKING:
    from engine.router.config import RouterConfig, Task


def register(sub: Any) -> None:
    p = sub.add_parser("calibrate", help="send a labelled eval set through a task's SLM; recommend a threshold")
    p.add_argument("task")
    p.add_argument("--eval", required=True, metavar="FILE", help="JSONL: {\"messages\": [...], \"expected\": \"...\"} per line")
    p.add_argument("--target-accuracy", type=float, default=0.95, metavar="A")
    p.add_argument("--frontier-accuracy", type=float, default=1.0, metavar="A", help="assumed accuracy of escalated answers")
    p.add_argument("--apply", action="store_true", help="write the recommended threshold into the router config")
    p.add_argument("--json", action="store_true")
    p.add_argument("--router-config", dest="router_config", metavar="FILE", help="the router config (default: the usual place)")
    add_fleet_config_option(p)
    p.add_argument("--store", metavar="PATH", default=argparse.SUPPRESS)
    p.add_argument("--read-only", action="store_true", default=argparse.SUPPRESS, help="refuse --apply")
    p.set_defaults(handler=run_calibrate)

    w = sub.add_parser("whatif", help="a task's monthly cost under a frontier price or volume change")
    w.add_argument("task")
    w.add_argument("--frontier-price-change", default="0%", metavar="PCT", help="e.g. -50%%")
    w.add_argument("--volume-change", default="0%", metavar="PCT", help="e.g. +20%%")
    w.add_argument("--target-accuracy", type=float, metavar="A", help="default: the latest calibration's target")
    w.add_argument("--json", action="store_true")
    w.add_argument("--router-config", dest="router_config", metavar="FILE", help="the router config (default: the usual place)")
    add_fleet_config_option(w)
    w.add_argument("--store", metavar="PATH", default=argparse.SUPPRESS)
    w.set_defaults(handler=run_whatif)


def _err(cmd: str, msg: str) -> int:
    print(f"fleetdeck {cmd}: {msg}", file=sys.stderr)
    return 2


def _config(args: argparse.Namespace, cmd: str) -> tuple[RouterConfig, Path] | int:
    from engine.router.config import load_router_config
    from store.config_files import ConfigError
    from store.paths import default_router_config

    path = Path(args.router_config) if args.router_config else default_router_config()
    try:
        return load_router_config(path), path
    except ConfigError as exc:
        return _err(cmd, one_line(exc))


def _config_and_task(args: argparse.Namespace, cmd: str) -> tuple[RouterConfig, Path, Task] | int:
    loaded = _config(args, cmd)
    if isinstance(loaded, int):
        return loaded
    config, path = loaded
    task = config.task_by_name(args.task)
    if task is None:
        return _err(cmd, f"unknown task {args.task!r}; tasks in {path}: {', '.join(t.name for t in config.task)}")
    return config, path, task


@mutating("router.threshold", lambda a: a.task, lambda a: a.apply)
def run_calibrate(args: argparse.Namespace) -> int:
    from engine.router.calibrate import EvalSetError, analyse, load_eval_set, save_calibration, score_eval_set
    from engine.router.config import set_task_threshold
    from store.db import StoreError

    found = _config_and_task(args, "calibrate")
    if isinstance(found, int):
        return found
    config, path, task = found
    if not 0 < args.target_accuracy <= 1:
        return _err("calibrate", "--target-accuracy must be in (0, 1]")
    try:
        items = load_eval_set(Path(args.eval))
        scored = score_eval_set(task, items)
    except (EvalSetError, ConnectionError) as exc:
        return _err("calibrate", str(exc))
    cal = analyse(scored, args.target_accuracy, args.frontier_accuracy)
    from engine.audit import trail as audit

    if audit.is_read_only():  # the result is printed; the store is not written (the Router screen reads the last saved)
        print(f"fleetdeck calibrate: result not saved: {audit.READ_ONLY_REASON}", file=sys.stderr)
    else:
        try:
            store = _store(args)
            save_calibration(store, task.name, str(args.eval), cal, time.time())
        except StoreError as exc:
            print(f"fleetdeck calibrate: result not saved: {exc}", file=sys.stderr)
    applied = False
    if args.apply and cal.threshold is not None:
        set_task_threshold(path, task.name, cal.threshold)
        applied = True
    if args.json:
        doc = cal.to_json()
        doc.update(task=task.name, current_threshold=task.threshold, applied=applied)
        print(json.dumps(doc, indent=2))
        return 0
    print(f"calibration of {task.name} on {cal.items} items ({args.eval})")
    print(f"  SLM accuracy alone     {cal.accuracy * 100:.1f}%")
    print(f"  ECE                    {cal.ece:.3f}   AUROC {'n/a' if cal.auroc is None else f'{cal.auroc:.3f}'}")
    step = max(1, len(cal.curve) // 15)
    print_table(["threshold", "escalation", "accuracy"],
                [[f"{t:.4f}", f"{esc * 100:.1f}%", f"{acc * 100:.1f}%"] for t, esc, acc in cal.curve[::step]],
                right={"threshold", "escalation", "accuracy"}, indent=2)
    # The three are set together (the recommended point on the curve) or not at all.
    if cal.threshold is None or cal.escalation_rate is None or cal.routed_accuracy is None:
        print(f"  no threshold reaches {args.target_accuracy * 100:.1f}% accuracy")
    else:
        print(f"  recommended threshold {cal.threshold:.4f}: {cal.escalation_rate * 100:.1f}% escalated, "
              f"{cal.routed_accuracy * 100:.1f}% accurate (target {args.target_accuracy * 100:.1f}%; now {task.threshold})")
        if applied:
            print(f"  written to {path}; restart or reload the proxy to use it")
    return 0


def _pct_arg(text: str) -> float:
    t = text.strip().rstrip("%")
    return 1.0 + float(t) / 100.0


def run_whatif(args: argparse.Namespace) -> int:
    from engine.router.calibrate import latest_calibration, what_if
    from store.analytics import current_month, iter_policies, month_report
    from store.db import StoreError

    found = _config_and_task(args, "whatif")
    if isinstance(found, int):
        return found
    config, _, task = found
    try:
        price, volume = _pct_arg(args.frontier_price_change), _pct_arg(args.volume_change)
    except ValueError:
        return _err("whatif", "changes are percentages such as -50% or +20%")
    if price < 0 or volume < 0:
        return _err("whatif", "a change below -100% makes no sense")
    try:
        store = _store(args, create=False)
    except StoreError as exc:
        return _err("whatif", str(exc))
    now = time.time()
    report = month_report(store, current_month(now), now, config.pricing.slm_gpu_hour_usd, config.pricing.slm_gpus,
                          iter_policies(config.task))
    entry = report.task(task.name)
    if entry is None or not entry.requests:
        return _err("whatif", f"no traffic for {task.name} this month yet")
    monthly = report.projected(entry)
    cal = latest_calibration(store, task.name)
    target = args.target_accuracy or (cal["target_accuracy"] if cal else 0.95)
    recent = entry.recent_escalation_rate if entry.drift_alert else None
    drifting = recent is not None
    result = what_if(monthly, cal["curve"] if cal else None, task.threshold, target, price, volume, recent_rate=recent)
    result.update(task=task.name, target_accuracy=target, calibrated=cal is not None, drifting=drifting)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    from tui.format import usd

    print(f"what-if for {task.name}: frontier price x{price:.2f}, volume x{volume:.2f} (month projected from {report.month})")
    print(f"  monthly cost at the current threshold {task.threshold}: {usd(result['monthly_cost_usd'])}"
          f" (all-frontier {usd(result['all_frontier_cost_usd'])})")
    if recent is not None:
        # The month-to-date rate averages the drift away: say so, and what the recent rate would cost.
        print(f"  note: {task.name} is drifting: {recent * 100:.1f}% escalated recently vs "
              f"{(entry.escalation_rate or 0) * 100:.1f}% this month so far; the figure above prices the month at the "
              f"month-to-date rate. At the recent rate: {usd(result['monthly_cost_at_recent_rate_usd'])}")
    if result["best"]:
        b = result["best"]
        print(f"  cheapest threshold at {target * 100:.1f}% accuracy: {b['threshold']:.4f} -> "
              f"{b['escalation_rate'] * 100:.1f}% escalated, {usd(b['monthly_cost_usd'])}")
    else:
        print("  run `fleetdeck calibrate` first to get the threshold that minimises cost at the target accuracy")
    return 0
