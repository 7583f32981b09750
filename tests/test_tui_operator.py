"""What a new on-call operator met driving the demo from the keyboard at 80x24, pinned through Pilot:
a State cell cut to its old width when it changed in place ("stopp", "crash", "cancell"), a long job
id pushing LR and ETA off the Jobs table and cutting the State, and keys that did nothing and said
nothing (stop an ended server, cancel a finished job, resume a running one, a key on an empty table)."""

from __future__ import annotations

import sys

from rich.text import Text
from textual.app import App, ComposeResult

from engine.finetune.jobs import JobRecord, JobState
from engine.managed import LocalGpus
from store.db import open_store
from tests.test_tui_habits import ended_job, ended_server
from tests.tui_helpers import FIXED_NOW, make_app, ready, settle, static_text, until
from tui.chrome import FlashLine
from tui.screens import jobs as jobs_screen
from tui.screens import servers as servers_screen
from tui.screens.jobs import JobsScreen
from tui.table import DeckTable, cut_middle


def row_text(table: DeckTable, row: int) -> str:
    """The characters the table paints on the screen line of its row `row` (below the header)."""
    strip = table.render_line(row + 1)  # line 0 is the header
    return "".join(seg.text for seg in strip)


def cell_text(table: DeckTable, key: str, col: str) -> str:
    value = table.get_cell(key, col)
    return value.plain if isinstance(value, Text) else str(value)


class OneTable(App[None]):
    """A screen's column spec in a table as wide as the terminal, as the screens lay it out."""

    def __init__(self, columns: tuple) -> None:
        super().__init__()
        self.columns = columns

    def compose(self) -> ComposeResult:
        yield DeckTable(self.columns, id="t")


def app_over(tmp_path, servers=(), jobs=()):
    """A dashboard over a store holding the given (id, state) servers and jobs, each ended or as stated."""
    store = open_store(tmp_path / "fd.db")
    for sid, state in servers:
        ended_server(store, sid, state, tmp_path)
    for jid, state in jobs:
        ended_job(store, jid, state, tmp_path)
    store.close()
    return make_app(store_path=tmp_path / "fd.db")


async def press_on(app, pilot, screen_key: str, key: str) -> None:
    """Go to a screen, let it load, press a key there and let it answer."""
    await pilot.press(screen_key)
    await settle(app, pilot)
    await pilot.press(key)
    await pilot.pause()


def job_cells(name: str, node: str, state: str) -> list:
    return [name, node, Text(state), "0", Text("███▌   50%"), "60/120", "1.0331", "1.60e-04", "1,234", "1m00s", "2m00s"]


async def test_a_state_that_changes_in_place_is_shown_whole_not_cut_to_its_old_width():
    app = OneTable(servers_screen.COLUMNS)
    async with app.run_test(size=(80, 24)) as pilot:
        table = app.query_one("#t", DeckTable)
        row = ["mistral-7b-awq-1c331c", "sim-h100-01", Text("ready"), "0", "8000", "851", "", "", "", "59/194"]
        table.set_rows([("a", row + [""] * 4)])
        await pilot.pause()
        for state in ("stopped", "crashed", "stopping"):  # written cell by cell, not rebuilt
            row[2] = Text(state)
            table.set_rows([("a", row + [""] * 4)])
            await pilot.pause()
            assert cell_text(table, "a", "state") == state
            assert f" {state} " in row_text(table, 0), row_text(table, 0)
            # What the README promises at 80 columns stays: the server gives way (cut in its middle).
            assert {"id", "node", "state", "gpus", "gen", "ttft"} <= set(table.shown_columns)
        assert "1c331c" in row_text(table, 0)  # the id's unique tail stays


