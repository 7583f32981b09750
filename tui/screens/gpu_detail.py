"""Detail of one GPU (every field, throttle reasons, ECC, clocks, processes) and of one node."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Static

from fleet.model import GpuSnapshot, NodeSnapshot
from fleet.poller import FleetPoller
from tui.format import NA, celsius, gib, local_time, pct, sparkline, watts
from tui.screens.base import DeckScreen
from tui.table import NavTable


def _v(value: object, unit: str = "") -> str:
    return NA if value is None else f"{value}{unit}"


def gpu_fields(gpu: GpuSnapshot) -> list[tuple[str, str]]:
    throttle = NA if gpu.throttle_reasons is None else (", ".join(gpu.throttle_reasons) or "none")
    mem_free = gpu.memory_free_bytes
    fields = [
        ("GPU", f"{gpu.index} · {gpu.name}"),
        ("UUID", gpu.uuid),
        ("PCI bus", _v(gpu.pci_bus_id)),
        ("State", "LOST: " + (gpu.error or "") if gpu.lost else "ok"),
        ("VRAM used", f"{gib(gpu.memory_used_bytes, 2)} of {gib(gpu.memory_total_bytes, 2)} GiB"),
        ("VRAM free", f"{gib(mem_free, 2)} GiB"),
        ("Utilisation", f"GPU {pct(gpu.utilization_gpu_pct)} · memory {pct(gpu.utilization_memory_pct)}"),
        ("Temperature", celsius(gpu.temperature_c)),
        ("Power", f"{watts(gpu.power_draw_w)} of {watts(gpu.power_limit_w)} limit"),
        ("Fan", pct(gpu.fan_pct)),
        ("SM clock", f"{_v(gpu.clock_sm_mhz, ' MHz')} (max {_v(gpu.clock_sm_max_mhz, ' MHz')})"),
        ("Memory clock", _v(gpu.clock_mem_mhz, " MHz")),
        ("P-state", NA if gpu.performance_state is None else f"P{gpu.performance_state}"),
        ("Throttle reasons", throttle),
        (
            "ECC (volatile)",
            f"uncorrected {_v(gpu.ecc_uncorrected_volatile)} · corrected {_v(gpu.ecc_corrected_volatile)}",
        ),
        ("MIG", NA if gpu.mig_enabled is None else ("on" if gpu.mig_enabled else "off")),
    ]
    for mig in gpu.mig_devices:
        fields.append(
            (f"  MIG {mig.index}", f"{gib(mig.memory_used_bytes, 2)}/{gib(mig.memory_total_bytes, 2)} GiB · {mig.uuid}")
        )
    return fields


def fields_table(fields: list[tuple[str, str]]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for k, v in fields:
        table.add_row(k, v)
    return table


class GpuDetailScreen(DeckScreen):
    BINDINGS = [Binding("escape,backspace", "app.pop_screen", "Back", id="detail.back")]

    def __init__(self, gpu_key: str) -> None:
        super().__init__()
        self.gpu_key = gpu_key

    def compose_body(self) -> ComposeResult:
        with VerticalScroll(id="detail"):
            yield Static("", id="detail-fields")
            yield Static("", id="detail-history")
            yield Static("[b]Processes[/b]", classes="section")
            table = NavTable(id="detail-procs", cursor_type="row")
            table.add_columns("PID", "User", "GPU mem", "Kind", "Model / command")
            yield table

    def on_mount(self) -> None:
        self.render_fleet(self.app.poller)

    def _find(self, poller: FleetPoller) -> GpuSnapshot | None:
        node = self.gpu_key.split("/", 1)[0]
        snap = poller.latest.get(node)
        if snap is None:
            return None
        return next((g for g in snap.gpus if g.key == self.gpu_key), None)

    def render_fleet(self, poller: FleetPoller) -> None:
        gpu = self._find(poller)
        fields_widget = self.query_one("#detail-fields", Static)
        if gpu is None:
            fields_widget.update(f"GPU {self.gpu_key} is no longer reported by its node.")
            return
        fields_widget.update(fields_table(gpu_fields(gpu)))
        hist = poller.history.get(gpu.key)
        if hist:
            width = max(10, min(60, self.size.width - 16))
            self.query_one("#detail-history", Static).update(
                f"[b]Util[/b]   {sparkline(hist.util, width)}\n[b]VRAM %[/b] {sparkline(hist.mem_pct, width)}"
            )
        table = self.query_one("#detail-procs", DataTable)
        table.clear()
        for p in gpu.processes:
            what = p.model if p.kind in ("vllm", "finetune") and p.model else p.command
            if p.kind == "vllm" and p.port:
                what = f"{what} (port {p.port})"
            table.add_row(str(p.pid), p.user or NA, f"{gib(p.gpu_memory_bytes, 2)} GiB", p.kind, what[:80])


class NodeDetailScreen(DeckScreen):
    BINDINGS = [Binding("escape,backspace", "app.pop_screen", "Back", id="detail.back")]

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def compose_body(self) -> ComposeResult:
        with VerticalScroll(id="detail"):
            yield Static("", id="detail-fields")

    def on_mount(self) -> None:
        self.render_fleet(self.app.poller)

    def render_fleet(self, poller: FleetPoller) -> None:
        snap = poller.latest.get(self.node)
        widget = self.query_one("#detail-fields", Static)
        if snap is None:
            widget.update(f"Node {self.node} has not reported yet.")
            return
        widget.update(fields_table(node_fields(snap)))


def node_fields(snap: NodeSnapshot) -> list[tuple[str, str]]:
    host = snap.host
    fields = [
        ("Node", snap.node + ("  (SIMULATED)" if snap.simulated else "")),
        ("Last seen", local_time(snap.taken_at)),
        ("NVML", snap.nvml if snap.nvml == "ok" else f"unavailable: {snap.reason}"),
        ("Driver", _v(snap.driver_version)),
        ("CUDA (driver)", _v(snap.cuda_driver_version)),
        ("GPUs", str(len(snap.gpus))),
        ("CPU", f"{pct(host.cpu_pct)} of {_v(host.cpu_count)} cores"),
        ("Memory", f"{gib(host.memory_used_bytes)} of {gib(host.memory_total_bytes)} GiB"),
        ("Load", NA if host.load_avg is None else " ".join(f"{x:.2f}" for x in host.load_avg)),
    ]
    return fields
