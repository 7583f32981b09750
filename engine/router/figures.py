"""What the Router and Cost screens show, read from the store and the router config in one call each.

The screens call these from a worker thread, and `bench/bench_analytics.py` times the same calls, so a
figure measured there is the figure the operator waits for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.adapters.promotion import history as promotion_history
from engine.router.calibrate import latest_calibration
from engine.router.config import load_router_settings
from store.analytics import (
    MonthReport,
    by_model,
    current_month,
    drift_for_tasks,
    escalation_series,
    known_tasks,
    month_report,
    monthly_history,
    totals_by_task,
)
from store.db import Store
from store.ledger import journal_backlog
from store.ledger_row import Route


@dataclass
class TaskRow:
    name: str
    threshold: float | None
    req_1h: int
    rate_1h: float | None
    rate_24h: float | None
    rate_30d: float | None
    baseline: float | None
    recent: float | None
    drift_pp: float
    alert: bool
    p50_slm: float | None
    p95_slm: float | None
    p50_frontier: float | None
    p95_frontier: float | None
    confidence_hist: list[int] = field(default_factory=list)
    escalations_24h: dict[str, int] = field(default_factory=dict)  # by reason
    slm_model: str | None = None  # what the router config points the task at now
    window: str | None = None  # what a streamed request's decision waits for (Task.window_label)


@dataclass
class RouterData:
    rows: list[TaskRow]
    series: list[tuple[int, int, int]]
    calibration: dict[str, Any] | None
    config_path: Path | None
    error: str | None = None
    ledger_backlog: int = 0  # request rows waiting in the proxy's journal, not yet in the store
    versions: list[dict[str, Any]] = field(default_factory=list)  # the selected task's escalation per model, in the window
    promotions: list[dict[str, Any]] = field(default_factory=list)  # the selected task's, newest first
    # The selected task's (requests, escalated) over the chart's window, from the rollups through the same
    # totals_by_task call the table's columns use: the side panel's figure is the column's figure.
    window_totals: tuple[int, int] | None = None


def load_router_data(store: Store, config_path: Path | None, selected: str | None, window_s: int, now: float) -> RouterData:
    settings = load_router_settings(config_path)
    policies, thresholds = settings.policies, settings.thresholds
    # Without a config the defaults apply quietly; a broken one is worth saying.
    error = settings.error if config_path is not None and config_path.exists() else None
    names = sorted(set(policies) | set(known_tasks(store)))
    t1h = totals_by_task(store, now - 3600, now, histograms=False)
    t24 = totals_by_task(store, now - 86400, now)
    t30 = totals_by_task(store, now - 30 * 86400, now, histograms=False)
    drifts = drift_for_tasks(store, now, names, policies)
    rows = []
    for name in names:
        d = drifts[name]
        day = t24.get(name)
        rows.append(TaskRow(
            name=name, threshold=thresholds.get(name),
            req_1h=t1h[name].requests if name in t1h else 0,
            rate_1h=t1h[name].escalation_rate if name in t1h else None,
            rate_24h=day.escalation_rate if day else None,
            rate_30d=t30[name].escalation_rate if name in t30 else None,
            baseline=d.baseline_rate, recent=d.recent_rate, drift_pp=d.threshold_pp, alert=d.alert,
            p50_slm=day.latency_pct(Route.SLM, 0.5) if day else None, p95_slm=day.latency_pct(Route.SLM, 0.95) if day else None,
            p50_frontier=day.latency_pct(Route.FRONTIER, 0.5) if day else None,
            p95_frontier=day.latency_pct(Route.FRONTIER, 0.95) if day else None,
            confidence_hist=day.confidence_hist if day else [],
            escalations_24h={"low confidence": day.esc_low_confidence, "SLM error/timeout": day.esc_slm_error,
                             "forced": day.esc_forced} if day else {},
            slm_model=settings.models.get(name), window=settings.windows.get(name),
        ))
    selected = selected if selected in names else (names[0] if names else None)
    series = escalation_series(store, selected, now - window_s, now) if selected else []
    cal = latest_calibration(store, selected) if selected else None
    versions = by_model(store, selected, now - window_s, now) if selected else []
    windows = {3600: t1h, 86400: t24, 30 * 86400: t30}
    in_window = windows[window_s] if window_s in windows else totals_by_task(store, now - window_s, now, histograms=False)
    chosen = in_window.get(selected) if selected else None
    window_totals = (chosen.requests, chosen.escalated) if chosen is not None else None
    promotions = promotion_history(store, selected, limit=50) if selected else []
    backlog = journal_backlog(store, now, journal_dir=settings.journal_dir)
    return RouterData(rows, series, cal, config_path, error, ledger_backlog=backlog,
                      versions=versions, promotions=promotions, window_totals=window_totals)


@dataclass
class CostData:
    report: MonthReport
    history: list[dict[str, Any]]  # the last 12 months, oldest first (store.analytics.monthly_history)
    error: str | None = None  # the router config could not be read: the figures use default prices


def load_cost_data(store: Store, config_path: Path | None, now: float) -> CostData:
    settings = load_router_settings(config_path)
    report = month_report(store, current_month(now), now, settings.gpu_hour_usd, settings.gpus, settings.policies)
    return CostData(report, monthly_history(store, now, 12, settings.gpu_hour_usd, settings.gpus), settings.error)
