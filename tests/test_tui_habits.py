"""The habits operators bring from k9s and nvitop, through Pilot at 80x24: `/` filter, column sort, j/k,
the palette's actions, the Fleet process table's guarded kill, prune on Servers and Jobs, the Audit
screen's filters, and messages on the flash line instead of toasts over the content."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest
from textual.command import CommandPalette
from textual.widgets import Input

from engine.audit import trail as audit
from engine.finetune import jobs
from engine.finetune.jobs import JobRecord, JobState
from engine.managed import Cpu, LocalGpus
from engine.vllm import launcher
from engine.vllm.record import ServerRecord, ServerState
from fleet.config import FleetConfig
from fleet.source import LocalNode
from store.db import open_store
from tests.fakes.fake_nvml import FakeGpu, FakeNvml, FakeProcess
from tests.tui_helpers import FIXED_NOW, make_app, open_screen, press_and_confirm, ready, settle, static_text, until
from tui.chrome import FilterBar, FlashLine
from tui.screens.audit import AuditScreen
from tui.screens.confirm import ConfirmScreen
from tui.screens.jobs import JobsScreen
from tui.screens.servers import ServersScreen
from tui.table import DeckTable


def keys(table: DeckTable) -> list[str]:
    return [r.key.value for r in table.ordered_rows]


def ended_server(store, sid: str, state: str, tmp_path) -> ServerRecord:
    rec = ServerRecord(id=sid, name="q", node="host-a", pid=None, create_time=None, argv=[], env={}, gpus=LocalGpus((0,)),
                       port=8000, log_path=str(tmp_path / f"{sid}.log"), spec={"model": "m"}, state=ServerState(state),
                       reason="stopped by the operator", started_at=FIXED_NOW, ended_at=FIXED_NOW + 60)
    rec.save(store)
    return rec


def ended_job(store, jid: str, state: str, tmp_path) -> JobRecord:
    rec = JobRecord(id=jid, name="j", node="host-a", pid=None, create_time=None, argv=[], env={}, gpus=Cpu(),
                    port=None, log_path=str(tmp_path / f"{jid}.log"), spec={"backend": "peft"}, state=JobState(state),
                    reason=None, started_at=FIXED_NOW, ended_at=FIXED_NOW + 60, workdir=str(tmp_path / jid))
    rec.save(store)
    return rec


# -- filter, sort, j/k ----------------------------------------------------------------------------
async def test_slash_filters_the_fleet_and_esc_clears_it():
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        table = app.screen.query_one("#fleet-table", DeckTable)
        everything = keys(table)
        await pilot.press("slash")
        bar = app.screen.query_one(FilterBar)
        row = app.screen.query_one("#filter-row")
        assert row.display and app.focused is bar
        await pilot.press(*"4090")
        await pilot.pause()
        # A GPU row that matches keeps its node's row above it; nothing else stays.
        assert keys(table) == ["node:sim-ws-4090", *[k for k in everything if k.startswith("gpu:sim-ws-4090/")]]
        await pilot.press("enter")  # keep the filter, back to the table (still in sight)
        await pilot.pause()
        assert app.focused is table and row.display and table.filter_text == "4090"
        app.poll_once_sync()  # a refresh keeps the filter
        await pilot.pause()
        assert keys(table)[0] == "node:sim-ws-4090" and len(keys(table)) == 2
        await pilot.press("escape")  # Esc on the table clears it
        await pilot.pause()
        assert keys(table) == everything and not row.display and table.filter_text == ""
        await pilot.press("slash", "x", "y", "z", "escape")  # Esc in the bar clears too
        await pilot.pause()
        assert keys(table) == everything and app.focused is table


async def test_o_sorts_by_the_next_column_with_a_mark_and_O_reverses():
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(app, pilot)
        table = app.screen.query_one("#fleet-table", DeckTable)
        await pilot.press("o", "o")  # GPU, then VRAM
        await pilot.pause()
        assert table.sort_col == "vram"
        labels = {c.key.value: str(c.label) for c in table.ordered_columns}
        assert labels["vram"].endswith("▲") and not labels["gpu"].endswith("▲")

        def vram_of_h100s() -> list[float]:
            out = []
            for k in keys(table):
                if k.startswith("gpu:sim-h100-01/"):
                    text = str(table.get_cell(k, "vram")).split()[-1]
                    out.append(float(text.split("/")[0].lstrip("▏▎▍▌▋▊▉█")))
            return out

        # Sorted within each node: a node's row stays on top of its GPUs.
        assert keys(table)[0].startswith("node:") and vram_of_h100s() == sorted(vram_of_h100s())
        await pilot.press("O")
        await pilot.pause()
        assert str(table.ordered_columns[1].label).endswith("▼")
        assert vram_of_h100s() == sorted(vram_of_h100s(), reverse=True)


async def test_j_and_k_move_the_cursor_on_every_screen_table(tmp_path):
    store = open_store(tmp_path / "fd.db")
    for i in range(3):
        ended_server(store, f"q-{i}", "stopped", tmp_path)
    app = make_app(store_path=tmp_path / "fd.db")
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        await pilot.press("j", "j")
        assert app.screen.query_one("#fleet-table", DeckTable).cursor_row == 2
        await pilot.press("k")
        assert app.screen.query_one("#fleet-table", DeckTable).cursor_row == 1
        await pilot.press("3")
        await settle(app, pilot)
        servers = app.screen.query_one("#servers-table", DeckTable)
        await pilot.press("j", "j", "k")
        assert servers.cursor_row == 1


# -- 80x24: what stays visible ------------------------------------------------------------------
async def test_at_80_columns_essential_columns_stay_and_low_priority_ones_hide(tmp_path):
    store = open_store(tmp_path / "fd.db")
    ended_server(store, "mistral-7b-awq-e68a77", "stopped", tmp_path)
    app = make_app(store_path=tmp_path / "fd.db")
    async with app.run_test(size=(80, 24)) as pilot:
        fleet = app.screen.query_one("#fleet-table", DeckTable)
        await ready(app, pilot)
        assert {"gpu", "vram", "util", "work"} <= set(fleet.shown_columns)
        await pilot.press("3")
        await settle(app, pilot)
        shown = app.screen.query_one("#servers-table", DeckTable).shown_columns
        assert {"id", "node", "state", "gpus", "gen", "ttft"} <= set(shown) and "hit" not in shown
        assert str(app.screen.query_one("#servers-table", DeckTable).get_cell("mistral-7b-awq-e68a77",
                                                                            "node")) == "host-a"
    async with make_app(store_path=tmp_path / "fd.db").run_test(size=(200, 40)) as pilot:
        await ready(pilot.app, pilot)
        await pilot.press("3")
        await settle(pilot.app, pilot)
        assert "hit" in pilot.app.screen.query_one("#servers-table", DeckTable).shown_columns


async def test_messages_go_to_the_flash_line_not_over_the_content():
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        app.notify("[serve] something happened", markup=False)
        await pilot.pause()
        flash = app.screen.query_one(FlashLine)
        assert flash.display and "[serve] something happened" in static_text(flash)
        # It takes a line of its own: the table ends above it rather than under a toast.
        table = app.screen.query_one("#fleet-table", DeckTable)
        assert table.region.bottom <= flash.region.y
        app.notify("second", timeout=0.01)
        await pilot.pause()
        assert "(+1 more)" in static_text(flash) or "second" in static_text(flash)


# -- the palette ------------------------------------------------------------------------------------
async def test_the_palette_lists_the_screens_actions_with_their_keys_and_runs_them(tmp_path):
    store = open_store(tmp_path / "fd.db")
    ended_server(store, "q-old", "crashed", tmp_path)
    app = make_app(store_path=tmp_path / "fd.db")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_screen(app, pilot, "3", ServersScreen)
        titles = [c.title for c in app.get_system_commands(screen)]
        for wanted in ("Start (s)", "Stop (x)", "Restart (r)", "Prune (p)", "Logs (l)", "Swap adapter (a, then w)",
                       "Filter (/)", "Sort (o)", "Servers (3)"):
            assert any(t.startswith(wanted) for t in titles), (wanted, titles)
        await pilot.press("colon")
        await pilot.pause()
        assert isinstance(app.screen, CommandPalette)
        await pilot.press(*"prune")
        for _ in range(20):  # the palette searches in a worker
            await pilot.pause(0.05)
        await pilot.press("enter")
        for _ in range(20):
            await pilot.pause()
            if isinstance(app.screen, ConfirmScreen):
                break
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        await pilot.press("7")
        await settle(app, pilot)
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Verify (v)" in titles and not any(t.startswith("Start (s)") for t in titles)
        await pilot.press("1")
        await settle(app, pilot)
        assert any(c.title.startswith("Kill process (^k)") for c in app.get_system_commands(app.screen))


async def test_read_only_leaves_mutating_actions_out_of_the_palette(tmp_path):
    app = make_app(store_path=tmp_path / "fd.db")
    app.options.config = FleetConfig(read_only=True)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_screen(app, pilot, "3", ServersScreen)
        titles = [c.title for c in app.get_system_commands(screen)]
        assert "Logs (l)" in titles
        assert not [t for t in titles if t.startswith(("Start (s)", "Stop (x)", "Prune (p)", "Restart (r)"))]


# -- prune --------------------------------------------------------------------------------------------
async def test_p_prunes_ended_servers_after_confirmation_and_audits_it(tmp_path):
    path = tmp_path / "fd.db"
    store = open_store(path)
    ended_server(store, "q-stopped", "stopped", tmp_path)
    ended_server(store, "q-crashed", "crashed", tmp_path)
    app = make_app(store_path=path)
    with audit.session(path, "tui"):
        async with app.run_test(size=(80, 24)) as pilot:
            screen = await open_screen(app, pilot, "3", ServersScreen)
            assert keys(screen.query_one("#servers-table", DeckTable)) == ["q-stopped", "q-crashed"]
            await press_and_confirm(app, pilot, "p")
            await settle(app, pilot, 5)
            assert keys(screen.query_one("#servers-table", DeckTable)) == []
    assert launcher.list_servers(open_store(path)) == []
    (rec,) = audit.query(open_store(path))
    assert (rec["action"], rec["outcome"], rec["source"], rec["target"]) == ("server.prune", "done", "tui", "2 server(s)")


async def test_p_prunes_ended_jobs_and_read_only_refuses(tmp_path):
    path = tmp_path / "fd.db"
    store = open_store(path)
    ended_job(store, "ft-done", "finished", tmp_path)
    ended_job(store, "ft-failed", "failed", tmp_path)
    ro = make_app(store_path=path)
    ro.options.config = FleetConfig(read_only=True)
    async with ro.run_test(size=(80, 24)) as pilot:
        await open_screen(ro, pilot, "4", JobsScreen)
        await pilot.press("p")
        await pilot.pause()
        assert not isinstance(ro.screen, ConfirmScreen)
    assert len(jobs.list_jobs(open_store(path))) == 2
    app = make_app(store_path=path)
    with audit.session(path, "tui"):
        async with app.run_test(size=(80, 24)) as pilot:
            await open_screen(app, pilot, "4", JobsScreen)
            await press_and_confirm(app, pilot, "p")
            await settle(app, pilot, 5)
    assert jobs.list_jobs(open_store(path)) == []
    (rec,) = audit.query(open_store(path))
    assert (rec["action"], rec["outcome"], json_jobs(rec)) == ("job.prune", "done", {"ft-done", "ft-failed"})


def json_jobs(rec: dict) -> set[str]:
    import json

    return set(json.loads(rec["params"])["jobs"].split(","))


# -- the process table and its guarded kill ------------------------------------------------------------
@pytest.fixture
def gpu_holder(monkeypatch):
    """A real process this test started, reported by (fake) NVML as holding GPU 0 of node n1."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    FakeNvml([FakeGpu(uuid="GPU-a", processes=[FakeProcess(proc.pid, 2 * 1024**3)])]).install(monkeypatch)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


