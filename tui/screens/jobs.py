"""The Jobs screen: fine-tunes with step/total, a progress bar, loss and learning rate, tokens/s,
elapsed and ETA, the loss chart, and the actions: start from a spec, cancel, resume, logs, and serve
the finished adapter into a compatible running server with one key."""

from __future__ import annotations

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

from tui.format import bar
from engine.nodes.ids import split_id
from tui.screens.base import PolledScreen, ask_to_prune, highlighted_key, nodes_away, on_yes, report_prune, store_of, while_attached
from tui.table import Col, DeckTable
from tui.screens.confirm import ConfirmScreen
from tui.screens.start_job import StartJobScreen

if TYPE_CHECKING:
    from store.db import Store

STATE_STYLE = {"running": "bold cyan", "finished": "bold green", "failed": "bold red", "cancelled": "yellow"}


def _dur(s: float | None) -> str:
    if s is None:
        return "n/a"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# Column, label, priority (the highest hides first when narrow: at 80 columns the job, its node,
# state, loss, LR and ETA stay; a long job id is cut in its middle before any of them hides or is cut).
COLUMNS = (Col("id", "Job", give=14), Col("node", "Node"), Col("state", "State"), Col("gpus", "GPU", 4),
           Col("progress", "Progress", 3), Col("step", "Step", 5), Col("loss", "Loss"), Col("lr", "LR", 2),
           Col("tps", "Tok/s", 6), Col("elapsed", "Elapsed", 7), Col("eta", "ETA", 1))


