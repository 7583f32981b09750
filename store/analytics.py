"""The figures the Router and Cost screens and `fleetdeck report` show: one function per figure.

Everything reads the rollups, never the raw rows: a window is cut into whole days (day table),
whole hours (hour table) and the minutes at its ragged edges (minute table), so a month at millions of
requests a day costs a few thousand rows. Months are UTC calendar months.
"""

from __future__ import annotations

import calendar
import json
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from typing import Any, Iterable

from store.db import Store
from store.rollup import CONFIDENCE_BINS, COUNT_NAMES, LATENCY_BUCKETS_MS, ROLLUP_TABLES, Counts

MIN_RECENT_REQUESTS = 20  # fewer recent requests than this is noise, not drift
DAY, HOUR, MINUTE = 86400, 3600, 60


@dataclass
class Totals(Counts):
    """A window's rollup counts (every column of `Counts`, summed) and what the screens derive from them."""

    slm_answered: int = 0
    latency_hist: dict[str, list[int]] = field(default_factory=dict)  # by route
    confidence_hist: list[int] = field(default_factory=lambda: [0] * CONFIDENCE_BINS)

    @property
    def escalation_rate(self) -> float | None:
        return self.escalated / self.requests if self.requests else None

    def latency_pct(self, route: str, q: float) -> float | None:
        return percentile_from_hist(self.latency_hist.get(route), q)


def percentile_from_hist(hist: list[int] | None, q: float) -> float | None:
    """The upper edge of the latency bucket holding the q-quantile (ms); None without data."""
    if not hist or not sum(hist):
        return None
    target = q * sum(hist)
    seen = 0
    for count, edge in zip(hist, LATENCY_BUCKETS_MS):
        seen += count
        if seen >= target:
            return edge if edge != float("inf") else LATENCY_BUCKETS_MS[-2]
    return LATENCY_BUCKETS_MS[-2]


