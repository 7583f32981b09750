"""The Cost screen: month to date against an all-frontier baseline, per task, and the last 12 months."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Static
from textual_plotext import PlotextPlot

from engine.router.figures import CostData, load_cost_data
from tui.format import usd
from tui.screens.base import PolledScreen, while_attached
from tui.table import Col, DeckTable

# Column, label, priority (the highest hides first when narrow): the task, its total and savings stay.
COLUMNS = (Col("task", "Task"), Col("req", "Requests", 2), Col("esc", "Esc", 1), Col("slm", "SLM", 4),
           Col("frontier", "Frontier", 3), Col("total", "Total"), Col("per_m", "$/M req", 5),
           Col("savings", "Savings"))

if TYPE_CHECKING:
    from store.db import Store


class CostScreen(PolledScreen):
    def __init__(self, refresh_s: float = 10.0) -> None:
        super().__init__(refresh_s)
        self.data: CostData | None = None

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="cost-top"):
            yield Static("", id="cost-summary")
            yield PlotextPlot(id="cost-chart")
        yield DeckTable(COLUMNS, id="cost-tasks")

    def no_store(self) -> None:
        self.query_one("#cost-summary", Static).update("No store yet: costs come from the router's ledger.")

    def load(self, store: Store) -> None:
        self._load(store, self.app.router_config_path())

    @work(thread=True, exclusive=True, group="cost")
    def _load(self, store: Store, config_path: Path | None) -> None:
        try:
            data: CostData | str = load_cost_data(store, config_path, time.time())
        except Exception as exc:
            data = f"cost figures unavailable: {exc}"
        self.app.call_from_thread(while_attached(self, self._show), data)

    def _show(self, data: CostData | str) -> None:
        self.loaded()
        summary = self.query_one("#cost-summary", Static)
        if isinstance(data, str):
            summary.update(f"[red]{data}[/]")
            return
        self.data = data
        r = data.report
        pct = "n/a" if r.savings_pct is None else f"{r.savings_pct:.1f}%"
        saved = f"saved      {usd(r.savings_usd):>12} ({pct})"
        lines = [
            f"[b]{r.month}[/b] to date ({r.hours_elapsed:.0f} of {r.hours_in_month:.0f} h)",
            f"local SLM  {usd(r.slm_cost_usd):>12}",
            f"frontier   {usd(r.frontier_cost_usd):>12}",
            f"[b]total      {usd(r.total_cost_usd):>12}[/b]",
            f"projected  {usd(r.projected_total_cost_usd):>12}",
            f"all-front. {usd(r.all_frontier_cost_usd):>12}",
            f"[b green]{saved}[/]" if r.savings_usd >= 0 else f"[b red]{saved}[/]",
            f"per M req. {usd(r.cost_per_million_requests_usd):>12}",
            f"requests   {r.requests:>12,}",
        ]
        if data.error:
            lines.append(f"[yellow]{data.error}[/]")
        summary.update("\n".join(lines))
        rows = []
        for t in r.tasks:
            rate = "n/a" if t.escalation_rate is None else f"{t.escalation_rate * 100:.1f}%"
            rows.append((t.name, [t.name, f"{t.requests:,}", rate, usd(t.slm_cost_usd), usd(t.frontier_cost_usd),
                                  usd(t.total_cost_usd), usd(t.cost_per_million_requests_usd), usd(t.savings_usd)]))
        self.query_one("#cost-tasks", DeckTable).set_rows(rows)
        plot = self.query_one("#cost-chart", PlotextPlot)
        plt = plot.plt
        plt.clear_figure()
        hist = data.history
        labels = [h["month"][2:] for h in hist]
        # textual-plotext's stub says `label` and one colour; plotext itself takes `labels` and a colour per series.
        plt.multiple_bar(labels, [[h["total_cost_usd"] for h in hist], [h["all_frontier_cost_usd"] for h in hist]],
                         labels=["actual", "all-frontier"], color=["cyan", "red"])  # type: ignore[call-arg, arg-type]
        # Month labels chosen here, short and apart: plotext places crowded labels differently from run to run.
        names = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        step = 3 if plot.size.width < 60 else (2 if plot.size.width < 100 else 1)
        shown = [i for i in range(len(hist)) if (len(hist) - 1 - i) % step == 0]
        plt.xticks([i + 1 for i in shown], [names[int(hist[i]["month"][5:7]) - 1] for i in shown])
        plt.title("last 12 months, USD")
        plot.refresh()