class JobsScreen(PolledScreen):
    MUTATING = frozenset({"start", "cancel", "resume", "serve", "prune"})
    BINDINGS = [
        Binding("s", "start", "Start", id="jobs.start"),
        Binding("c", "cancel", "Cancel", id="jobs.cancel"),
        Binding("r", "resume", "Resume", id="jobs.resume"),
        Binding("l", "logs", "Logs", id="jobs.logs"),
        Binding("v", "serve", "Serve", tooltip="Load the finished adapter into a compatible server", id="jobs.serve"),
        Binding("p", "prune", "Prune", tooltip="Forget finished, failed and cancelled jobs (folders stay)",
                id="jobs.prune"),
    ]

    FOCUS = "#jobs-table"

    def __init__(self, refresh_s: float = 2.0) -> None:
        super().__init__(refresh_s)
        self.records: dict[str, Any] = {}
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.away: set[str] = set()  # jobs of a node not answering now, shown from their last listing

    def compose_body(self) -> ComposeResult:
        table = DeckTable(COLUMNS, id="jobs-table")
        yield table
        with Horizontal(id="jobs-lower"):
            yield PlotextPlot(id="jobs-chart")
            yield Static("", id="jobs-detail")

    def load(self, store: Store) -> None:
        self._load(store)

    @work(thread=True, exclusive=True, group="jobs")
    def _load(self, store: Store) -> None:
        from engine.nodes.select import remote_ops
        from fleet.remote import AgentError

        try:
            found = self._local().jobs()
        except Exception as exc:
            self.app.call_from_thread(self.notify, f"jobs unavailable: {exc}", severity="error")
            found = []
        away = nodes_away(self._sources())
        for node in remote_ops(self._sources()):
            try:
                found += node.jobs()  # read by that node's agent, ids as @node:id
            except AgentError:
                away.add(node.name)
        recs = [p.rec for p in found]
        events = {p.rec.id: p.events for p in found}
        self.app.call_from_thread(while_attached(self, self._show), recs, events, away)

    def _sources(self) -> list[Any]:
        return list(getattr(getattr(self.app, "poller", None), "sources", []))

    def _local(self) -> Any:
        from engine.nodes.local import LocalOps

        config = self.app.options.config
        return LocalOps(store_of(self.app), list(config.adapter_roots), folders=self.app.options.folders,
                        slurm_settings=getattr(config, "slurm", None))

    def _show(self, recs: list[Any], events: dict[str, list[dict[str, Any]]],
              away: set[str] | frozenset[str] = frozenset()) -> None:
        self.loaded()
        # A node that is not answering (reconnecting) keeps its rows, marked: they vanished before, and a
        # key pressed then (r resumes at once) acted on whatever row slid under the cursor.
        listed = {r.id for r in recs}
        kept = [r for jid, r in self.records.items() if jid not in listed and split_id(jid)[0] in away]
        self.away = {r.id for r in kept}
        events = {**{r.id: self.events.get(r.id, []) for r in kept}, **events}
        recs = [*recs, *kept]
        self.records = {r.id: r for r in recs}
        self.events = events
        table = self.query_one("#jobs-table", DeckTable)
        with self.app.batch_update():
            table.set_rows([(r.id, self._cells(r)) for r in recs])
        self._detail()

    def _cells(self, r: Any) -> list[Any]:
        from engine.finetune.jobs import JobState  # (lazily: loaded by the poll already)

        steps = [e for e in self.events.get(r.id, []) if e.get("event") == "step"]
        last = steps[-1] if steps else None
        # A node's job shows its own id: the Node column beside it names the node (the row's key, the
        # detail and the messages keep `@node:id`). Short: 80 columns.
        name = (split_id(r.id)[1] or r.id) + (" (sim)" if r.spec.get("backend") == "simulated" else "")
        state = Text(r.state, style=STATE_STYLE.get(r.state, ""))
        if r.id in self.away:
            state = Text("unreachable", style="dim")
        sl = r.slurm
        if sl is not None and r.state == JobState.RUNNING and sl.state != "RUNNING":  # queued (or held) in Slurm, not training
            state = Text(sl.state.lower(), style="yellow")
        node = split_id(r.id)[0] or r.node
        if last is None:
            return [name, node, state, str(r.gpus), "", "", "", "", "", "", ""]
        frac = last["step"] / last["total_steps"] if last.get("total_steps") else None
        return [
            name, node, state, str(r.gpus), Text(bar(frac, 6), style="cyan") + Text(f" {frac * 100:3.0f}%" if frac is not None else ""),
            f"{last['step']}/{last['total_steps']}", "n/a" if last.get("loss") is None else f"{last['loss']:.4f}",
            "n/a" if last.get("learning_rate") is None else f"{last['learning_rate']:.2e}",
            "n/a" if last.get("tokens_per_s") is None else f"{last['tokens_per_s']:,.0f}",
            _dur(last.get("elapsed_s")), _dur(last.get("eta_s")) if r.state == JobState.RUNNING else "",
        ]

    def selected(self) -> Any:
        key = highlighted_key(self.query_one("#jobs-table", DataTable))
        return self.records.get(key) if key else None

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._detail()

    def on_deck_table_filtered(self, event: DeckTable.Filtered) -> None:
        self._detail()

    def _detail(self) -> None:
        r = self.selected()
        detail = self.query_one("#jobs-detail", Static)
        plot = self.query_one("#jobs-chart", PlotextPlot)
        plt = plot.plt
        plt.clear_figure()
        if r is None:
            hidden = self.query_one("#jobs-table", DeckTable).hidden_by_filter()
            detail.update(Text(f"Nothing shown: {hidden}.") if hidden else
                          "No fine-tunes yet. Press [b]s[/b] to start one from a job spec.")
            plot.refresh()
            return
        steps = [e for e in self.events.get(r.id, []) if e.get("event") == "step" and e.get("loss") is not None]
        if steps:
            plt.plot([e["step"] for e in steps], [e["loss"] for e in steps], marker="braille", color="cyan")
        plt.title(f"{r.name}: training loss")
        plt.xlabel("step")
        plot.refresh()
        detail.update("\n".join(self._detail_lines(r)))

    def _detail_lines(self, r: Any) -> list[str]:
        """The detail of a job, as markup: beside the chart, and whole in a view of its own (Enter)."""
        from engine.finetune.jobs import JobState  # (lazily: loaded by the poll already)

        spec = r.spec
        if spec.get("kind") in ("merge", "quantize"):  # a model job: what it reads and writes, and its stage
            stage = next((e.get("note") for e in reversed(self.events.get(r.id, [])) if e.get("note")), "starting")
            lines = [f"[b]{r.id}[/b]", f"{spec['kind']} of {spec.get('name')} -> {spec.get('out')}", f"stage: {stage}"]
        else:
            lines = [
                f"[b]{r.id}[/b]" + ("  [yellow]SIMULATED[/]" if spec.get("backend") == "simulated" else ""),
                f"backend {spec.get('backend')} · base {Path(str(spec.get('base_model'))).name}",
                f"LoRA r={spec.get('lora_rank')} alpha={spec.get('lora_alpha')} · "
                + ("4-bit base (QLoRA)" if spec.get("load_in_4bit") else "16-bit base"),  # it read "4-bit True"
                f"dataset {Path(str(spec.get('dataset'))).name}",
            ]
        sl = r.slurm
        if sl is not None:
            why = f" ({sl.reason})" if sl.reason not in (None, "None") else ""
            lines.append(escape(f"Slurm job {sl.id}: {sl.state}{why} · node {sl.node or '-'} · "
                                f"{sl.elapsed or '0:00'} of {sl.time_limit or 'no limit'}"))
        if r.reason:
            lines.append(f"[{'red' if r.state == JobState.FAILED else 'dim'}]{escape(r.reason)}[/]")
        return lines

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter on a job: its whole detail. Beside the chart at 80x24 a cancelled job's reason (how to
        resume it) ran past the bottom edge once the table held a few rows."""
        from tui.screens.logs import LogScreen

        r = self.records.get(str(event.row_key.value))
        if r is None:
            return
        text = Text.from_markup("\n".join(self._detail_lines(r))).plain
        self.app.push_screen(LogScreen(f"job {r.id}", "", read=lambda: text))

    # -- actions --------------------------------------------------------------------------------
    def _none(self, what: str) -> None:
        """A key on no row: says why there is none (nothing listed, or a filter hiding every row)."""
        hidden = self.query_one("#jobs-table", DeckTable).hidden_by_filter()
        self.notify(f"{what}: {hidden or 'none is listed here'}.", severity="warning")

    def _guard(self) -> bool:
        if getattr(self.app.options.config, "read_only", False):
            self.notify("Read-only mode: jobs are not started, cancelled or served.", severity="warning")
            return False
        return True

    def action_start(self) -> None:
        if self._guard():
            self.app.push_screen(StartJobScreen(), self._started)

    def _started(self, msg: str | None) -> None:
        if msg:
            self.notify(msg)
            self.reload()

    def action_cancel(self) -> None:
        from engine.finetune.jobs import JobState  # (lazily: loaded by the poll already)

        r = self.selected()
        if r is None:
            self._none("No job to cancel")
            return
        if not self._guard():
            return
        if r.state != JobState.RUNNING:  # said, not ignored: a key that does nothing reads as a broken key
            self.notify(f"{r.id} is {r.state}: only a running job can be cancelled.", severity="warning")
            return
        self.app.push_screen(ConfirmScreen(f"Cancel {r.id}? It saves a checkpoint at the end of this step."),
                             on_yes(lambda: self._act("cancel", r)))

    def action_resume(self) -> None:
        from engine.finetune.jobs import JobState  # (lazily: loaded by the poll already)

        r = self.selected()
        if r is None:
            self._none("No job to resume")
            return
        if not self._guard():
            return
        if r.state not in (JobState.CANCELLED, JobState.FAILED):
            self.notify(f"{r.id} is {r.state}: only a cancelled or failed job resumes.", severity="warning")
            return
        self._act("resume", r)

    @work(thread=True, group="jobs-action")
    def _act(self, what: str, r: Any) -> None:
        from engine.audit import trail as audit
        from engine.finetune import jobs
        from engine.nodes.select import ops_for
        from fleet.remote import AgentError

        try:
            ops, jid = ops_for(self._sources(), self._local(), r.id)
            done = ops.cancel_job(jid) if what == "cancel" else ops.resume_job(jid)
            msg = f"{done.id}: {done.state}"
        except (jobs.JobError, AgentError, audit.ReadOnlyError) as exc:
            msg = str(exc)
        self.app.call_from_thread(self.notify, msg)
        self.app.call_from_thread(while_attached(self, self.reload))

    def action_prune(self) -> None:
        from engine.finetune.jobs import ENDED

        ended = [r.id for r in self.records.values() if r.state in ENDED
                 and split_id(r.id)[0] is None]
        if not self._guard():
            return
        ask_to_prune(self, ended, "job(s)", "Their folders and adapters stay on disk; a pruned cancelled job cannot "
                     "be resumed here.", "No finished, failed or cancelled jobs on this host to prune.", self._prune)

    @work(thread=True, group="jobs-action")
    def _prune(self) -> None:
        from engine.nodes.ops import pruned

        report_prune(self, lambda: pruned("jobs", self._local().prune_jobs()))

    def action_logs(self) -> None:
        r = self.selected()
        if r is None:
            self._none("No job, so no log")
        else:
            from engine.nodes.select import ops_for
            from fleet.remote import AgentError
            from tui.screens.logs import LogScreen

            try:
                ops, jid = ops_for(self._sources(), self._local(), r.id)
            except AgentError as exc:
                self.notify(str(exc), severity="warning")
                return
            self.app.push_screen(LogScreen(r.id, r.log_path, lambda: ops.tail_log("job", jid)))

    def action_serve(self) -> None:
        """Load the finished job's adapter into the first ready server of its node that can take it."""
        from engine.finetune.jobs import JobState  # (lazily: loaded by the poll already)

        r = self.selected()
        if r is None:
            self._none("No job to serve")
            return
        if not self._guard():
            return
        adapter_path = r.outputs.adapter_path
        if r.state != JobState.FINISHED or not adapter_path:
            self.notify("Only a finished job has an adapter to serve.", severity="warning")
            return
        self._serve(r.id, Path(adapter_path).name)

    @work(thread=True, group="jobs-action")
    def _serve(self, job_id: str, adapter: str) -> None:
        from engine.adapters import registry as adapters
        from engine.audit import trail as audit
        from engine.nodes.select import ops_for, serve_adapter
        from fleet.remote import AgentError

        try:
            ops, _ = ops_for(self._sources(), self._local(), job_id)
            msg = serve_adapter(ops, adapter)
        except (adapters.AdapterError, AgentError, audit.ReadOnlyError) as exc:
            self.app.call_from_thread(self.notify, str(exc), severity="warning")
            return
        self.app.call_from_thread(self.notify, msg)