async def test_a_long_job_id_gives_way_so_state_lr_and_eta_stay_at_80_columns():
    app = OneTable(jobs_screen.COLUMNS)
    async with app.run_test(size=(80, 24)) as pilot:
        table = app.query_one("#t", DeckTable)
        rows = [("a", job_cells("ft-tickets-v5-99065f (sim)", "sim-h100-01", "running")),
                ("b", job_cells("ft-notes-v2-support-tickets-2026-q4-8ed786 (sim)", "sim-remote-04", "running"))]
        table.set_rows(rows)
        await pilot.pause()
        rows[1] = ("b", job_cells("ft-notes-v2-support-tickets-2026-q4-8ed786 (sim)", "sim-remote-04", "cancelled"))
        table.set_rows(rows)
        await pilot.pause()
        assert {"id", "node", "state", "loss", "lr", "eta"} <= set(table.shown_columns)
        line = row_text(table, 1)
        assert " cancelled " in line and "1.60e-04" in line and "2m00s" in line, line
        assert "…" in line and "8ed786 (sim)" in line  # cut in the middle: the unique tail stays
        assert len(line.rstrip()) <= 80
        # Wide again: nothing is cut, and the columns that hid come back.
        await pilot.resize_terminal(160, 30)
        await pilot.pause()
        assert "ft-notes-v2-support-tickets-2026-q4-8ed786 (sim)" in row_text(table, 1)
        assert "progress" in table.shown_columns
        await pilot.resize_terminal(60, 20)  # narrower than the demo is made for: still the whole State
        await pilot.pause()
        assert " cancelled " in row_text(table, 1), row_text(table, 1)


def test_cut_middle_keeps_the_start_and_the_unique_tail_within_the_limit():
    for limit in range(3, 30):
        out = cut_middle("ft-notes-v2-support-tickets-8ed786 (sim)", limit).plain
        assert len(out) == limit and "…" in out and out.endswith(")")
        assert out[0] == "f" or limit < 4  # a head and a tail, the tail as long or one longer


async def test_a_nodes_job_shows_its_own_id_beside_its_node(tmp_path):
    app = make_app(store_path=tmp_path / "fd.db")
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        await pilot.press("4")
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, JobsScreen)
        rec = JobRecord(id="@sim-remote-04:ft-notes-v2-8ed786", name="notes-v2", node="sim-remote-04", pid=None,
                        create_time=None, argv=[], env={}, gpus=LocalGpus((0,)), port=None,
                        log_path=str(tmp_path / "j.log"), spec={"backend": "simulated"}, state=JobState.CANCELLED,
                        reason=None, started_at=FIXED_NOW, ended_at=FIXED_NOW + 60, workdir=str(tmp_path / "j"))
        screen._show([rec], {rec.id: [{"event": "step", "step": 13, "total_steps": 120, "loss": 2.1862,
                                       "learning_rate": 1.6e-4, "elapsed_s": 60, "eta_s": None}]})
        await pilot.pause()
        table = screen.query_one("#jobs-table", DeckTable)
        assert cell_text(table, rec.id, "id") == "ft-notes-v2-8ed786 (sim)"  # the row's key keeps @node:id
        line = row_text(table, 0)
        assert "sim-remote-04" in line and " cancelled " in line and "1.60e-04" in line, line


def flash(app) -> str:
    return static_text(app.screen.query_one(FlashLine))


async def test_keys_that_cannot_act_say_why_instead_of_doing_nothing(tmp_path):
    app = app_over(tmp_path, servers=[("q-0", "stopped")], jobs=[("ft-j-0", "finished")])
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        await press_on(app, pilot, "3", "x")
        assert "q-0 is already stopped" in flash(app)
        assert app.screen.query_one("#servers-table", DeckTable) is app.focused  # no dialog, focus stays
        await press_on(app, pilot, "4", "c")
        assert "ft-j-0 is finished: only a running job can be cancelled" in flash(app)
        await pilot.press("r")
        await pilot.pause()
        assert "only a cancelled or failed job resumes" in flash(app)
        assert app.screen.query_one("#jobs-table", DeckTable) is app.focused


async def test_keys_on_an_empty_servers_or_jobs_table_say_there_is_nothing(tmp_path):
    app = make_app(store_path=tmp_path / "fd.db")
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        await pilot.press("3")
        await settle(app, pilot)
        for key, words in (("x", "No server to stop"), ("r", "No server to restart"), ("l", "No server, so no log")):
            await pilot.press(key)
            await pilot.pause()
            assert words in flash(app), key
        await pilot.press("4")
        await settle(app, pilot)
        for key, words in (("c", "No job to cancel"), ("r", "No job to resume"), ("l", "No job, so no log"),
                           ("v", "No job to serve")):
            await pilot.press(key)
            await pilot.pause()
            assert words in flash(app), key


