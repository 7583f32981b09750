"""`fleetdeck report`: the month's routing figures; exit 3 when a task's escalation rate drifts."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetdeck.cmdutil import add_fleet_config_option
from fleetdeck.tables import print_table

if TYPE_CHECKING:
    from store.analytics import MonthReport, TaskPolicy

EXIT_DRIFT = 3


def register(sub: Any) -> None:
    p = sub.add_parser("report", help="month-to-date cost, savings and escalation drift (exit 3 on drift)")
    p.add_argument("--month", metavar="YYYY-MM", help="the month to report (default: the current UTC month)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--router-config", dest="router_config", metavar="FILE",
                   help="router config (pricing, tasks, drift windows); default as for `fleetdeck proxy`")
    add_fleet_config_option(p)
    p.add_argument("--store", metavar="PATH", default=argparse.SUPPRESS, help="SQLite store holding the ledger")
    p.set_defaults(handler=run)


def load_pricing_and_policies(router_config: str | None) -> tuple[float, int, dict[str, TaskPolicy], str | None]:
    """Pricing and per-task drift settings; a missing default file is a note, a broken one an error."""
    from engine.router.config import load_router_settings
    from store.paths import default_router_config

    path = Path(router_config) if router_config else default_router_config()
    if router_config and not path.exists():
        raise SystemExit(f"fleetdeck report: {path}: file not found")
    settings = load_router_settings(path)
    if settings.error and path.exists():
        from fleetdeck.cmdutil import one_line

        raise SystemExit(f"fleetdeck report: {one_line(settings.error)}")
    return settings.gpu_hour_usd, settings.gpus, settings.policies, settings.error


def run(args: argparse.Namespace) -> int:
    from store.analytics import current_month, month_report
    from store.db import StoreError, StoreOlder, open_store
    from store.paths import default_store_path

    now = time.time()
    month = args.month or current_month(now)
    try:
        gpu_hour, gpus, policies, note = load_pricing_and_policies(args.router_config)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    store_path = Path(args.store) if args.store else default_store_path()
    if not store_path.exists():
        print(f"fleetdeck report: no store at {store_path} (check --store or FLEETDECK_STORE; the proxy creates it)",
              file=sys.stderr)
        return 2
    try:
        try:
            store = open_store(store_path, read_only=True)  # a report changes nothing of the store
        except StoreOlder:
            from engine.audit import trail as audit

            if audit.is_read_only():
                raise  # a read-only run migrates nothing: the message says to run one that writes first
            store = open_store(store_path)  # written by an older fleetdeck: migrated first, as every command does
        doc = month_report(store, month, now, gpu_hour, gpus, policies)
    except (StoreError, ValueError) as exc:
        print(f"fleetdeck report: {exc}", file=sys.stderr)
        return 2
    if note:
        doc = replace(doc, note=note)
    if args.json:
        print(json.dumps(doc.to_json(), indent=2))
    else:
        print_report(doc)
    return EXIT_DRIFT if doc.drift_alert else 0


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.1f}%"


def print_report(r: MonthReport) -> None:
    from tui.format import usd

    savings_pct = "n/a" if r.savings_pct is None else f"{r.savings_pct:.1f}%"
    print("\n".join([
        f"fleetdeck report {r.month} ({r.hours_elapsed:.1f} of {r.hours_in_month:.0f} h)",
        f"  requests            {r.requests:,}  escalated {r.escalated:,} ({_pct(r.escalation_rate)})",
        f"  local SLM (fixed)   {usd(r.slm_cost_usd)}  ({usd(r.slm_gpu_hour_usd)}/GPU-h x {r.slm_gpus} GPUs)",
        f"  frontier spend      {usd(r.frontier_cost_usd)}"
        + (f"  (of which {usd(r.frontier_cost_estimated_usd)} estimated: usage never came back)"
           if r.frontier_cost_estimated_usd else ""),
        f"  total               {usd(r.total_cost_usd)}   projected to month end {usd(r.projected_total_cost_usd)}",
        f"  all-frontier        {usd(r.all_frontier_cost_usd)}",
        f"  savings             {usd(r.savings_usd)} ({savings_pct})",
        f"  per million req.    {usd(r.cost_per_million_requests_usd)}",
        "",
    ]))
    print_table(["task", "requests", "esc", "baseline", "recent", "total", "$/M req", "drift"],
                [[t.name, f"{t.requests:,}", _pct(t.escalation_rate), _pct(t.baseline_escalation_rate),
                  _pct(t.recent_escalation_rate), usd(t.total_cost_usd), usd(t.cost_per_million_requests_usd),
                  "DRIFT" if t.drift_alert else "ok"] for t in r.tasks],
                right={"requests", "esc", "baseline", "recent", "total", "$/M req"}, indent=2)
    if r.note:
        print(f"\nnote: {r.note}")
