"""The Fleet screen: every GPU of every node, one row each under a row per node.

Rows are keyed by node and GPU UUID; each refresh updates only the cells whose text changed, inside
one batch, so a 64-GPU fleet costs a few cell writes per second rather than a rebuilt table.
"""

from __future__ import annotations

from rich.console import Group
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from fleet.model import GpuProcess, GpuSnapshot, NodeSnapshot
from fleet.poller import FleetPoller
from tui.format import NA, bar, celsius, gib, sparkline
from tui.screens.base import DeckScreen, highlighted_key

# Five columns, not six: Textual's DataTable re-renders every cell on any update, so each column
# costs a cell render per row per refresh (bench/bench_fleet.py).
COLUMNS = (("gpu", "GPU"), ("vram", "VRAM GiB"), ("util", "Util"), ("temp", "Temp  Power"), ("work", "Work"))
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


class FleetTable(DataTable[str | Text]):
    # The table's own Enter, shown in the footer and with an id so it can be remapped.
    BINDINGS = [
        Binding("enter", "select_cursor", "Detail", id="fleet.detail"),
        Binding("j", "cursor_down", "Down", show=False, id="fleet.down"),
        Binding("k", "cursor_up", "Up", show=False, id="fleet.up"),
    ]


class FleetScreen(DeckScreen):

    def __init__(self) -> None:
        super().__init__()
        self._cells: dict[tuple[str, str], str] = {}
        self._order: list[str] = []

    def compose_body(self) -> ComposeResult:
        yield Static("", id="fleet-banner")
        table = FleetTable(id="fleet-table", cursor_type="row")
        for key, label in COLUMNS:
            table.add_column(label, key=key)
        yield table
        yield Static("", id="fleet-slurm")

    def on_mount(self) -> None:
        self.query_one("#fleet-banner").display = False
        self.query_one(DataTable).focus()
        slurm = self._slurm_settings()
        self.query_one("#fleet-slurm").display = slurm is not None
        if slurm is not None:  # who holds each GPU, as the scheduler sees it, under what NVML shows
            self.set_interval(5.0, self.refresh_slurm)
            self.refresh_slurm()
        poller = getattr(self.app, "poller", None)
        if poller is not None and poller.latest:
            self.render_fleet(poller)

    def _slurm_settings(self) -> object | None:
        settings = getattr(getattr(getattr(self.app, "options", None), "config", None), "slurm", None)
        return settings if settings is not None and settings.enabled else None

    @work(thread=True, exclusive=True, group="fleet-slurm")
    def refresh_slurm(self) -> None:
        from engine import slurm

        settings = self._slurm_settings()
        if settings is None:
            return
        view = Group(Text("Slurm", style="bold"), slurm.view_renderable(slurm.cluster(settings).to_json()))
        self.app.call_from_thread(self.query_one("#fleet-slurm", Static).update, view)

    def on_screen_resume(self) -> None:
        poller = getattr(self.app, "poller", None)
        if poller is not None and poller.latest:
            self.render_fleet(poller)

    @property
    def table(self) -> DataTable[str | Text]:
        return self.query_one("#fleet-table", DataTable)

    def _work_width(self) -> int:
        # What is left of the screen after the fixed columns, their padding and the scrollbar.
        return max(12, self.size.width - 58)

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
        table = self.table
        keys = [k for k, _ in wanted]
        with self.app.batch_update():
            if keys != self._order:
                # The set of nodes or GPUs changed: rebuild once, keeping the cursor on the same row.
                current = self.selected_key()
                table.clear()
                self._cells.clear()
                for key, cells in wanted:
                    table.add_row(*(cells[c] for c, _ in COLUMNS), key=key)
                    for c, _ in COLUMNS:
                        self._cells[(key, c)] = str(cells[c])
                self._order = keys
                if current in keys:
                    table.move_cursor(row=keys.index(current))
            else:
                for key, cells in wanted:
                    for c, _ in COLUMNS:
                        text = str(cells[c])
                        if self._cells.get((key, c)) != text:
                            table.update_cell(key, c, cells[c])
                            self._cells[(key, c)] = text
        self._render_banner(poller)

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
        self._open(event.row_key.value)

    def _open(self, key: str | None) -> None:
        if not key:
            return
        from tui.screens.gpu_detail import GpuDetailScreen, NodeDetailScreen

        if key.startswith("gpu:"):
            self.app.push_screen(GpuDetailScreen(key[4:]))
        elif key.startswith("node:"):
            self.app.push_screen(NodeDetailScreen(key[5:]))