async def test_a_since_the_audit_screen_cannot_read_is_named_not_read_as_all(tmp_path):
    from engine.audit import trail as audit
    from textual.widgets import Input
    from tests.tui_helpers import open_screen
    from tui.screens.audit import AuditScreen

    path = tmp_path / "fd.db"
    store = open_store(path)
    audit.append(store, "server.start", "t0", "done", source="cli", node="host-a", ts=FIXED_NOW)
    store.close()
    app = make_app(store_path=path)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_screen(app, pilot, "7", AuditScreen)
        await pilot.press("f", *"2 days", "enter")
        await pilot.pause()
        assert "since takes 1h, 24h, 7d, 30d, all; got '2 days'" in flash(app)
        assert app.focused is screen.query_one("#audit-since", Input)  # still there to correct it
        await pilot.press(*["backspace"] * 6, *"30d", "enter")
        await settle(app, pilot)
        assert app.focused is screen.query_one("#audit-table", DeckTable)


async def test_the_router_calibration_view_says_there_is_none_at_80_columns(tmp_path):
    from tests.tui_helpers import open_screen, seeded_store
    from tui.screens.router import RouterScreen

    app = make_app(store_path=seeded_store(tmp_path / "fd.db"))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_screen(app, pilot, "5", RouterScreen)
        await settle(app, pilot)
        await pilot.press("c")
        await settle(app, pilot)
        detail = static_text(screen.query_one("#router-detail"))
        assert "no calibration yet: `fleetdeck calibrate" in detail, detail
        # The chart's title fits its width (plotext drops a wider one: the box was left wordless).
        title = str(screen.query_one("#router-chart").plt.monitor.title)
        assert "no calibration yet" in title and len(title) <= screen.query_one("#router-chart").size.width - 2


async def test_a_log_opens_at_its_end_where_a_crash_says_why(tmp_path):
    from textual.containers import VerticalScroll

    from tui.screens.logs import LogScreen

    log = tmp_path / "server.log"
    log.write_text("".join(f"INFO line {i} " + "--max-model-len 32768 " * 8 + "\n" for i in range(40)) + "ERROR the diagnosis at the end\n")
    app = make_app(store_path=tmp_path / "fd.db")
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        app.push_screen(LogScreen("q-0", str(log)))
        await settle(app, pilot)
        await pilot.pause()
        view = app.screen.query_one("#log-view", VerticalScroll)
        assert view.max_scroll_y > 0 and view.scroll_y == view.max_scroll_y
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, LogScreen)


async def test_a_log_whose_lines_wrap_again_under_the_scrollbar_still_opens_at_its_end(tmp_path):
    """`l` on the demo's crashed server at 80x24 opened its log 3 lines short of the end, the traceback
    below the fold: lines of 75-78 characters wrapped once more when the scrollbar took its two columns,
    after the one scroll to the end had been made. The view is anchored to its end now."""
    from textual.containers import VerticalScroll

    from tui.screens.logs import LogScreen

    log = tmp_path / "server.log"
    lines = [f"INFO {i:02d} " + "x" * (64 + i % 4) for i in range(30)]  # 74-77 characters: they fit, until the bar
    log.write_text("\n".join([*lines, "ERROR torch.OutOfMemoryError: CUDA out of memory (the diagnosis)"]) + "\n")
    app = make_app(store_path=tmp_path / "fd.db")
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        app.push_screen(LogScreen("q-0", str(log)))
        await settle(app, pilot)
        view = app.screen.query_one("#log-view", VerticalScroll)
        await until(app, pilot, lambda: static_text(app.screen.query_one("#log-text")).startswith("INFO 00"), "the log")
        await until(app, pilot, lambda: view.max_scroll_y > 0 and view.scroll_y == view.max_scroll_y, "the log's end")