async def _kill_from_fleet(app, pilot, pid: int) -> None:
    await ready(app, pilot)
    await pilot.press("j")  # the GPU row: the process table lists what holds it
    await pilot.pause()
    procs = app.screen.query_one("#fleet-procs", DeckTable)
    assert keys(procs) == [f"n1/GPU-a|{pid}"]
    assert "time.sleep(300)" in str(procs.cells_of(f"n1/GPU-a|{pid}")["command"])
    await pilot.press("ctrl+k")
    await pilot.pause()


async def test_ctrl_k_kills_a_gpu_process_after_confirmation_and_audits_it(tmp_path, gpu_holder):
    path = tmp_path / "fd.db"
    app = make_app(lambda: [LocalNode("n1")], store_path=path, simulated=False)
    with audit.session(path, "tui"):
        async with app.run_test(size=(80, 24)) as pilot:
            await _kill_from_fleet(app, pilot, gpu_holder.pid)
            assert isinstance(app.screen, ConfirmScreen)
            assert str(gpu_holder.pid) in static_text(app.screen.query_one("#confirm-question"))
            await pilot.press("y")
            await settle(app, pilot, 5)
            assert gpu_holder.wait(timeout=30) is not None
            assert any(f"pid {gpu_holder.pid} on n1 ended" in n.message for n in app._notifications)
    (rec,) = audit.query(open_store(path))
    assert (rec["action"], rec["target"], rec["outcome"], rec["source"]) == (
        "process.kill", f"n1:{gpu_holder.pid}", "done", "tui")