def split_window(since: float, until: float) -> list[tuple[str, int, int]]:
    """Cover [since, until) with (table, lo, hi) pieces: days in the middle, hours and minutes at the edges."""
    lo, hi = int(since // MINUTE) * MINUTE, int(until // MINUTE) * MINUTE
    if until > hi:
        hi += MINUTE  # the current minute counts
    pieces: list[tuple[str, int, int]] = []

    def cover(a: int, b: int, widths: tuple[int, ...]) -> None:
        if a >= b:
            return
        width = widths[0]
        if len(widths) == 1:
            pieces.append((ROLLUP_TABLES[width], a, b))
            return
        inner_lo = -(-a // width) * width
        inner_hi = (b // width) * width
        if inner_lo >= inner_hi:
            cover(a, b, widths[1:])
            return
        cover(a, inner_lo, widths[1:])
        pieces.append((ROLLUP_TABLES[width], inner_lo, inner_hi))
        cover(inner_hi, b, widths[1:])

    cover(lo, hi, (DAY, HOUR, MINUTE))
    return pieces


def _add_hist(into: list[int], text: str) -> None:
    for i, v in enumerate(json.loads(text) if text else []):
        if i < len(into):
            into[i] += v


def totals_by_task(store: Store, since: float, until: float, histograms: bool = True) -> dict[str, Totals]:
    out: dict[str, Totals] = {}
    columns = ", ".join(("task", "route", *COUNT_NAMES, *(("latency_hist", "confidence_hist") if histograms else ())))
    for table, lo, hi in split_window(since, until):
        rows = store.query(f"SELECT {columns} FROM {table} WHERE bucket >= ? AND bucket < ?", (lo, hi))
        for r in rows:
            t = out.setdefault(r["task"], Totals())
            t.add_counts(r)
            if r["route"] == "slm":
                t.slm_answered += r["requests"]
            if histograms:
                _add_hist(t.latency_hist.setdefault(r["route"], [0] * len(LATENCY_BUCKETS_MS)), r["latency_hist"])
                _add_hist(t.confidence_hist, r["confidence_hist"])
    return out


def escalation_series(store: Store, task: str, since: float, until: float) -> list[tuple[int, int, int]]:
    """(bucket start, requests, escalated) at the coarsest resolution that still gives ~60+ points."""
    span = until - since
    width = MINUTE if span <= 6 * HOUR else (HOUR if span <= 45 * DAY else DAY)
    table = ROLLUP_TABLES[width]
    rows = store.query(
        f"SELECT bucket, SUM(requests) AS requests, SUM(escalated) AS escalated FROM {table}"
        " WHERE task = ? AND bucket >= ? AND bucket < ? GROUP BY bucket ORDER BY bucket",
        (task, int(since // width) * width, until),
    )
    return [(int(r["bucket"]), int(r["requests"]), int(r["escalated"])) for r in rows]


def by_model(store: Store, task: str, since: float, until: float) -> list[dict[str, Any]]:
    """Requests and escalation rate per small model (adapter version) that answered or was asked, oldest
    first by when it was first seen. Read from the ledger rows: rollups do not keep the model."""
    rows = store.query(
        "SELECT slm_model, COUNT(*) AS n, COALESCE(SUM(escalated), 0) AS escalated, MIN(ts) AS first_seen"
        " FROM requests WHERE task = ? AND ts >= ? AND ts < ? AND slm_model IS NOT NULL"
        " GROUP BY slm_model ORDER BY MIN(ts)", (task, since, until))
    return [{"model": r["slm_model"], "requests": int(r["n"]), "escalated": int(r["escalated"]),
             "escalation_rate": r["escalated"] / r["n"] if r["n"] else None, "first_seen": r["first_seen"]}
            for r in rows]


@dataclass
class Drift:
    task: str
    baseline_rate: float | None
    recent_rate: float | None
    recent_requests: int
    threshold_pp: float
    alert: bool


def drift_status(store: Store, task: str, now: float, policy: "TaskPolicy | None" = None) -> Drift:
    return drift_for_tasks(store, now, [task], {task: policy or TaskPolicy()})[task]


def drift_for_tasks(store: Store, now: float, names: Iterable[str], policies: dict[str, "TaskPolicy"] | None = None) -> dict[str, Drift]:
    """Drift of many tasks with two rollup reads per distinct window setting, not two per task."""
    policies = policies or {}
    groups: dict[tuple[float, float], list[str]] = {}
    for name in names:
        pol = policies.get(name, TaskPolicy())
        groups.setdefault((pol.baseline_days, pol.recent_hours), []).append(name)
    out: dict[str, Drift] = {}
    for (baseline_days, recent_hours), members in groups.items():
        recent_start = now - recent_hours * HOUR
        base = totals_by_task(store, recent_start - baseline_days * DAY, recent_start, histograms=False)
        recent = totals_by_task(store, recent_start, now, histograms=False)
        for name in members:
            threshold = policies.get(name, TaskPolicy()).drift_threshold_pp
            out[name] = _drift(name, base.get(name, Totals()), recent.get(name, Totals()), threshold)
    return out


def _drift(task: str, base: Totals, recent: Totals, threshold_pp: float) -> Drift:
    b, r = base.escalation_rate, recent.escalation_rate
    alert = (
        b is not None and r is not None and recent.requests >= MIN_RECENT_REQUESTS
        and round((r - b) * 100, 9) > threshold_pp
    )
    return Drift(task, b, r, recent.requests, threshold_pp, alert)


def slm_fixed_cost(gpu_hour_usd: float, gpus: int, hours: float) -> float:
    """The local fleet is a fixed cost: GPU-hours x price, shared by the SLM-answered requests."""
    return gpu_hour_usd * gpus * max(0.0, hours)


def month_bounds(month: str) -> tuple[float, float]:
    try:
        year, mon = (int(x) for x in month.split("-"))
        start = datetime(year, mon, 1, tzinfo=timezone.utc)
    except ValueError:
        raise ValueError(f"month must be YYYY-MM, got {month!r}") from None
    days = calendar.monthrange(year, mon)[1]
    return start.timestamp(), start.timestamp() + days * DAY


def current_month(now: float) -> str:
    return datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y-%m")


@dataclass
class TaskPolicy:
    """What the report needs of a task's config (drift windows); defaults for tasks only in the ledger."""

    baseline_days: float = 7.0
    recent_hours: float = 1.0
    drift_threshold_pp: float = 10.0


@dataclass(frozen=True, kw_only=True)
class CostFigures:
    """Requests, escalations and dollars of a period: the local fleet's fixed cost against the frontier's."""

    requests: float
    escalated: float
    escalation_rate: float | None
    slm_cost_usd: float
    frontier_cost_usd: float
    total_cost_usd: float
    all_frontier_cost_usd: float
    savings_usd: float
    savings_pct: float | None
    cost_per_million_requests_usd: float | None

    @staticmethod
    def of(requests: float, escalated: float, slm: float, frontier: float, all_frontier: float) -> dict[str, Any]:
        """The figures as keyword arguments for CostFigures or a subclass."""
        total = slm + frontier
        savings = all_frontier - total
        return {
            "requests": requests,
            "escalated": escalated,
            "escalation_rate": escalated / requests if requests else None,
            "slm_cost_usd": round(slm, 6),
            "frontier_cost_usd": round(frontier, 6),
            "total_cost_usd": round(total, 6),
            "all_frontier_cost_usd": round(all_frontier, 6),
            "savings_usd": round(savings, 6),
            "savings_pct": round(100 * savings / all_frontier, 4) if all_frontier else None,
            "cost_per_million_requests_usd": round(total / requests * 1e6, 4) if requests else None,
        }


@dataclass(frozen=True, kw_only=True)
class TaskMonth(CostFigures):
    """A task's month: its share of the costs and its drift now."""

    name: str
    baseline_escalation_rate: float | None = None
    recent_escalation_rate: float | None = None
    recent_requests: int = 0
    drift_threshold_pp: float = 0.0
    drift_alert: bool = False

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        return {"name": doc.pop("name"), **doc}


@dataclass(frozen=True, kw_only=True)
class MonthReport(CostFigures):
    """What `fleetdeck report`, the Cost screen and `whatif` show of a month (to date, if it is this one)."""

    month: str
    hours_elapsed: float
    hours_in_month: float
    slm_gpu_hour_usd: float
    slm_gpus: int
    projected_total_cost_usd: float | None
    projected_all_frontier_cost_usd: float | None
    tasks: list[TaskMonth]
    drift_alert: bool
    note: str | None = None  # why figures use defaults (a router config that could not be read)
    frontier_cost_estimated_usd: float = 0.0  # of frontier_cost_usd, estimated from prompts (usage never came)

    def task(self, name: str) -> TaskMonth | None:
        return next((t for t in self.tasks if t.name == name), None)

    def projected(self, entry: TaskMonth) -> TaskMonth:
        """A task's month so far, projected to the whole month: every count and cost grows with the hours."""
        scale = self.hours_in_month / self.hours_elapsed if self.hours_elapsed else 1.0
        return replace(entry, **{k: getattr(entry, k) * scale for k in PROJECTED_KEYS})

    def to_json(self) -> dict[str, Any]:
        """The JSON `fleetdeck report --json` prints (its keys are a public interface)."""
        head = ("month", "hours_elapsed", "hours_in_month", "slm_gpu_hour_usd", "slm_gpus")
        doc: dict[str, Any] = {k: getattr(self, k) for k in head}
        doc.update({f.name: getattr(self, f.name) for f in fields(CostFigures)})
        doc.update(projected_total_cost_usd=self.projected_total_cost_usd,
                   projected_all_frontier_cost_usd=self.projected_all_frontier_cost_usd,
                   frontier_cost_estimated_usd=self.frontier_cost_estimated_usd,
                   tasks=[t.to_json() for t in self.tasks], drift_alert=self.drift_alert)
        if self.note:
            doc["note"] = self.note
        return doc


PROJECTED_KEYS = ("requests", "escalated", "slm_cost_usd", "frontier_cost_usd", "all_frontier_cost_usd")


def month_report(store: Store, month: str, now: float, gpu_hour_usd: float, gpus: int,
                 policies: dict[str, TaskPolicy] | None = None) -> MonthReport:
    """The month's figures (to date, if it is the current month) and each task's drift now."""
    start, end = month_bounds(month)
    until = min(end, now)
    elapsed_h = max(0.0, (until - start) / HOUR)
    month_h = (end - start) / HOUR
    by_task = totals_by_task(store, start, until, histograms=False) if until > start else {}
    slm_cost = slm_fixed_cost(gpu_hour_usd, gpus, elapsed_h)
    all_t = Totals()
    for t in by_task.values():
        all_t.requests += t.requests
        all_t.escalated += t.escalated
        all_t.slm_answered += t.slm_answered
        all_t.cost_usd += t.cost_usd
        all_t.cost_estimated_usd += t.cost_estimated_usd
        all_t.all_frontier_cost_usd += t.all_frontier_cost_usd
    scale = month_h / elapsed_h if elapsed_h else 0.0
    policies = policies or {}
    names = sorted(set(by_task) | set(policies))
    drifts = drift_for_tasks(store, now, names, policies)
    tasks = []
    for name in names:
        t = by_task.get(name, Totals())
        # The fixed SLM cost is shared by the SLM-answered requests of the period.
        share = slm_cost * t.slm_answered / all_t.slm_answered if all_t.slm_answered else 0.0
        d = drifts[name]
        tasks.append(TaskMonth(
            name=name, **CostFigures.of(t.requests, t.escalated, share, t.cost_usd, t.all_frontier_cost_usd),
            baseline_escalation_rate=d.baseline_rate, recent_escalation_rate=d.recent_rate,
            recent_requests=d.recent_requests, drift_threshold_pp=d.threshold_pp, drift_alert=d.alert))
    return MonthReport(
        month=month, hours_elapsed=round(elapsed_h, 4), hours_in_month=month_h, slm_gpu_hour_usd=gpu_hour_usd,
        slm_gpus=gpus,
        **CostFigures.of(all_t.requests, all_t.escalated, slm_cost, all_t.cost_usd, all_t.all_frontier_cost_usd),
        projected_total_cost_usd=(round(slm_fixed_cost(gpu_hour_usd, gpus, month_h) + all_t.cost_usd * scale, 6)
                                  if elapsed_h else None),
        projected_all_frontier_cost_usd=round(all_t.all_frontier_cost_usd * scale, 6) if elapsed_h else None,
        tasks=tasks, drift_alert=any(t.drift_alert for t in tasks),
        frontier_cost_estimated_usd=round(all_t.cost_estimated_usd, 6))


def monthly_history(store: Store, now: float, months: int, gpu_hour_usd: float, gpus: int) -> list[dict[str, Any]]:
    """The last `months` months (oldest first): SLM, frontier, total and all-frontier cost."""
    out = []
    dt = datetime.fromtimestamp(now, tz=timezone.utc)
    year, mon = dt.year, dt.month
    keys = []
    for _ in range(months):
        keys.append(f"{year:04d}-{mon:02d}")
        mon -= 1
        if mon == 0:
            year, mon = year - 1, 12
    for key in reversed(keys):
        start, end = month_bounds(key)
        until = min(end, now)
        day_hi = int(until // DAY) * DAY
        days = Counts()
        days.add_counts(store.query(
            f"SELECT {', '.join(f'COALESCE(SUM({n}), 0) AS {n}' for n in COUNT_NAMES)}"
            " FROM rollup_day WHERE bucket >= ? AND bucket < ?",
            (start, day_hi),
        )[0])
        # The day table holds whole days; today's partial day comes from the finer tables.
        partial = totals_by_task(store, day_hi, until, histograms=False) if until > day_hi else {}
        req = days.requests + sum(t.requests for t in partial.values())
        frontier = days.cost_usd + sum(t.cost_usd for t in partial.values())
        allf = days.all_frontier_cost_usd + sum(t.all_frontier_cost_usd for t in partial.values())
        slm = slm_fixed_cost(gpu_hour_usd, gpus, (until - start) / HOUR) if req else 0.0
        out.append({"month": key, "requests": req, "slm_cost_usd": slm, "frontier_cost_usd": frontier,
                    "total_cost_usd": slm + frontier, "all_frontier_cost_usd": allf})
    return out


def known_tasks(store: Store) -> list[str]:
    return [r["task"] for r in store.query("SELECT DISTINCT task FROM rollup_day ORDER BY task")]


def iter_policies(tasks: Iterable[Any]) -> dict[str, TaskPolicy]:
    """TaskPolicy per task from router-config tasks (anything with the three drift attributes)."""
    return {t.name: TaskPolicy(t.baseline_days, t.recent_hours, t.drift_threshold_pp) for t in tasks}