async def test_dialogs_and_help_fit_a_terminal_narrower_than_80_columns(tmp_path):
    from tui.screens.help import HelpScreen
    from tui.screens.start_server import StartServerScreen

    app = make_app(store_path=tmp_path / "fd.db")
    async with app.run_test(size=(60, 20)) as pilot:
        await ready(app, pilot)
        await pilot.press("3")
        await settle(app, pilot)
        await pilot.press("s")
        await settle(app, pilot)
        assert isinstance(app.screen, StartServerScreen)
        frame = app.screen.query_one("#start-server").region
        assert frame.x >= 0 and frame.right <= 60, frame  # its right border and the Select arrows in sight
        await pilot.press("escape", "question_mark")
        await settle(app, pilot)
        assert isinstance(app.screen, HelpScreen)
        assert app.screen.query_one("#help").region.right <= 60
        await pilot.press("escape")
        await pilot.resize_terminal(80, 24)  # and back: the whole width again
        await pilot.press("s")
        await settle(app, pilot)
        assert app.screen.query_one("#start-server").region.width == 80


async def test_enter_on_an_audit_record_shows_the_whole_of_it_escaped(tmp_path):
    from engine.audit import trail as audit
    from tests.tui_helpers import open_screen
    from tui.screens.audit import AuditScreen
    from tui.screens.logs import LogScreen

    path = tmp_path / "fd.db"
    store = open_store(path)
    reason = "Not loading notes-v1: adapter was trained on Qwen/Qwen3-8B, the server runs Mistral [b]7B[/b]\x1b[31m"
    audit.append(store, "adapter.load", "notes-v1", "refused", reason=reason, source="tui", node="host-a",
                 ts=FIXED_NOW)
    store.close()
    app = make_app(store_path=path)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_screen(app, pilot, "7", AuditScreen)
        table = screen.query_one("#audit-table", DeckTable)
        assert "…" in row_text(table, 0)  # cut at 80 columns: the reason cannot be read in the row
        await pilot.press("enter")
        await settle(app, pilot)
        assert isinstance(app.screen, LogScreen)
        shown_text = static_text(app.screen.query_one("#log-text"))
        assert "the server runs Mistral [b]7B[/b]\\x1b[31m" in shown_text  # whole, as written, escaped
        assert "adapter.load" in shown_text and "host-a" in shown_text
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is screen and app.focused is table


async def test_a_reconnecting_nodes_rows_stay_marked_and_its_keys_say_so(tmp_path):
    """Every 45 s the demo's sim-remote-04 drops and reconnects: its jobs and servers vanished from the
    tables meanwhile, and a key pressed then (`r` resumes at once) acted on the row that slid under the
    cursor. They stay now, marked unreachable; a key on one names the node instead."""
    from fleet.remote import RemoteNode

    # An agent that never says hello: the node stays "connecting", as the demo's does while it reconnects.
    node = RemoteNode("sim-remote-04", [sys.executable, "-c", "import time; time.sleep(600)"])
    app = make_app(sources_factory=lambda: [node], store_path=tmp_path / "fd.db")
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        await pilot.press("4")
        await settle(app, pilot)
        screen = app.screen
        rec = JobRecord(id="@sim-remote-04:ft-notes-v2-8ed786", name="notes-v2", node="sim-remote-04", pid=None,
                        create_time=None, argv=[], env={}, gpus=LocalGpus((0,)), port=None,
                        log_path=str(tmp_path / "j.log"), spec={"backend": "simulated"}, state=JobState.CANCELLED,
                        reason=None, started_at=FIXED_NOW, ended_at=FIXED_NOW + 60, workdir=str(tmp_path / "j"))
        screen._show([rec], {rec.id: []})  # listed while the node answered
        await pilot.pause()
        table = screen.query_one("#jobs-table", DeckTable)
        screen._show([], {}, {"sim-remote-04"})  # the next listing: the node is reconnecting
        await pilot.pause()
        assert [r.key.value for r in table.ordered_rows] == [rec.id]
        assert cell_text(table, rec.id, "state") == "unreachable"
        await pilot.press("r")  # resume: asked of that node, which says it is not connected
        await settle(app, pilot)
        assert "sim-remote-04: not connected" in flash(app)
        screen._show([], {}, set())  # back, and the job no longer listed there: the row goes
        await pilot.pause()
        assert table.row_count == 0