async def test_kill_is_not_offered_read_only_and_the_engine_refuses_it(tmp_path, gpu_holder):
    path = tmp_path / "fd.db"
    app = make_app(lambda: [LocalNode("n1")], store_path=path, simulated=False)
    app.options.config = FleetConfig(read_only=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await _kill_from_fleet(app, pilot, gpu_holder.pid)
        assert not isinstance(app.screen, ConfirmScreen)
    # Read-only from the audit trail's side (`--read-only`): the engine refuses and records it.
    from engine.nodes.processes import KillRequest, kill_gpu_process

    with audit.session(path, "tui", read_only=True):
        with pytest.raises(audit.ReadOnlyError):
            kill_gpu_process(KillRequest("n1", gpu_holder.pid, "0", "x"))
    assert gpu_holder.poll() is None and psutil.pid_exists(gpu_holder.pid)
    (rec,) = audit.query(open_store(path))
    assert (rec["action"], rec["outcome"]) == ("process.kill", "refused") and "read-only" in rec["reason"]


async def test_a_simulated_process_is_never_signalled(tmp_path):
    path = tmp_path / "fd.db"
    app = make_app(store_path=path)
    with audit.session(path, "tui"):
        async with app.run_test(size=(80, 24)) as pilot:
            await ready(app, pilot)
            await pilot.press("j")
            await pilot.pause()
            procs = app.screen.query_one("#fleet-procs", DeckTable)
            assert procs.row_count >= 1
            await pilot.press("ctrl+k")  # refused without a question first (it asked, then refused)
            await until(app, pilot, lambda: any("simulated node" in n.message for n in app._notifications), "the refusal")
            assert not isinstance(app.screen, ConfirmScreen)
            assert any("stands in for a GPU process and is not signalled" in n.message for n in app._notifications)
    (rec,) = audit.query(open_store(path))
    assert (rec["action"], rec["outcome"]) == ("process.kill", "refused") and "simulated" in rec["reason"]


# -- the Audit screen's filters ----------------------------------------------------------------------------
async def test_audit_filters_are_visible_at_80x24_and_esc_leaves_them(tmp_path):
    path = tmp_path / "fd.db"
    store = open_store(path)
    for i, action in enumerate(("server.start", "server.stop", "job.start")):
        audit.append(store, action, f"t{i}", "done", source="cli", node="host-a", ts=FIXED_NOW + i)
    app = make_app(store_path=path)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_screen(app, pilot, "7", AuditScreen)
        for fid in ("#audit-since", "#audit-node", "#audit-action"):
            region = screen.query_one(fid).region
            assert region.height == 1 and region.width > 0 and region.y < 24
        table = screen.query_one("#audit-table", DeckTable)
        assert len(keys(table)) == 3
        await pilot.press("f")
        assert app.focused is screen.query_one("#audit-since", Input)
        await pilot.press("tab", "tab", *"job", "v")  # typed into the field, not the screen's `v`
        assert screen.query_one("#audit-action", Input).value == "jobv"
        await pilot.press("backspace", "enter")
        await settle(app, pilot)
        assert [str(table.get_cell(k, "action")) for k in keys(table)] == ["job.start"]
        assert app.focused is table
        await pilot.press("f", "escape")
        assert app.focused is table


def test_a_kill_on_a_node_over_ssh_is_refused_with_what_to_do_and_audited(tmp_path):
    from types import SimpleNamespace

    from engine.nodes.remote import AgentOps
    from engine.nodes.processes import KillError, KillRequest

    path = tmp_path / "fd.db"
    ops = AgentOps(SimpleNamespace(name="gpu-02"))  # the agent is never asked: it has no such op
    with audit.session(path, "tui"):
        with pytest.raises(KillError, match="ssh gpu-02 and kill 4242 there"):
            ops.kill_process(KillRequest("gpu-02", 4242, "1", "python train.py", "ops"))
    (rec,) = audit.query(open_store(path))
    assert (rec["action"], rec["target"], rec["outcome"]) == ("process.kill", "gpu-02:4242", "refused")


# -- the table's filter and sort, as properties ----------------------------------------------------------
from hypothesis import given, settings, strategies as st  # noqa: E402

from tui.table import Col, sort_value  # noqa: E402

_cell = st.one_of(st.text(alphabet="ab1.%$ ▎█-", max_size=6), st.floats(-1e6, 1e6).map(lambda x: f"{x:,.1f}"),
                  st.just("n/a"))


@settings(max_examples=60, deadline=None)
@given(groups=st.lists(st.lists(st.tuples(_cell, _cell), min_size=1, max_size=4), min_size=1, max_size=4),
       needle=st.text(alphabet="ab1.", max_size=2), sort_col=st.sampled_from([None, "a", "b"]), rev=st.booleans())
def test_filter_keeps_matches_under_their_group_head_and_sort_orders_within_groups(groups, needle, sort_col, rev):
    table = DeckTable((Col("a", "A"), Col("b", "B")))
    rows, owner = [], {}
    for g, members in enumerate(groups):
        for i, cells in enumerate(members):
            key = f"{g}:{i}"
            rows.append((key, list(cells)))
            owner[key] = f"g{g}"
    table.rows_given, table.groups = rows, owner
    table.filter_text, table.sort_col, table.sort_reverse = needle, sort_col, rev
    out = table.visible_rows()
    keys = [k for k, _ in out]
    assert len(keys) == len(set(keys)) and set(keys) <= {k for k, _ in rows}

    def hit(cells: list[str]) -> bool:  # the text of one cell holds the filter (case-insensitive)
        return any(needle.lower() in c.lower() for c in cells)

    for g, members in enumerate(groups):
        head = f"{g}:0"
        rest = [f"{g}:{i}" for i in range(1, len(members))]
        shown_rest = [k for k in keys if k in rest]
        head_hit = hit(list(members[0]))
        if len(members) == 1:
            assert (head in keys) == head_hit  # a lone head is a row like any other
            continue
        # A member shows when it matches or its head does; the head shows when anything of its group does.
        for i, k in enumerate(rest, start=1):
            assert (k in keys) == (head_hit or hit(list(members[i])))
        assert (head in keys) == (head_hit or bool(shown_rest))
        if shown_rest:
            assert keys.index(head) < min(keys.index(k) for k in shown_rest)
        if sort_col is not None:
            idx = 0 if sort_col == "a" else 1
            values = [sort_value(dict(rows)[k][idx]) for k in shown_rest]
            assert values == sorted(values, reverse=rev)


async def test_a_workers_results_for_a_screen_no_longer_in_the_app_are_dropped(tmp_path):
    """A poll worker's results can reach the UI thread after its screen (or the app) has closed: they are
    dropped, never a NoMatches raised as the app's error (seen when a test's app shut down mid-poll)."""
    from tests.tui_helpers import make_app, ready
    from tui.screens.base import while_attached

    app = make_app(store_path=tmp_path / "fd.db")
    calls: list[tuple] = []
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        deliver = while_attached(app.screen, lambda *a: calls.append(a))
        deliver(1)
    deliver(2)  # the app has exited
    assert calls == [(1,)]


async def test_a_workers_results_for_a_screen_being_removed_are_dropped():
    """A screen being removed is still attached while Textual takes its children away first (the app quitting
    removes every screen so). Results arriving in that window are dropped: the CI run of d6d46c3 failed on a
    NoMatches for the jobs table, raised as the app's error when a test's app shut down mid-poll."""
    from textual.app import App, ComposeResult
    from textual.css.query import NoMatches
    from textual.screen import Screen
    from textual.widgets import Static

    from tui.screens.base import while_attached

    seen: list[str] = []

    class Body(Screen[None]):
        def compose(self) -> ComposeResult:
            yield Static("rows", id="rows")

        def on_unmount(self) -> None:
            # Unmount comes once the children have gone, and the screen is still in the app: the window a
            # worker's result can land in.
            assert self.is_attached
            try:
                self.query_one("#rows")
            except NoMatches:
                seen.append("children gone")
            while_attached(self, lambda: seen.append(str(self.query_one("#rows"))))()
            seen.append("dropped")

    class Probe(App[None]):
        def on_mount(self) -> None:
            self.push_screen(Body())

    app = Probe()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, Body)
    assert seen == ["children gone", "dropped"]
