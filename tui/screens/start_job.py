"""The Jobs screen's start dialog: pick the node (by the GPU's `node/index`, or `node/cpu`), one of that
node's own job specs, and its GPUs; see the check; start.

This host's specs are read and checked here (the dataset, and the VRAM estimate against the poller's
figures for its GPUs). A node over SSH lists its own specs (its agent's list_specs) and checks the
start itself, against its own spec, GPUs and memory, when it starts: a remote fine-tune is started
from here as a local one is, through that node's `NodeOps` (engine/nodes).
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Input, Label, Select, Static

from tui.screens.base import DeckModal, LaunchGate, dialog_gpus, store_of, while_attached


class StartJobScreen(DeckModal):
    MUTATING = frozenset({"launch"})
    AUTO_FOCUS = "#job-spec"  # not the scrolling frame around the fields (it comes first)
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="startjob.cancel"),
                Binding("ctrl+s", "launch", "Start", id="startjob.launch")]

    def __init__(self) -> None:
        super().__init__()
        self.specs: list[str] = []
        self.lists_of: str | None = None  # the node whose specs the list shows (None: this host)
        self.gate = LaunchGate()

    def compose(self) -> ComposeResult:
        from store.config_files import named_tomls

        self.specs = sorted(named_tomls(self.app.options.folders.spec_roots()))
        with VerticalScroll(id="start-server"):
            yield Static("[b]Start a fine-tune[/b]  (Enter checks, ctrl+s starts, Esc cancels)")
            with Horizontal(classes="fit-row"):
                yield Label("Spec ", classes="fit-label")
                yield Select([(n, n) for n in self.specs], id="job-spec", compact=True, prompt="job spec")
            with Horizontal(classes="fit-row"):
                yield Label("GPU ", classes="fit-label")
                yield Input(placeholder="0 or node/index, e.g. sim-a10-02/1 (cpu or node/cpu: the peft backend)",
                            id="job-gpus", compact=True)
            yield Static("", id="job-check")

    # -- which node ------------------------------------------------------------------------------
    def _sources(self) -> list[Any]:
        return list(getattr(getattr(self.app, "poller", None), "sources", []))

    def _over_ssh(self, node: str | None) -> bool:
        from fleet.remote import RemoteNode

        return node is not None and any(isinstance(s, RemoteNode) and s.name == node for s in self._sources())

    def _remote_target(self) -> str | None:
        text = self.query_one("#job-gpus", Input).value.strip()
        node = text.partition("/")[0] if "/" in text else None
        return node if self._over_ssh(node) else None

    def _node_ops(self, node: str | None) -> Any:
        from engine.nodes.local import LocalOps
        from engine.nodes.select import ops_named

        config = self.app.options.config
        local = LocalOps(store_of(self.app), list(config.adapter_roots), folders=self.app.options.folders,
                         slurm_settings=getattr(config, "slurm", None))
        return ops_named(self._sources(), local, node)

    @work(thread=True, exclusive=True, group="startjob-lists")
    def _load_specs(self, node: str | None) -> None:
        """A node's specs are asked of its agent: never on the UI thread."""
        try:
            specs = self.app.call_from_thread(self._node_ops, node).specs()
        except Exception as exc:  # an older agent, a link down: say so; starting names a spec there anyway
            self.app.call_from_thread(self.notify, f"job specs on {node or 'this host'}: {exc}", severity="warning")
            return
        self.app.call_from_thread(while_attached(self, self._show_specs), node, specs)

    def _show_specs(self, node: str | None, specs: list[str]) -> None:
        if node != self.lists_of:
            return
        self.specs = specs
        select = self.query_one("#job-spec", Select)
        keep = select.value
        select.set_options([(n, n) for n in specs])
        if keep in specs:
            select.value = keep

    # -- what was picked -------------------------------------------------------------------------
    def _spec_name(self) -> str:
        name = self.query_one("#job-spec", Select).value
        if not isinstance(name, str):
            where = self.lists_of or ", ".join(str(r) for r in self.app.options.folders.spec_roots())
            raise ValueError(f"pick a job spec (specs of {where})")
        return name

    def _inputs(self) -> tuple[list[int] | None, list[Any] | None, str | None]:
        """The GPU indices (None: CPU), the poller's figures for them and the node they are on (GPUs
        without a node name are this host's first source's)."""
        text = self.query_one("#job-gpus", Input).value.strip() or "cpu"
        node = None
        if "/" in text:
            node, _, text = text.partition("/")
        poller = getattr(self.app, "poller", None)
        known = (poller.latest if poller is not None else None) or {}
        if node is not None and node not in known:
            raise ValueError(f"no node {node!r}; the fleet has {', '.join(sorted(known)) or 'no nodes yet'}")
        if text.lower() == "cpu":
            return None, None, node
        if not text.strip():  # "node/" alone: the dialog's words, not the command line's ("--gpus takes ...")
            raise ValueError(f"type the GPU after the node: {node}/0, or {node}/cpu for the peft backend")
        indices = dialog_gpus(text)
        node = node if node is not None else next((n for n in known if not self._over_ssh(n)), None)
        snaps = known[node].gpus_at(indices) if node is not None else []
        if node is not None and len(snaps) != len(indices):
            raise ValueError(f"no such GPU(s) {indices} on {node}")
        return indices, snaps or None, node

    # -- check, start ----------------------------------------------------------------------------
    @on(Input.Submitted)
    @on(Select.Changed)
    def check(self) -> None:
        node = self._remote_target()
        if node != self.lists_of:  # another node: its own specs
            self.lists_of = node
            if node is None:
                self._show_specs(None, self._local_specs())
            else:
                self._load_specs(node)
        self._check(launch=False)

    def _local_specs(self) -> list[str]:
        from store.config_files import named_tomls

        return sorted(named_tomls(self.app.options.folders.spec_roots()))

    @work(thread=True, exclusive=True, group="startjob")
    def _check(self, launch: bool) -> None:
        """Reading the whole dataset (and its tokenizer) is file I/O: never on the UI thread."""
        from engine.finetune import jobs
        from engine.finetune.spec import load_spec
        from store.config_files import ConfigError, toml_by_name

        out = self.query_one("#job-check", Static)
        try:
            remote = self.app.call_from_thread(self._remote_target)
            name = self.app.call_from_thread(self._spec_name)
            _, snaps, _ = self.app.call_from_thread(self._inputs)
            if remote is not None:
                # The node's own spec and dataset, on its own GPUs: checked there, once, by its agent.
                self.app.call_from_thread(out.update, Text(f"{name}: checked by {remote}'s agent against its own "
                                                           "spec, dataset, GPUs and memory when it starts (ctrl+s)"))
                if launch:
                    self._launch_now()
                return
            spec = load_spec(toml_by_name("job spec", name, self.app.options.folders.spec_roots()))
            report, estimate = jobs.preflight(spec, snaps, force=False)
        except (ValueError, ConfigError, jobs.JobError) as exc:
            self.app.call_from_thread(out.update, Text(str(exc), style="red"))
            return
        self.app.call_from_thread(out.update, f"{report.examples} examples ({report.form}); VRAM estimate "
                                  f"{estimate.total_bytes / 1024**3:.1f} GiB. ctrl+s starts it.")
        if launch:
            self._launch_now()

    def action_launch(self) -> None:
        self._check(launch=True)

    def _launch_now(self) -> None:
        if not self.gate.begin():  # Esc came first, or another ctrl+s is starting it
            return
        try:
            indices, snaps, node = self.app.call_from_thread(self._inputs)
            remote = self.app.call_from_thread(self._remote_target)
            ops = self.app.call_from_thread(self._node_ops, remote)
            name = self.app.call_from_thread(self._spec_name)
            rec = ops.start_job(name, indices, gpu_snapshots=None if remote else snaps, node=None if remote else node)
        except Exception as exc:
            self.gate.end()
            self.app.call_from_thread(self.query_one("#job-check", Static).update, Text(str(exc), style="red"))
            return
        self.app.call_from_thread(self.dismiss, f"started {rec.id} on {rec.gpus}")

    def action_cancel(self) -> None:
        if not self.gate.cancel():
            self.gate.refused(self.query_one("#job-check", Static), "the job")
            return
        self.dismiss(None)