async def test_a_reconnecting_nodes_servers_stay_marked_unreachable(tmp_path):
    from engine.vllm.record import ServerRecord, ServerState
    from fleet.remote import RemoteNode

    node = RemoteNode("sim-remote-04", [sys.executable, "-c", "import time; time.sleep(600)"])
    app = make_app(sources_factory=lambda: [node], store_path=tmp_path / "fd.db")
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        await pilot.press("3")
        await settle(app, pilot)
        screen = app.screen
        rec = ServerRecord(id="@sim-remote-04:qwen3-8b-bf81fb", name="qwen3-8b", node="sim-remote-04", pid=None,
                           create_time=None, argv=[], env={}, gpus=LocalGpus((0,)), port=8001,
                           log_path=str(tmp_path / "s.log"), spec={"model": "m"}, state=ServerState.READY,
                           reason=None, started_at=FIXED_NOW, ended_at=None)
        screen._show([(rec, None)])
        await pilot.pause()
        table = screen.query_one("#servers-table", DeckTable)
        assert cell_text(table, rec.id, "id") == "qwen3-8b-bf81fb" and cell_text(table, rec.id, "state") == "ready"
        screen._show([], {"sim-remote-04"})
        await pilot.pause()
        assert cell_text(table, rec.id, "state") == "unreachable"
        await pilot.press("x")  # asks, then the node says it is not connected: nothing else is stopped
        await pilot.pause()
        await pilot.press("y")
        await settle(app, pilot)
        assert "sim-remote-04: not connected" in flash(app)
        screen._show([(rec, None)], set())  # back: its own state again
        await pilot.pause()
        assert cell_text(table, rec.id, "state") == "ready"


async def test_a_filter_that_matches_nothing_says_so_not_that_there_is_nothing(tmp_path):
    """`/zzz` on the demo's Servers (five servers) read "No servers yet. Press s to start one", and `x`
    "No server to stop: none is listed here". Both now name the filter that hides them, and Esc."""
    app = app_over(tmp_path, servers=[("q-0", "stopped"), ("q-1", "crashed")], jobs=[("ft-j-0", "finished")])
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        for screen_key, detail_id, key, words in (("3", "#servers-detail", "x", "No server to stop"),
                                                  ("4", "#jobs-detail", "c", "No job to cancel")):
            await pilot.press(screen_key)
            await settle(app, pilot)
            await pilot.press("slash", *"zzz", "enter")
            await settle(app, pilot)
            detail = static_text(app.screen.query_one(detail_id))
            assert "Nothing shown: the filter /zzz hides all" in detail and "yet" not in detail, detail
            await pilot.press(key)
            await pilot.pause()
            assert f"{words}: the filter /zzz hides all" in flash(app) and "Esc clears it" in flash(app)
            await pilot.press("escape")
            await settle(app, pilot)
            assert "Nothing shown" not in static_text(app.screen.query_one(detail_id))  # the row under the cursor


async def test_ctrl_c_says_q_quits_in_words_not_raw_markup(tmp_path):
    """ctrl+c showed Textual's "Do you want to quit?: Press [b]ctrl+q[/b] to quit the app", markup and all,
    naming a key the README does not; q is fleetdeck's quit (it also ends the demo's helpers)."""
    app = make_app(store_path=tmp_path / "fd.db")
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        await pilot.press("ctrl+c")
        await pilot.pause()
        said = flash(app)
        assert "press q to quit" in said and "[b]" not in said and "ctrl+q" not in said, said
        assert app.is_running


async def test_adapters_on_an_ended_server_say_it_is_not_running(tmp_path):
    """`a` on the demo's crashed llama-3.1-8b opened the panel as if adapters could load into it."""
    from tui.screens.adapters_panel import AdaptersScreen

    app = app_over(tmp_path, servers=[("q-0", "crashed")])
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        await press_on(app, pilot, "3", "a")
        assert not isinstance(app.screen, AdaptersScreen)
        assert "q-0 is crashed: adapters load into a running server (`r` starts it again)" in flash(app)


