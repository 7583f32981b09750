"""The Fleet screen: every GPU of every node, one row each under a row per node.

Rows are keyed by node and GPU UUID; each refresh updates only the cells whose text changed, inside
one batch, so a 64-GPU fleet costs a few cell writes per second rather than a rebuilt table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Group
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from fleet.model import GpuProcess, GpuSnapshot, NodeSnapshot
from fleet.poller import FleetPoller
from tui.format import NA, bar, celsius, gib, sparkline
from tui.screens.base import DeckScreen, highlighted_key, on_yes
from tui.table import Col, DeckTable

if TYPE_CHECKING:
    from engine.nodes.processes import KillRequest
    from fleet.config import SlurmSettings  # at run time only when a kill is asked (start-up stays light)

# Five columns, not six: Textual's DataTable re-renders every cell on any update, so each column
# costs a cell render per row per refresh (bench/bench_fleet.py). The third field is the column's
# priority: when narrow, Temp/Power goes first, then the utilisation sparkline column; GPU, VRAM and
# Work always stay.
COLUMNS = (("gpu", "GPU", 0), ("vram", "VRAM GiB", 0), ("util", "Util", 1), ("temp", "Temp  Power", 2),
           ("work", "Work", 0))
WORK_MIN = 24  # Work takes what is left, and no less than this: narrower, Temp and then Util hide
SPARK_WIDTH = 5
BAR_WIDTH = 6


def short_gpu_name(name: str) -> str:
    for prefix in ("NVIDIA GeForce ", "NVIDIA "):
        if name.startswith(prefix):
            name = name[len(prefix):]
    for noise in (" HBM3e", " HBM3", " PCIe", "-SXM4", "-SXM5", "-PCIE"):
        name = name.replace(noise, "")
    return name[:12]


def describe_work(procs: list[GpuProcess]) -> str:
    if not procs:
        return "idle"
    labels = []
    for p in procs:
        if p.kind == "vllm":
            labels.append(f"vllm {p.model or '?'}" + (f" :{p.port}" if p.port else ""))
        elif p.kind == "finetune":
            labels.append(f"finetune {p.model or ''}".rstrip())
        elif p.kind == "proxy":
            labels.append("fleetdeck proxy")
        else:
            labels.append(p.command.split(" ")[0].rsplit("/", 1)[-1] or f"pid {p.pid}")
    return ", ".join(labels)


def gpu_cells(gpu: GpuSnapshot, util_hist: list[float | None], work_width: int) -> dict[str, str | Text]:
    if gpu.lost:
        return {
            "gpu": f" {gpu.index} {short_gpu_name(gpu.name)}",
            "vram": Text("LOST", style="bold red"),
            "util": NA,
            "temp": NA,
            "work": Text((gpu.error or "GPU lost")[:work_width], style="red"),
        }
    total, used = gpu.memory_total_bytes, gpu.memory_used_bytes
    frac = used / total if total and used is not None else None
    vram_style = "red" if frac is not None and frac > 0.97 else ("yellow" if frac and frac > 0.9 else "green")
    vram = Text(bar(frac, BAR_WIDTH), style=vram_style)
    vram.append(f" {gib(used)}/{gib(total, 0)}")
    util = gpu.utilization_gpu_pct
    util_text = Text(f"{util:3.0f}%" if util is not None else " n/a")
    util_text.append(" " + sparkline(util_hist, SPARK_WIDTH), style="cyan")
    temp = gpu.temperature_c
    temp_text = Text(celsius(temp).rjust(4), style="red" if temp is not None and temp >= 85 else "")
    # The limit is on the detail screen; here the draw turns yellow within 5% of it.
    power = Text((NA if gpu.power_draw_w is None else f"{gpu.power_draw_w:.0f} W").rjust(6))
    if gpu.power_limit_w and gpu.power_draw_w is not None and gpu.power_draw_w >= 0.95 * gpu.power_limit_w:
        power.stylize("yellow")
    work = describe_work(gpu.processes)
    if gpu.mig_enabled:
        work = f"MIG x{len(gpu.mig_devices)} · " + work
    if gpu.error and gpu.error.startswith("stale"):
        work = gpu.error  # the node is not answering: these are its last known figures
    if len(work) > work_width:
        work = work[: work_width - 1] + "…"
    return {
        "gpu": f" {gpu.index} {short_gpu_name(gpu.name)}",
        "vram": vram,
        "util": util_text,
        "temp": temp_text + Text(" ") + power,
        "work": work,
    }


def node_cells(snap: NodeSnapshot, work_width: int) -> dict[str, str | Text]:
    label = Text("▾ ", style="bold")
    label.append(snap.node[:14], style="bold")
    if snap.nvml != "ok":
        reason = snap.reason or ""
        if snap.link == "unreachable":
            state, style = "UNREACHABLE", "bold red"
        elif snap.link == "connecting":
            state, style = "CONNECTING", "bold yellow"
        elif snap.link == "incompatible":
            state, style = "INCOMPATIBLE", "bold red"
        else:
            state, style, reason = "NO NVML", "bold red", "no NVIDIA driver: press Enter"
        return {
            "gpu": label,
            "vram": Text(state, style=style),
            "util": "",
            "temp": "",
            "work": Text(reason[:work_width], style="red" if "red" in style else "yellow"),
        }
    utils = [g.utilization_gpu_pct for g in snap.gpus if g.utilization_gpu_pct is not None]
    avg = f"{sum(utils) / len(utils):3.0f}%" if utils else ""
    used = sum(g.memory_used_bytes or 0 for g in snap.gpus)
    total = sum(g.memory_total_bytes or 0 for g in snap.gpus)
    driver = f"driver {snap.driver_version}" if snap.driver_version else ""
    tag = " SIM" if snap.simulated else ""
    return {
        "gpu": label,
        "vram": Text(f"{len(snap.gpus)} GPU · {gib(used, 0)}/{gib(total, 0)}", style="dim"),
        "util": Text(avg, style="dim"),
        "temp": "",
        "work": Text((driver + tag)[:work_width], style="dim"),
    }


class FleetTable(DeckTable):
    # The table's own Enter, shown in the footer and with an id so it can be remapped.
    BINDINGS = [Binding("enter", "select_cursor", "Detail", id="fleet.detail")]


# The processes of the GPU (or node) under the cursor, nvitop-style: what holds each GPU, and a guarded kill.
PROC_COLUMNS = (Col("gpu", "GPU"), Col("pid", "PID"), Col("user", "User", 2), Col("mem", "GPU mem"),
                Col("kind", "Kind", 3), Col("command", "Command / attribution", flex=20))


def process_rows(snap: NodeSnapshot, gpu_key: str | None) -> list[tuple[str, list[str | Text]]]:
    rows: list[tuple[str, list[str | Text]]] = []
    for g in snap.gpus:
        if gpu_key is not None and g.key != gpu_key:
            continue
        for p in g.processes:
            what = describe_work([p]) if p.kind != "other" else p.command
            if p.kind != "other" and p.command:
                what = f"{what} · {p.command}"
            rows.append((f"{g.key}|{p.pid}", [str(g.index), str(p.pid), p.user or NA,
                                              f"{gib(p.gpu_memory_bytes, 1)} GiB", p.kind, what]))
    return rows


class FleetScreen(DeckScreen):
    MUTATING = frozenset({"kill"})
    BINDINGS = [Binding("ctrl+k", "kill", "Kill process", tooltip="Kill the process under the process table's cursor (asks first; audited)", id="fleet.kill")]
    PALETTE_EXTRA = (("Processes (tab)", "Fleet: the process table of the GPU under the cursor", "focus_procs"),)

    def __init__(self) -> None:
        super().__init__()
        self._order: list[str] = []
        self._procs_of: tuple[str, str | None] | None = None

    def compose_body(self) -> ComposeResult:
        yield Static("", id="fleet-banner")
        yield FleetTable(tuple(Col(key, label, prio, WORK_MIN if key == "work" else None)
                               for key, label, prio in COLUMNS), id="fleet-table")
        yield DeckTable(PROC_COLUMNS, id="fleet-procs")
        yield Static("", id="fleet-slurm")

    def on_mount(self) -> None:
        self.query_one("#fleet-banner").display = False
        self.table.focus()
        slurm = self._slurm_settings()
        self.query_one("#fleet-slurm").display = slurm is not None
        if slurm is not None:  # who holds each GPU, as the scheduler sees it, under what NVML shows
            self.set_interval(5.0, self.refresh_slurm)
            self.refresh_slurm()
        poller = self.app.poller
        if poller.latest:
            self.render_fleet(poller)

    def _slurm_settings(self) -> SlurmSettings | None:
        settings = self.app.options.config.slurm
        return settings if settings.enabled else None

    @work(thread=True, exclusive=True, group="fleet-slurm")
    def refresh_slurm(self) -> None:
        from engine.slurm import client as slurm

        settings = self._slurm_settings()
        if settings is None:
            return
        view = Group(Text("Slurm", style="bold"), slurm.view_renderable(slurm.cluster(settings).to_json()))
        self.app.call_from_thread(self.query_one("#fleet-slurm", Static).update, view)

    def on_screen_resume(self) -> None:
        poller = self.app.poller
        if poller.latest:
            self.render_fleet(poller)

    @property
    def table(self) -> FleetTable:
        return self.query_one("#fleet-table", FleetTable)

    @property
    def procs(self) -> DeckTable:
        return self.query_one("#fleet-procs", DeckTable)

    def _work_width(self) -> int:
        # The Work column is the table's flex column: it is cut to what is left when shown (tui/table.py).
        return 200



    def _wanted_rows(self, poller: FleetPoller) -> list[tuple[str, dict[str, str | Text]]]:
        width = self._work_width()
        rows: list[tuple[str, dict[str, str | Text]]] = []
        for name in sorted(poller.latest):
            snap = poller.latest[name]
            rows.append((f"node:{name}", node_cells(snap, width)))
            for gpu in snap.gpus:
                hist = poller.history.get(gpu.key)
                util_hist = list(hist.util) if hist else []
                rows.append((f"gpu:{gpu.key}", gpu_cells(gpu, util_hist, width)))
        return rows

    def render_fleet(self, poller: FleetPoller) -> None:
        wanted = self._wanted_rows(poller)
        groups = {key: key.split(":", 1)[1].split("/", 1)[0] for key, _ in wanted}
        with self.app.batch_update():
            self.table.set_rows([(key, [cells[c] for c, _, _ in COLUMNS]) for key, cells in wanted], groups)
            self._render_procs(poller)
        self._render_banner(poller)

    def _highlighted_node_gpu(self) -> tuple[str, str | None] | None:
        key = self.selected_key()
        if key is None:
            return None
        if key.startswith("gpu:"):
            gpu_key = key[4:]
            return gpu_key.split("/", 1)[0], gpu_key
        return key[5:], None

    def _render_procs(self, poller: FleetPoller) -> None:
        where = self._highlighted_node_gpu()
        snap = poller.latest.get(where[0]) if where else None
        rows = process_rows(snap, where[1]) if snap is not None and where is not None else []
        self.procs.set_rows(rows)
        title = "processes"
        if where is not None:
            gpu = next((g for g in snap.gpus if g.key == where[1]), None) if snap is not None else None
            title = f"processes on {where[0]}" + (f" GPU {gpu.index}" if gpu is not None else "")
            title += "  (simulated)" if snap is not None and snap.simulated else ""
            title += "  ·  Tab: into the table, ctrl+k: kill" if rows else "  ·  none"
        self.procs.border_title = title

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table is self.table:
            self._render_procs(self.app.poller)

    def _render_banner(self, poller: FleetPoller) -> None:
        banner = self.query_one("#fleet-banner", Static)
        down = [s for s in poller.latest.values() if s.nvml != "ok"]
        if not down:
            banner.display = False
            return
        lines = []
        for snap in down:
            host = snap.host
            mem = (
                f"memory {gib(host.memory_used_bytes)}/{gib(host.memory_total_bytes)} GiB"
                if host.memory_total_bytes
                else "memory n/a"
            )
            cpu = f"CPU {host.cpu_pct:.0f}% of {host.cpu_count} cores" if host.cpu_pct is not None else "CPU n/a"
            lines.append(f"[b]{snap.node}[/b]: {snap.reason or 'NVML unavailable'}\n  {cpu} · {mem}")
        banner.update("\n".join(lines))
        banner.display = True

    def selected_key(self) -> str | None:
        return highlighted_key(self.table)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.data_table is self.table:
            self._open(event.row_key.value)

    def action_focus_procs(self) -> None:
        self.procs.focus()

    # -- the guarded kill -----------------------------------------------------------------------
    def _selected_process(self) -> tuple[NodeSnapshot, tuple[GpuSnapshot, GpuProcess]] | None:
        """The process under the process table's cursor, and its node's snapshot."""
        key = self.procs.selected_key()
        poller = self.app.poller
        if key is None:
            return None
        gpu_key, _, pid = key.rpartition("|")
        snap = poller.latest.get(gpu_key.split("/", 1)[0])
        gpu = next((g for g in snap.gpus if g.key == gpu_key), None) if snap else None
        proc = next((p for p in gpu.processes if str(p.pid) == pid), None) if gpu else None
        if snap is None or gpu is None or proc is None:
            return None
        return snap, (gpu, proc)

    def action_kill(self) -> None:
        found = self._selected_process()
        if found is None:
            self.notify("No process to kill: the process table lists those of the GPU under the cursor "
                        "(Tab moves into it).", severity="warning")
            return
        from engine.nodes.processes import KillRequest
        from tui.screens.confirm import ConfirmScreen

        snap, (gpu, proc) = found
        req = KillRequest(node=snap.node, pid=proc.pid, gpu=str(gpu.index), command=proc.command, user=proc.user,
                          simulated=snap.simulated)
        if snap.simulated:  # refused whatever the answer: asked first, it said "audited" then refused
            self._kill(req)
            return
        question = (f"Kill pid {proc.pid} ({proc.user or 'unknown user'}) on {snap.node} GPU {gpu.index}?\n"
                    f"{proc.command[:160]}\nSIGTERM, then SIGKILL after 5 s. The kill is audited.")
        self.app.push_screen(ConfirmScreen(question), on_yes(lambda: self._kill(req)))

    @work(thread=True, group="fleet-kill")
    def _kill(self, req: KillRequest) -> None:
        from engine.audit import trail as audit
        from engine.nodes.local import LocalOps
        from engine.nodes.select import ops_named
        from engine.nodes.processes import KillError
        from fleet.remote import AgentError

        sources = list(self.app.poller.sources)
        local = LocalOps(self.app.store,  # type: ignore[arg-type]  # a kill reads no store (the audit trail is its
                         list(self.app.options.config.adapter_roots))  # record) and works with none open
        try:
            ops = ops_named(sources, local, req.node)
            message, severity = ops.kill_process(req), "information"
        except (KillError, AgentError, audit.ReadOnlyError) as exc:
            message, severity = str(exc), "warning"
        self.app.call_from_thread(self.notify, message, severity=severity, markup=False)
        self.app.call_from_thread(self.app.action_poll_now)

    def _open(self, key: str | None) -> None:
        if not key:
            return
        from tui.screens.gpu_detail import GpuDetailScreen, NodeDetailScreen

        if key.startswith("gpu:"):
            self.app.push_screen(GpuDetailScreen(key[4:]))
        elif key.startswith("node:"):
            self.app.push_screen(NodeDetailScreen(key[5:]))
