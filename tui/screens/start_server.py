"""The Servers screen's start dialog: pick the node (by the GPUs' `node/index`), one of that node's own
profiles and models, and GPUs; see the plan; start.

The node decides what is listed and who plans: this host's profiles and models are read here and
planned here against the poller's figures for its GPUs; a node over SSH lists its own (its agent's
list_profiles and list_models) and plans the start itself, against its own profile, GPUs and memory:
shown before ctrl+s (its agent's read-only plan_server, asked from a worker thread) and again when it
starts. Either way the start goes through that node's `NodeOps` (engine/nodes).
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

UNSET = "?"  # no node's lists loaded yet (None is this host)


class StartServerScreen(DeckModal):
    MUTATING = frozenset({"launch"})
    AUTO_FOCUS = "#start-profile"  # not the scrolling frame around the fields (it comes first)
    """Pick a profile and GPUs; see the planner's verdict for exactly those GPUs; then start."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel", id="start.cancel"),
        Binding("ctrl+s", "launch", "Start", id="start.launch"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.verdict: Any = None
        self.profiles: list[str] = []
        self.lists_of: str | None = UNSET  # the node whose profiles and models the lists show (None: this host)
        self.gate = LaunchGate()

    def compose(self) -> ComposeResult:
        from engine.nodes.local import usable_tomls

        # This host's profiles at once (a file listing); another node's replace them when it is picked.
        self.profiles = sorted(usable_tomls(self.app.options.folders.profile_roots()))
        with VerticalScroll(id="start-server"):
            yield Static("[b]Start a vLLM server[/b]  (Enter plans, ctrl+s starts, Esc cancels)")
            with Horizontal(classes="fit-row"):
                yield Label("Profile ", classes="fit-label")
                yield Select([(n, n) for n in self.profiles], id="start-profile", compact=True, prompt="profile")
            with Horizontal(classes="fit-row"):
                yield Label("GPUs ", classes="fit-label")
                yield Input(placeholder="node/index, e.g. sim-h100-01/3 or 0,1", id="start-gpus", compact=True)
            with Horizontal(classes="fit-row"):
                # The models on the chosen node's disks (HF cache, [models] roots), read there by its agent.
                yield Label("Model ", classes="fit-label")
                yield Select([], id="start-model", compact=True, prompt="the profile's model")
            yield Static("", id="start-verdict")

    def on_mount(self) -> None:
        self.lists_of = None
        self._load_lists(None)

    # -- which node ------------------------------------------------------------------------------
    def _target_node(self) -> str | None:
        text = self.query_one("#start-gpus", Input).value.strip()
        return text.partition("/")[0] if "/" in text else None

    def _over_ssh(self, node: str | None) -> bool:
        from fleet.remote import RemoteNode

        sources = getattr(getattr(self.app, "poller", None), "sources", [])
        return node is not None and any(isinstance(s, RemoteNode) and s.name == node for s in sources)

    def _remote_target(self) -> str | None:
        """The node over SSH the GPUs name; None for this host (its own sources share its disks)."""
        node = self._target_node()
        return node if self._over_ssh(node) else None

    def _first_local(self) -> str | None:
        """The node GPUs without a node name are on: this host's first source (never a node over SSH)."""
        known = getattr(getattr(self.app, "poller", None), "latest", None) or {}
        return next((n for n in known if not self._over_ssh(n)), None)

    def _node_ops(self, node: str | None) -> Any:
        """The node's operations: this host's engine, or a node's agent (which plans and starts there)."""
        from engine.nodes.local import LocalOps
        from engine.nodes.select import ops_named

        poller = getattr(self.app, "poller", None)
        config = self.app.options.config
        local = LocalOps(store_of(self.app), list(config.adapter_roots), model_roots=list(config.models.roots),
                         folders=self.app.options.folders, slurm_settings=getattr(config, "slurm", None))
        return ops_named(getattr(poller, "sources", []), local, node)

    @work(thread=True, exclusive=True, group="start-lists")
    def _load_lists(self, node: str | None) -> None:
        """A node's profiles and models are read on it (or asked of its agent): never on the UI thread."""
        profiles: list[str] | None = None
        models: list[Any] = []
        try:
            ops = self.app.call_from_thread(self._node_ops, node)
            if node is not None:
                profiles = ops.profiles()
            models = [m for m in ops.models() if m.error is None]
        except Exception as exc:  # a node that cannot list (older agent, link down): say so, keep what is there
            self.app.call_from_thread(self.notify, f"profiles and models on {node or 'this host'}: {exc}", markup=False,
                                      severity="warning")
        self.app.call_from_thread(while_attached(self, self._show_lists), node, profiles, models)

    def _show_lists(self, node: str | None, profiles: list[str] | None, models: list[Any]) -> None:
        if node != self.lists_of:
            return  # another node was picked meanwhile: its own listing is on the way
        if profiles is not None or node is None:
            if node is None:
                from engine.nodes.local import usable_tomls

                profiles = sorted(usable_tomls(self.app.options.folders.profile_roots()))
            self.profiles = list(profiles or [])
            keep_p = self.query_one("#start-profile", Select).value
            select_p = self.query_one("#start-profile", Select)
            select_p.set_options([(n, n) for n in self.profiles])
            if keep_p in self.profiles:
                select_p.value = keep_p  # the same profile name on this node too: the choice stands
        options = [(f"{m.name}  {m.quantization or m.dtype or ''}  {m.context_limit or '?'} ctx", m.name) for m in models]
        select_m = self.query_one("#start-model", Select)
        keep_m = select_m.value
        select_m.set_options(options)
        if any(value == keep_m for _, value in options):
            select_m.value = keep_m

    # -- what was picked -------------------------------------------------------------------------
    def _model(self) -> str | None:
        value = self.query_one("#start-model", Select).value
        return value if isinstance(value, str) else None

    def _gpus(self) -> tuple[list[int], list[Any], str | None]:
        """The GPU indices, the poller's figures for them and the node they are on (GPUs without a node name
        are this host's first source's)."""
        text = self.query_one("#start-gpus", Input).value.strip()
        node = None
        if "/" in text:
            node, _, text = text.partition("/")
        if not text.strip():  # the dialog's words, not the command line's ("--gpus takes ...")
            raise ValueError("type the GPUs: node/index (e.g. " + (f"{node}/0" if node else "sim-h100-01/3")
                             + ") or indices of this host (0 or 0,1)")
        indices = dialog_gpus(text)
        poller = getattr(self.app, "poller", None)
        snaps: list[Any] = []
        if poller is not None:
            known = poller.latest or {}
            if node is not None and node not in known:
                raise ValueError(f"no node {node!r}; the fleet has {', '.join(sorted(known)) or 'no nodes yet'}")
            node = node if node is not None else self._first_local()
            if node is not None:
                snaps = known[node].gpus_at(indices)
        if len(snaps) != len(indices):
            raise ValueError(f"no such GPU(s) {indices} on {node or 'this node'}")
        return indices, snaps, node

    def _profile_name(self) -> str:
        name = self.query_one("#start-profile", Select).value
        if not isinstance(name, str):
            where = self.lists_of or ", ".join(str(r) for r in self.app.options.folders.profile_roots())
            raise ValueError(f"pick a profile (profiles of {where})")
        return name

    def _local_profile(self) -> Any:
        """This host's profile of that name, with the model picked: what this host plans."""
        from engine.vllm.profile import load_profile
        from store.config_files import toml_by_name

        profile = load_profile(toml_by_name("profile", self._profile_name(), self.app.options.folders.profile_roots()))
        model = self._model()
        return profile.model_copy(update={"model": model}) if model is not None else profile

    # -- plan, start -----------------------------------------------------------------------------
    @on(Input.Submitted)
    @on(Select.Changed)
    def plan(self) -> None:
        node = self._remote_target()
        if node != self.lists_of:  # another node: its own profiles and models
            self.lists_of = node
            self._load_lists(node)
        self._plan(launch=False)

    @work(thread=True, exclusive=True, group="start")
    def _plan(self, launch: bool) -> None:
        """Planning may read a local model folder's headers: never on the UI thread."""
        from textual.worker import get_current_worker

        from engine.kvfit.text import render_text
        from engine.vllm.command import LaunchError, preflight
        from fleet.remote import AgentError
        from store.config_files import ConfigError

        out = self.query_one("#start-verdict", Static)
        try:
            remote = self.app.call_from_thread(self._remote_target)
            name = self.app.call_from_thread(self._profile_name)
            self.app.call_from_thread(self._gpus)  # the indices exist on that node
            if remote is not None:
                # The node's own profile of that name, on its own GPUs and disks: planned there by its agent (a
                # read-only request, in this worker thread: a slow link never holds the screen).
                self.app.call_from_thread(out.update, Text(f"{name}: asking {remote}'s agent for its plan..."))
                indices, _, _ = self.app.call_from_thread(self._gpus)
                ops = self.app.call_from_thread(self._node_ops, remote)
                try:
                    verdict = ops.plan_server(name, indices, model=self.app.call_from_thread(self._model)).verdict
                    if get_current_worker().is_cancelled:
                        return  # the fields changed while the node planned: a newer plan is on its way
                    self.verdict = verdict
                except AgentError as exc:
                    if "plans a start only when it starts" not in str(exc):
                        raise
                    # An agent older than plan_server: it still plans when it starts, and refuses what does not fit.
                    self.verdict = None
                    self.app.call_from_thread(out.update, Text(f"{name}: planned by {remote}'s agent against its own "
                                                               f"profile, GPUs and memory when it starts (ctrl+s). {exc}"))
                    if launch:
                        self._launch_now()
                    return
                heading = f"planned by {remote}'s agent, on its own profile and GPUs:\n"
            else:
                profile = self.app.call_from_thread(self._local_profile)
                _, snaps, _ = self.app.call_from_thread(self._gpus)
                self.verdict = preflight(profile, snaps)
                heading = ""
        except (ValueError, ConfigError, LaunchError, AgentError) as exc:
            self.verdict = None
            self.app.call_from_thread(out.update, Text(str(exc), style="red"))
            return
        text = heading + render_text(self.verdict)
        if not self.verdict.fits:
            on = f" --node {remote}" if remote is not None else ""
            text += f"\n\nNot starting it: `fleetdeck serve start{on} --force` overrides the planner."
        self.app.call_from_thread(out.update, Text(text, style="" if self.verdict.fits else "red"))
        # The why is below "DOES NOT FIT", past the bottom edge at 80x24: anchored there, so it stays in sight as
        # the text settles (the scrollbar that appears takes two columns, the lines wrap again, and one
        # scroll_end made before that stopped a line short). A verdict that fits lets the fields scroll freely.
        self.app.call_from_thread(self.query_one("#start-server").anchor, not self.verdict.fits)
        if launch and self.verdict.fits:
            self._launch_now()

    def action_launch(self) -> None:
        self._plan(launch=True)

    def _launch_now(self) -> None:
        from engine.nodes.ops import started_text

        if not self.gate.begin():  # Esc came first, or another ctrl+s is starting it
            return
        try:
            indices, snaps, node = self.app.call_from_thread(self._gpus)
            remote = self.app.call_from_thread(self._remote_target)
            ops = self.app.call_from_thread(self._node_ops, remote)
            name = self.app.call_from_thread(self._profile_name)
            model = self.app.call_from_thread(self._model)
            started = ops.start_server(name, indices, model=model, gpu_snapshots=None if remote else snaps,
                                       node=None if remote else node)
        except Exception as exc:
            self.gate.end()
            self.app.call_from_thread(self.query_one("#start-verdict", Static).update, Text(str(exc), style="red"))
            return
        self.app.call_from_thread(self.dismiss, started_text(started))

    def action_cancel(self) -> None:
        if not self.gate.cancel():
            self.gate.refused(self.query_one("#start-verdict", Static), "the server")
            return
        self.dismiss(None)