async def test_the_adapters_panel_shows_a_refusal_as_written_brackets_included(tmp_path):
    """Loading into a server started without LoRA said "set  enable = true in its profile": "[lora]" was
    read as markup and vanished from the one line that says what to do."""
    from engine.adapters.registry import Adapter
    from engine.nodes.ops import AdapterListing
    from tests.tui_helpers import until
    from tui.screens.adapters_panel import AdaptersScreen

    class Node:
        def adapters(self, sid: str) -> AdapterListing:
            return AdapterListing([Adapter(name="notes-v1", path=str(tmp_path / "notes-v1"), rank=32, alpha=64.0,
                                           target_modules=["q_proj"], base_model="m", size_bytes=1024)])

    store = open_store(tmp_path / "fd.db")
    rec = ended_server(store, "q-0", "ready", tmp_path)  # its profile has no [lora] table: LoRA is off
    store.close()
    app = make_app(store_path=tmp_path / "fd.db")
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        app.push_screen(AdaptersScreen(rec, Node(), rec.id))
        await until(app, pilot, lambda: isinstance(app.screen, AdaptersScreen) and app.screen.disk, "the listing")
        await pilot.press("enter")
        await pilot.pause()
        said = static_text(app.screen.query_one("#adapters-message"))
        assert "set [lora] enable = true in its profile" in said, said


def test_run_wait_ttft_and_e2e_unknown_read_n_a_once():
    """A ready server with no requests yet read "n/a/n/a" under TTFT (and Run/Wait, E2E)."""
    from engine.vllm.metrics import ServerFigures
    from engine.vllm.record import ServerRecord, ServerState

    rec = ServerRecord(id="q-0", name="q", node="host-a", pid=None, create_time=None, argv=[], env={},
                       gpus=LocalGpus((0,)), port=40123, log_path="/nonexistent.log", spec={"model": "m"},
                       state=ServerState.READY, reason=None, started_at=FIXED_NOW)
    cells = servers_screen.ServersScreen._cells(None, servers_screen.ServerView(rec, ServerFigures()))  # type: ignore[arg-type]
    by_col = dict(zip((c.key for c in servers_screen.COLUMNS), cells))
    assert (by_col["reqs"], by_col["ttft"], by_col["e2e"], by_col["port"]) == ("n/a", "n/a", "n/a", "40123")
    full = servers_screen.ServersScreen._cells(None, servers_screen.ServerView(  # type: ignore[arg-type]
        rec, ServerFigures(running=1, waiting=0, ttft_p50=0.05, ttft_p95=0.097, e2e_p50=1.5, e2e_p95=2.25)))
    by_col = dict(zip((c.key for c in servers_screen.COLUMNS), full))
    assert (by_col["reqs"], by_col["ttft"], by_col["e2e"]) == ("1/0", "50/97", "1.50/2.25")


async def test_help_shows_a_long_action_whole_on_two_lines_at_80_columns():
    """`?` at 80x24 cut ctrl+k's action to "Kill the process under the process table's cursor (…", with no
    way to read the rest. The Action column wraps now: the row is as tall as its text."""
    from textual.widgets import DataTable

    from tui.screens.help import HelpScreen

    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        table = app.screen.query_one("#help-table", DataTable)
        rows = {str(table.get_row_at(i)[0]): table.get_row_at(i) for i in range(table.row_count)}
        kill = rows["^k"]
        assert str(kill[1]).startswith("Kill the process under the process table's cursor") and "…" not in str(kill[1])
        assert str(kill[2]) == "Fleet"  # Where is still in sight, beside it
        key = table.coordinate_to_cell_key((list(rows).index("^k"), 0)).row_key
        assert table.rows[key].height >= 2
        assert app.screen.query_one("#help").region.right <= 80


