"""The Fit screen: will this model fit on this GPU, and how many requests will it hold.

The operator picks a model (catalogue name or local folder), a GPU of the live fleet (its free
memory counts, not just its size) or a card preset, TP, utilisation, context length and KV dtype.
The grid shows every KV dtype at 4k-128k, green where it fits (with its concurrency) and red where
it does not. Planning runs in a worker (a local model folder means reading files).
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.suggester import SuggestFromList
from textual.widgets import DataTable, Input, Label, Select, Static

from engine.kvfit.kv_cache import KV_DTYPES
from engine.kvfit.overhead import vllm_view_of
from engine.kvfit.plan import FIT_LENGTHS, FitRequest, FitResult
from tui.screens.base import DeckScreen, while_attached

GIB = 1024**3
# What vLLM sees as total memory on common cards (torch.cuda.mem_get_info), for planning off-host.
PRESETS = {
    "preset: H100 80GB (79.19 GiB)": 79.19,
    "preset: H200 141GB (139.8 GiB)": 139.8,
    "preset: A100 80GB (79.15 GiB)": 79.15,
    "preset: L40S 48GB (44.39 GiB)": 44.39,
    "preset: A10 24GB (22.06 GiB)": 22.06,
    "preset: RTX 4090 24GB (23.55 GiB)": 23.55,
    "preset: RTX 4080 16GB (15.99 GiB)": 15.99,
}
GRID_DTYPES = ("auto", "fp8", "nvfp4")


@dataclass
class GpuChoice:
    label: str
    total_bytes: int
    free_bytes: int | None = None
    used_bytes: int | None = None
    name: str = ""
    note: str | None = None  # e.g. that a MIG GPU was planned as its slice


def parse_fields(tp_text: str, util_text: str, len_text: str) -> tuple[int, float, int | None]:
    """(TP, utilisation, max len or None for the model's default) from the screen's fields, or ValueError with
    the one line the verdict shows. `fleetdeck fit` takes the same ranges (fleetdeck/cmd_fit.py)."""
    try:
        tp = int(tp_text)
        util = float(util_text)
        length = int(len_text) if len_text.strip() else None
    except ValueError:
        raise ValueError("TP, util and max len must be numbers") from None
    if tp < 1 or (length is not None and length < 1) or not 0 < util <= 1:  # NaN fails the util test too
        raise ValueError("TP and max len must be positive; util between 0 and 1")
    if tp > 1024 or (length is not None and length > 2**31 - 1):
        raise ValueError("TP is at most 1024 and max len at most 2,147,483,647, as `fleetdeck fit` takes them")
    return tp, util, length


def length_label(n: int) -> str:
    return f"{n // 1024}k"


class FitScreen(DeckScreen):
    BINDINGS = [
        Binding("ctrl+s", "plan", "Plan", id="fit.plan"),
        Binding("escape", "app.show_fleet", "Fleet", id="fit.back"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.choices: dict[str, GpuChoice] = {}
        self.last_result: FitResult | None = None
        self.last_grid: dict[str, dict[int, FitResult]] | None = None
        self.error: str | None = None

    def compose_body(self) -> ComposeResult:
        from engine.kvfit.catalogue import list_models

        with VerticalScroll(id="fit"):
            with Horizontal(classes="fit-row"):
                yield Label("Model ", classes="fit-label")
                yield Input(
                    value="meta-llama/Llama-3.1-8B-Instruct",
                    placeholder="repo id or /path/to/model",
                    suggester=SuggestFromList(list_models(), case_sensitive=False),
                    id="fit-model",
                    compact=True,
                )
                yield Select([(d, d) for d in KV_DTYPES], value="auto", allow_blank=False, id="fit-kv", compact=True)
            with Horizontal(classes="fit-row"):
                yield Label("GPU   ", classes="fit-label")
                yield Select([], id="fit-gpu", compact=True, prompt="GPU")
            with Horizontal(classes="fit-row"):
                yield Label("TP ", classes="fit-label")
                yield Input(value="1", id="fit-tp", type="integer", compact=True, classes="fit-num")
                yield Label(" util ", classes="fit-label")
                yield Input(value="0.9", id="fit-util", type="number", compact=True, classes="fit-num")
                yield Label(" max len ", classes="fit-label")
                # Empty: vLLM's default for the model (its own limit), as `fleetdeck fit` without --max-model-len.
                yield Input(value="", placeholder="model's", id="fit-len", type="integer", compact=True, classes="fit-num")
            table: DataTable[Text | str] = DataTable(id="fit-grid", cursor_type="none", show_cursor=False)
            table.add_column("KV dtype", key="dtype")
            for n in FIT_LENGTHS:
                table.add_column(length_label(n), key=str(n))
            yield table
            yield Static("", id="fit-verdict")
            yield Static("", id="fit-breakdown")

    def on_mount(self) -> None:
        self.refresh_gpu_choices()
        self.action_plan()

    def on_screen_resume(self) -> None:
        self.refresh_gpu_choices()

    def refresh_gpu_choices(self) -> None:
        """Live GPUs first (with their free memory), then card presets for planning off-host."""
        choices: dict[str, GpuChoice] = {}
        for node, snap in sorted(self.app.poller.latest.items()):
            for g in snap.gpus:
                if g.lost or g.memory_total_bytes is None:
                    continue
                total, free, used, note = vllm_view_of(g)  # a MIG GPU is its roomiest slice to vLLM
                label = (f"{node}/{g.index} {g.name.replace('NVIDIA ', '')}{' MIG' if note else ''} · "
                         f"{free / GIB if free is not None else 0:.1f} GiB free")
                choices[f"{node}/{g.index}"] = GpuChoice(label, total or 0, free, used, g.name, note)
        for label, gib in PRESETS.items():
            choices[label] = GpuChoice(label, int(gib * GIB), name=label)
        select = self.query_one("#fit-gpu", Select)
        current = select.value
        if list(choices) != list(self.choices):
            self.choices = choices
            select.set_options([(c.label, key) for key, c in choices.items()])
            if current in choices:
                select.value = current
            else:
                best = max(choices, key=lambda k: choices[k].free_bytes or -1)
                select.value = best
        else:
            self.choices = choices

    def _request(self) -> tuple[str, FitRequest]:
        model = self.query_one("#fit-model", Input).value.strip()
        if not model:
            raise ValueError("type a model name or a local model folder")
        tp, util, length = parse_fields(self.query_one("#fit-tp", Input).value, self.query_one("#fit-util", Input).value,
                                        self.query_one("#fit-len", Input).value)
        key = self.query_one("#fit-gpu", Select).value
        choice = self.choices.get(key) if isinstance(key, str) else None
        if choice is None:
            raise ValueError("pick a GPU")
        kv = self.query_one("#fit-kv", Select).value
        req = FitRequest(
            gpu_memory_bytes=choice.total_bytes,
            gpu_memory_utilization=util,
            tensor_parallel_size=tp,
            max_model_len=length,
            kv_cache_dtype=str(kv),
            free_memory_bytes=choice.free_bytes,
            other_process_bytes=choice.used_bytes,
            gpu_name=choice.name,
            notes=[choice.note] if choice.note else [],
        )
        return model, req

    @on(Input.Submitted)
    @on(Select.Changed)
    def _changed(self) -> None:
        self.action_plan()

    def action_plan(self) -> None:
        try:
            model, req = self._request()
        except ValueError as exc:
            self.show_error(str(exc))
            return
        self._plan_worker(model, req)

    @work(thread=True, exclusive=True, group="fit")
    def _plan_worker(self, model: str, req: FitRequest) -> None:
        from dataclasses import replace

        from engine.kvfit import ArchError, fit_table, load_model, plan

        try:
            arch, exact = load_model(model)
            req = replace(req, weight_bytes_total=exact)
            result = plan(arch, req)
            grid = fit_table(arch, req, dtypes=GRID_DTYPES)
        except (ArchError, ValueError, OSError, ArithmeticError) as exc:
            # load_model turns what it reads into ArchError; the rest is a last guard: a worker that raised would
            # end the dashboard, and a bad model name is not worth that.
            self.app.call_from_thread(while_attached(self, self.show_error), str(exc) or type(exc).__name__)
            return
        self.app.call_from_thread(while_attached(self, self.show_result), result, grid)

    def show_error(self, message: str) -> None:
        self.error = message
        self.query_one("#fit-verdict", Static).update(Text(message, style="bold red"))
        self.query_one("#fit-breakdown", Static).update("")

    def show_result(self, r: FitResult, grid: dict[str, dict[int, FitResult]]) -> None:
        self.error = None
        self.last_result, self.last_grid = r, grid
        table = self.query_one("#fit-grid", DataTable)
        table.clear()
        for dtype, row in grid.items():
            cells: list[Text | str] = [dtype]
            for n in FIT_LENGTHS:
                res = row[n]
                if res.fits:
                    cells.append(Text(f"{res.max_concurrency_low:.1f}x", style="bold green"))
                elif res.model_max_model_len is not None and n > res.model_max_model_len:
                    cells.append(Text("> limit", style="red"))  # past the model's own context limit
                else:
                    cells.append(Text("no", style="bold red"))
            table.add_row(*cells, key=dtype)
        from engine.kvfit.text import length_line, verdict_lines

        # The same verdict lines `fleetdeck fit` prints: a DOES NOT FIT shows why and what would fit, and no
        # capacity figure.
        verdict = Text()
        verdict.append(f" {r.verdict} ", style=f"bold reverse {'green' if r.fits else 'red'}")
        verdict.append(f"  {r.kv_cache_dtype} KV\n" + length_line(r).strip())
        for line in verdict_lines(r):
            if not line.strip().startswith("verdict"):
                verdict.append("\n" + line.strip())
        for w in r.warnings:
            verdict.append(f"\n⚠ {w}", style="yellow")
        self.query_one("#fit-verdict", Static).update(verdict)

        from engine.kvfit.text import budget_lines

        breakdown = Text(f"{r.model} · {r.quantization} · TP {r.tensor_parallel_size}\n", style="bold")
        breakdown.append("\n".join(line[2:] for line in budget_lines(r)))  # the same lines `fleetdeck fit` prints
        self.query_one("#fit-breakdown", Static).update(breakdown)
