"""The Router screen: per task, escalation rate now and against its baseline, latency by route,
confidence distribution, the escalation chart over an hour, a day or 30 days with the baseline band
and each promotion or rollback marked, the escalation rate per adapter version, and the latest
calibration curve (whose threshold `a` writes into the router config). `e`, `p` and `r` evaluate,
promote and roll back the task's adapter version, each after a question.

All figures come from store.analytics over the rollups, queried in a worker every few seconds while
the screen is shown.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable, Static
from textual_plotext import PlotextPlot

from engine.router.figures import RouterData, TaskRow, load_router_data
from tui.format import ago_ticks, local_time, sparkline
from tui.screens.base import PolledScreen, on_yes, while_attached
from tui.table import Col, DeckTable
from tui.screens.confirm import ConfirmScreen

if TYPE_CHECKING:
    from store.db import Store

# Column, label, priority (the highest hides first when narrow): the task, its escalation now and its
# baseline always stay.
COLUMNS = (Col("task", "Task"), Col("req", "Req/h", 3), Col("r1h", "Esc 1h"), Col("r24", "24h", 1),
           Col("r30", "30d", 2), Col("base", "Baseline"), Col("slm", "SLM p50/p95", 4),
           Col("fr", "Frontier p50/p95", 5))

WINDOWS = {"h": ("last hour", 3600), "d": ("last day", 86400), "m": ("last 30 days", 30 * 86400)}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.1f}%"


def _ms(x: float | None) -> str:
    return "n/a" if x is None else (f"{x / 1000:.1f}s" if x >= 1000 else f"{x:.0f}ms")


WINDOW_KEYS = Binding.Group("window ", compact=True)  # the trailing space: the footer sets no gap after a group


def fit_title(plt: Any, plot: Any, *titles: str) -> None:
    """The longest title that fits the chart's width: plotext drops a title wider than its chart, which
    left the 80-column Router chart without one (and the calibration view an empty, wordless box)."""
    width = plot.size.width or 80
    plt.title(next((t for t in titles if len(t) <= width - 2), titles[-1][: max(1, width - 2)]))


class RouterScreen(PolledScreen):
    MUTATING = frozenset({"apply_threshold", "evaluate", "promote", "rollback"})
    BINDINGS = [
        # h/d/m share one footer entry ("hdm window") so the Router's keys fit 80 columns.
        Binding("h", "window('h')", "Hour", tooltip="Chart the last hour", group=WINDOW_KEYS, id="router.hour"),
        Binding("d", "window('d')", "Day", tooltip="Chart the last day", group=WINDOW_KEYS, id="router.day"),
        Binding("m", "window('m')", "30 days", tooltip="Chart the last 30 days", group=WINDOW_KEYS, id="router.month"),
        Binding("c", "toggle_chart", "Calibration", tooltip="Calibration curve or escalation chart",
                id="router.calibration"),
        Binding("a", "apply_threshold", "Apply", tooltip="Apply the calibrated threshold to the router config",
                id="router.apply"),
        Binding("e", "evaluate", "Eval", tooltip="Evaluate the newest adapter version on the task's gate set",
                id="router.eval"),
        Binding("p", "promote", "Promote", tooltip="Promote the newest adapter version (the gate decides)",
                id="router.promote"),
        Binding("r", "rollback", "Rollback", tooltip="Roll the task back to its previous adapter version",
                id="router.rollback"),
    ]

    FOCUS = "#router-tasks"

    def __init__(self, refresh_s: float = 5.0) -> None:
        super().__init__(refresh_s)
        self.window = "d"
        self.show_calibration = False
        self.selected: str | None = None
        self.data: RouterData | None = None

    def compose_body(self) -> ComposeResult:
        table = DeckTable(COLUMNS, id="router-tasks")
        yield table
        with Horizontal(id="router-lower"):
            yield PlotextPlot(id="router-chart")
            yield Static("", id="router-detail")

    def no_store(self) -> None:
        self.query_one("#router-detail", Static).update("No store yet: the router's ledger lives in the store (see --store).")

    def load(self, store: Store) -> None:
        self._load(store, self.app.router_config_path(), self.selected, WINDOWS[self.window][1])

    @work(thread=True, exclusive=True, group="router")
    def _load(self, store: Store, config_path: Path | None, selected: str | None, window_s: int) -> None:
        try:
            data = load_router_data(store, config_path, selected, window_s, time.time())
        except Exception as exc:  # a locked store: show it, try again next tick
            data = RouterData([], [], None, config_path, error=f"router figures unavailable: {exc}")
        self.app.call_from_thread(while_attached(self, self._show), data)

    def _show(self, data: RouterData) -> None:
        self.loaded()
        self.data = data
        table = self.query_one("#router-tasks", DeckTable)
        keys = [r.name for r in data.rows]
        with self.app.batch_update():
            table.set_rows([(row.name, self._cells(row)) for row in data.rows])
        if self.selected is None and keys:
            self.selected = keys[0]
        self._draw()

    def _cells(self, r: TaskRow) -> list[Any]:
        style = "bold red" if r.alert else ""
        name = Text(("▲ " if r.alert else "  ") + r.name, style=style)
        return [
            name, f"{r.req_1h:,}", Text(_pct(r.rate_1h), style=style), _pct(r.rate_24h), _pct(r.rate_30d),
            _pct(r.baseline), f"{_ms(r.p50_slm)}/{_ms(r.p95_slm)}", f"{_ms(r.p50_frontier)}/{_ms(r.p95_frontier)}",
        ]

    def _draw(self) -> None:
        """The chart of the task under the cursor and its figures beside it."""
        data = self.data
        if data is None:
            return
        plot = self.query_one("#router-chart", PlotextPlot)
        plt = plot.plt
        plt.clear_figure()
        row = next((r for r in data.rows if r.name == self.selected), None)
        detail = self.query_one("#router-detail", Static)
        if row is None:
            backlog = f"\n[b red]ledger: {data.ledger_backlog:,} request row(s) not yet in the store[/]" if data.ledger_backlog else ""
            detail.update((escape(data.error) if data.error else "No router traffic in the store yet. Start `fleetdeck proxy`.")
                          + backlog)
            plot.refresh()
            return
        if self.show_calibration:
            cal = data.calibration
            if cal:
                esc = [p[1] * 100 for p in cal["curve"]]
                acc = [p[2] * 100 for p in cal["curve"]]
                plt.plot(esc, acc, marker="braille")
                plt.title(f"{row.name}: accuracy vs escalation (calibrated {local_time(cal['ts'], '%Y-%m-%d')})")
                plt.xlabel("escalated %")
            else:
                fit_title(plt, plot, f"{row.name}: no calibration yet (fleetdeck calibrate {row.name} --eval FILE)",
                          f"{row.name}: no calibration yet", "no calibration yet")
        else:
            label, _ = WINDOWS[self.window]
            xs = [(b - time.time()) / 3600 for b, _, _ in data.series]
            ys = [100 * e / n if n else 0.0 for _, n, e in data.series]
            if xs:
                plt.plot(xs, ys, marker="braille", color="cyan")
                if row.baseline is not None:
                    plt.hline(row.baseline * 100, "green")
                    plt.hline(row.baseline * 100 + row.drift_pp, "red")
                for p in data.promotions:  # each promotion or rollback in the window, where it happened
                    x = (p["ts"] - time.time()) / 3600
                    if xs[0] <= x <= 0:
                        plt.vline(x, "magenta")
            fit_title(plt, plot, f"{row.name}: escalation % ({label}; green baseline, red alert, magenta promotions)",
                      f"{row.name}: escalation % ({label})", "escalation %")
            # Past times as "30d ago" ... "now", not negative hours.
            window_s = WINDOWS[self.window][1]
            plt.xlim(-window_s / 3600, 0)  # the whole window, even where the ledger starts later
            plt.xticks(*ago_ticks(window_s))
        plot.refresh()
        conf = sparkline(row.confidence_hist, len(row.confidence_hist), top=max(row.confidence_hist or [1]) or 1)
        lines = [
            f"[b]{row.name}[/b]" + ("  [b red]DRIFT[/]" if row.alert else ""),
            f"threshold {row.threshold if row.threshold is not None else 'n/a'}",
            f"recent {_pct(row.recent)} vs baseline {_pct(row.baseline)}",
            f"alert above +{row.drift_pp:g} pp",
            f"confidence 0→1 (24h): {conf}",
        ]
        if row.window == "whole_answer":  # said where the operator looks: such a task's streams buffer
            lines.append("streamed: decided on the whole answer [b]— buffers it[/b] (set confidence_window_tokens)")
        elif row.window:
            lines.append(f"streamed: decided on the {row.window.replace('_', ' ')}, then relayed")
        if row.escalations_24h:
            lines.append("escalated (24h): " + ", ".join(f"{k} {v:,}" for k, v in row.escalations_24h.items()))
        lines.extend(self._version_lines(row, data))
        cal = data.calibration
        if self.show_calibration and not cal:  # what the short chart title cannot say at 80 columns; on top,
            # where 24 rows still show it
            lines.insert(1, f"no calibration yet: `fleetdeck calibrate {escape(row.name)} --eval FILE`")
        if cal and cal.get("threshold") is not None:
            lines.append(f"calibrated threshold {cal['threshold']:.3f} → {cal['escalation_rate'] * 100:.1f}% esc at "
                         f"{cal['target_accuracy'] * 100:.0f}% acc (a: apply)")
        if data.error:
            lines.append(f"[red]{escape(data.error)}[/]")
        if data.ledger_backlog:
            lines.append(f"[b red]ledger: {data.ledger_backlog:,} request row(s) not yet in the store[/] (the proxy "
                         "cannot write it, or stopped first; see its log and /health)")
        detail.update("\n".join(lines))

    def _version_lines(self, row: TaskRow, data: RouterData) -> list[str]:
        label = WINDOWS[self.window][0]
        lines = [f"model now [b]{row.slm_model or 'n/a'}[/b]"]
        if data.window_totals is not None:
            n, esc = data.window_totals  # the same rollups as the table's 1h/24h/30d columns
            lines.append(f"{label}: {_pct(esc / n if n else None)} escalated of {n:,}")
        if data.versions:
            kept = sum(v["requests"] for v in data.versions)
            # Per version from the ledger's request rows, which are pruned sooner than the rollups: say so
            # when they cover less of the window than the figure above.
            scope = f"{label}" if data.window_totals is None or kept == data.window_totals[0] else \
                f"{label}, the {kept:,} request rows kept"
            lines.append(f"by version ({scope}): " + " · ".join(
                f"{v['model']} {_pct(v['escalation_rate'])} of {v['requests']:,}" for v in data.versions))
        last = data.promotions[0] if data.promotions else None
        if last:
            lines.append(f"{last['kind']} {last['from_model']} → {last['to_model']} {local_time(last['ts'], '%m-%d %H:%M')}"
                         f" by {last['actor']}")
            if row.alert and last["kind"] == "promote" and last["to_model"] == row.slm_model:
                lines.append(f"[b red]drifting since {last['to_model']} was promoted: r rolls back to {last['from_model']}[/]")
        return lines

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is not None and event.row_key.value != self.selected:
            self.selected = event.row_key.value
            self.loaded()  # a new selection is worth a load now, not at the next tick
            self.reload()

    def action_window(self, key: str) -> None:
        self.window = key
        self.reload()

    def action_toggle_chart(self) -> None:
        self.show_calibration = not self.show_calibration
        self._draw()

    def action_apply_threshold(self) -> None:
        data = self.data
        cal = data.calibration if data else None
        path = data.config_path if data else None
        if self.app.options.config.read_only:
            self.notify("Read-only mode: thresholds are not changed.", severity="warning")
            return
        # Which of the two is missing, said: "..., or no router config" left the demo's operator (whose
        # router config exists) guessing.
        if path is None or not path.exists():
            self.notify(f"No router config to write a threshold to ({path or 'none is configured'}).",
                        severity="warning")
            return
        if not cal or cal.get("threshold") is None:
            task = self.selected or "this task"
            self.notify(f"No calibrated threshold for {task} yet: `fleetdeck calibrate {task} --eval FILE` makes one.",
                        severity="warning")
            return
        task, value = cal["task"], float(cal["threshold"])

        def done(ok: bool | None) -> None:
            if ok:
                self._write_threshold(path, task, value)

        self.app.push_screen(ConfirmScreen(f"Set {task}'s threshold to {value:.4f} in {path}?"), done)

    @work(thread=True, exclusive=True, group="router-write")
    def _write_threshold(self, path: Path, task: str, value: float) -> None:
        from engine.audit import trail as audit
        from engine.router.config import set_task_threshold

        try:
            set_task_threshold(path, task, value)
        except (KeyError, ValueError, OSError, audit.ReadOnlyError) as exc:  # read-only: refused and recorded
            self.app.call_from_thread(self.notify, f"Threshold not written: {exc}", severity="error")
            return
        self.app.call_from_thread(self.notify, f"{task}: threshold {value:.4f} written to {path}. Restart the proxy to use it.")
        self.app.call_from_thread(while_attached(self, self.reload))

    # -- adapter versions: evaluate, promote, roll back ------------------------------------------
    def _task_context(self) -> tuple[TaskRow, Path] | None:
        data = self.data
        row = next((r for r in data.rows if r.name == self.selected), None) if data else None
        path = data.config_path if data else None
        if row is None or path is None or not path.exists():
            self.notify("No task selected, or no router config to change.", severity="warning")
            return None
        return row, path

    def _candidate(self, row: TaskRow) -> str | None:
        """The newest registered version of the family the task serves now, if it is not the one serving."""
        from engine.adapters import registry as adapters
        from engine.adapters.versions import parse_ref, versions_of

        try:
            family, _ = parse_ref(row.slm_model or "")
        except adapters.AdapterError:
            return None
        mine = versions_of(list(self.app.options.config.adapter_roots), family)
        return mine[-1].name if mine and mine[-1].name != row.slm_model else None

    def action_evaluate(self) -> None:
        self._adapter_action("evaluate")

    def action_promote(self) -> None:
        self._adapter_action("promote")

    def action_rollback(self) -> None:
        ctx = self._task_context()
        if ctx is None:
            return
        row, path = ctx
        last = next((p for p in (self.data.promotions if self.data else []) if p["kind"] == "promote"), None)
        if last is None:
            self.notify(f"{row.name} has no promotion to roll back.", severity="warning")
            return
        self.app.push_screen(ConfirmScreen(f"Roll {row.name} back from {row.slm_model} to {last['from_model']}?"),
                             on_yes(lambda: self._run_adapter("rollback", row.name, None, path)))

    def _adapter_action(self, what: str) -> None:
        ctx = self._task_context()
        if ctx is not None:
            self._ask_adapter(what, ctx[0], ctx[1])

    @work(thread=True, exclusive=True, group="router-ask")
    def _ask_adapter(self, what: str, row: TaskRow, path: Path) -> None:
        # Scanning the adapter roots reads files: in a worker, then the question on the UI thread.
        version = self._candidate(row)
        if version is None:
            self.app.call_from_thread(self.notify, f"No newer version of {row.slm_model} in the adapter roots "
                                      "(fine-tune or `fleetdeck adapters import` one).", severity="warning")
            return
        question = (f"Evaluate {version} on {row.name}'s gate eval set?" if what == "evaluate" else
                    f"Promote {version} to serve {row.name} (now {row.slm_model})? The gate decides.")
        self.app.call_from_thread(self.app.push_screen, ConfirmScreen(question),
                                  lambda ok: self._run_adapter(what, row.name, version, path) if ok else None)

    @work(thread=True, exclusive=True, group="router-adapter")
    def _run_adapter(self, what: str, task: str, version: str | None, path: Path) -> None:
        from engine.adapters import registry as adapters
        from engine.adapters import promotion
        from engine.adapters.evaluation import compatible_servers, evaluate
        from engine.audit import trail as audit
        from engine.router.calibrate import EvalSetError
        from engine.router.config import load_router_config
        from store.config_files import ConfigError

        roots = list(self.app.options.config.adapter_roots)
        store = self.store
        if store is None:  # the store closed after the question was asked: nothing to act on
            self.app.call_from_thread(while_attached(self, self.no_store))
            return
        try:
            if what == "evaluate":
                t = load_router_config(path).task_by_name(task)
                if t is None or t.gate is None:
                    raise promotion.PromotionError(f"{task} has no [task.gate] with an eval set to score on")
                adapter = adapters.by_name(roots, version)
                servers = compatible_servers(store, adapter)
                if not servers:
                    raise promotion.PromotionError(f"no ready server can serve {adapter.name}")
                row = evaluate(store, adapter, servers[0], t.gate.eval_path(path), confidence=t.confidence,
                               target_accuracy=t.gate.target_accuracy)
                message = (f"{row['adapter']}: accuracy {row['accuracy'] * 100:.1f}% on {row['items']} items "
                           f"(gate {t.gate.target_accuracy * 100:.1f}%), p95 {row['p95_ms']:.0f} ms")
            elif what == "promote":
                message = "; ".join(promotion.promote(store, path, task, version or "", roots).lines())
            else:
                message = "; ".join(promotion.rollback(store, path, task, roots).lines())
        except (promotion.PromotionError, adapters.AdapterError, EvalSetError, ConnectionError, ConfigError,
                KeyError, audit.ReadOnlyError) as exc:  # read-only: refused and recorded by the engine
            self.app.call_from_thread(self.notify, f"{what}: {exc}", severity="error", timeout=12)
            return
        self.app.call_from_thread(self.notify, message, timeout=12)
        self.app.call_from_thread(while_attached(self, self.reload))