async def test_apply_without_a_calibration_says_which_is_missing_and_for_which_task(tmp_path):
    """`a` on the demo's Router said "No calibrated threshold for this task (run `fleetdeck calibrate`), or
    no router config." with the demo's router config right there: now it says which, naming the task."""
    from tests.helpers import router_history
    from tests.tui_helpers import open_screen
    from tui.screens.router import RouterScreen

    path, cfg = router_history(tmp_path)
    app = make_app(store_path=path)
    app.options.router_config = cfg
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_screen(app, pilot, "5", RouterScreen)
        await settle(app, pilot)
        await pilot.press("a")
        await pilot.pause()
        said = flash(app)
        assert f"No calibrated threshold for {screen.selected} yet: `fleetdeck calibrate {screen.selected} --eval FILE`" in said
        assert "router config" not in said
        app.options.router_config = tmp_path / "gone.toml"
        screen.reload()
        await settle(app, pilot)
        await pilot.press("a")
        await pilot.pause()
        assert f"No router config to write a threshold to ({tmp_path / 'gone.toml'})" in flash(app)


async def test_the_audit_verdict_says_chain_intact_once(tmp_path):
    """The Audit screen read "chain intact: 20 record(s), chain intact (last record 20 anchored)"."""
    from engine.audit import trail as audit
    from tests.tui_helpers import open_screen
    from tui.screens.audit import AuditScreen

    path = tmp_path / "fd.db"
    with audit.session(path, "cli"):
        audit.record("server.start", "q-0", "done")
    app = make_app(store_path=path)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_screen(app, pilot, "7", AuditScreen)
        await settle(app, pilot)
        said = static_text(screen.query_one("#audit-verdict"))
        assert said.count("chain intact") == 1 and said.startswith("1 record(s), chain intact"), said


async def test_enter_on_a_job_shows_its_whole_detail(tmp_path):
    """Beside the loss chart at 80x24, a cancelled job's reason (how to resume it) ran past the bottom edge
    once the table held a few rows. Enter shows the whole detail, Esc goes back."""
    from tui.screens.logs import LogScreen

    store = open_store(tmp_path / "fd.db")
    for i in range(4):
        rec = ended_job(store, f"ft-tickets-v5-00000{i}", "cancelled", tmp_path)
    rec.reason = ("cancelled at step 281; resume continues it (`r` on Jobs, or `fleetdeck finetune resume "
                  f"{rec.id}` on the host it ran on, `--node NAME` from elsewhere)")
    rec.save(store)
    store.close()
    app = make_app(store_path=tmp_path / "fd.db")
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        await pilot.press("4")
        await settle(app, pilot)
        table = app.screen.query_one("#jobs-table", DeckTable)
        table.move_cursor(row=[k for k, _ in table.visible_rows()].index(rec.id))
        await pilot.press("enter")
        await settle(app, pilot)
        assert isinstance(app.screen, LogScreen)
        whole = static_text(app.screen.query_one("#log-text"))
        assert "`--node NAME` from elsewhere)" in " ".join(whole.split()), whole
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, JobsScreen)


async def test_a_key_read_only_disables_says_so_instead_of_doing_nothing(tmp_path):
    """A read-only dashboard: s and x on Servers, c on Jobs, did nothing and said nothing (the
    footer lists them, dimmed). Each says read-only disables it; nothing opens, nothing is asked."""
    from fleet.config import FleetConfig
    from tui.screens.confirm import ConfirmScreen

    app = app_over(tmp_path, servers=[("q-0", "stopped")])
    app.options.config = FleetConfig(read_only=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        for screen_key, key, words in (("3", "s", "Start"), ("3", "x", "Stop"), ("4", "c", "Cancel")):
            await pilot.press(screen_key)
            await settle(app, pilot)
            screen = app.screen
            await pilot.press(key)
            await pilot.pause()
            assert f"Read-only mode: {words} is disabled" in flash(app), (key, flash(app))
            assert app.screen is screen and not isinstance(app.screen, ConfirmScreen)
        await pilot.press("3", "j")  # keys that change nothing still do their work
        await pilot.pause()
        assert "Read-only" not in static_text(app.screen.query_one("#servers-detail"))
