"""`fleetdeck demo` is the product on simulated hardware: its own folder and store, its own profiles and
specs in the start dialogs (run on the vLLM simulator and the simulated trainer), a Fleet that holds what
its Servers and Jobs screens show, and a lifetime tied to its terminal.

The dialogs are driven through Pilot on the demo's own folders (the backend is not started: each test
starts what it needs through the dialogs or the engine). The lifetime test runs `fleetdeck demo` for real
in a pseudo-terminal and hangs it up.
"""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from textual.widgets import Input, Select, Static

from engine.audit import trail as audit
from engine.demo.home import DemoHome, DemoProcesses, stop_everything
from engine.finetune import jobs
from engine.vllm import launcher
from engine.vllm.profile import load_profile
from fleet.simulated import demo_fleet
from store.db import open_store
from tests.helpers import wait_for
from tests.tui_helpers import open_dialog, press_and_confirm, ready, settle, static_text, until
from tui.app import AppOptions, FleetDeckApp
from tui.screens.jobs import JobsScreen, StartJobScreen
from tui.screens.servers import ServersScreen, StartServerScreen

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(monkeypatch):
    """The demo's folder (under the test's own XDG data dir), prepared; whatever the test started in its
    store is stopped at the end, by its recorded pid and create time."""
    monkeypatch.delenv("FLEETDECK_VLLM", raising=False)  # the demo's profiles name their own vLLM command
    h = DemoHome.default()
    h.prepare()
    yield h
    if h.store.exists():
        store = open_store(h.store)
        stop_everything(store)
        store.close()


def demo_app(home: DemoHome, live: DemoProcesses) -> FleetDeckApp:
    from fleet.config import FleetConfig

    return FleetDeckApp(AppOptions(sources_factory=lambda: demo_fleet(live=live), store_path=home.store,
                                   config=FleetConfig(adapter_roots=[home.adapters]), simulated=True, poll=False,
                                   show_clock=False, demo_home=home, folders=home.folders()))


def test_the_demo_folder_holds_its_own_profiles_specs_and_models(home):
    assert home.root.is_relative_to(Path(os.environ["XDG_DATA_HOME"]))
    names = sorted(p.stem for p in home.profiles.glob("*.toml"))
    assert names == ["llama-3.1-8b", "llama-3.2-3b", "mistral-7b-awq", "qwen3-8b"]
    for name in names:  # each names a model folder the planner reads, and the simulator as its vLLM
        profile = load_profile(home.profiles / f"{name}.toml")
        assert (Path(profile.model) / "config.json").is_file()
        assert profile.command()[1:] == ["-m", "engine.vllm.simulator"]
    assert sorted(p.stem for p in home.specs.glob("*.toml")) == ["notes-v2", "tickets-v5"]


async def test_start_a_server_from_the_demo_dialog_and_see_it_on_its_gpu(home):
    live = DemoProcesses(home.store, max_age_s=0.0)
    app = demo_app(home, live)
    with audit.session(home.store, "tui"):
        async with app.run_test(size=(120, 34)) as pilot:
            dialog = await open_dialog(app, pilot, "3", "s", StartServerScreen)
            assert sorted(dialog.profiles) == ["llama-3.1-8b", "llama-3.2-3b", "mistral-7b-awq", "qwen3-8b"]
            dialog.query_one("#start-gpus", Input).value = "sim-a10-02/0"
            dialog.query_one("#start-profile", Select).value = "qwen3-8b"  # its 8 LoRA slots leave an A10 no KV cache
            await settle(app, pilot)
            assert "No available memory for the cache blocks: weights 15.26 GiB + LoRA slots 2.90 GiB" in static_text(dialog.query_one("#start-verdict", Static))
            dialog.query_one("#start-profile", Select).value = "llama-3.2-3b"
            await settle(app, pilot)
            await pilot.press("ctrl+s")
            await settle(app, pilot, 5)
            assert not isinstance(app.screen, StartServerScreen), static_text(dialog.query_one("#start-verdict", Static))
            store = open_store(home.store)
            (rec,) = launcher.list_servers(store)
            assert (rec.node, str(rec.gpus), rec.name) == ("sim-a10-02", "0", "llama-3.2-3b")
            assert Path(rec.log_path).parent == home.server_logs  # the demo's logs stay in the demo's folder
            assert launcher.wait_ready(store, rec, timeout=60, poll=0.2).state == "ready"
            app.poll_once_sync()
            gpu = next(g for g in app.poller.latest["sim-a10-02"].gpus if g.index == 0)
            (proc,) = gpu.processes  # the server's own process, holding what vLLM would take of the GPU
            assert (proc.pid, proc.kind, proc.model) == (rec.pid, "vllm", "llama-3.2-3b")
            assert proc.gpu_memory_bytes == int(gpu.memory_total_bytes * 0.9)
            other = next(g for g in app.poller.latest["sim-a10-02"].gpus if g.index == 1)
            assert other.processes == []  # nothing on the Fleet that Servers and Jobs do not show
    live.close()


async def test_restart_of_a_crashed_demo_server_keeps_the_crash_in_history(home, monkeypatch):
    store = open_store(home.store)
    monkeypatch.setenv("FLEETDECK_SIM_CRASH", "oom_weights")  # this run dies as vLLM does when out of memory
    crashed, _ = launcher.start(store, load_profile(home.profiles / "llama-3.1-8b.toml"), [3], force=True,
                                node="sim-h100-01", log_dir=home.server_logs)
    assert wait_for(lambda: launcher.refresh(store, launcher.get(store, crashed.id)).state == "crashed", timeout=60)
    monkeypatch.delenv("FLEETDECK_SIM_CRASH")
    diagnosis = launcher.get(store, crashed.id).reason
    assert "CUDA ran out of memory" in diagnosis
    live = DemoProcesses(home.store, max_age_s=0.0)
    app = demo_app(home, live)
    with audit.session(home.store, "tui"):
        async with app.run_test(size=(120, 34)) as pilot:
            await ready(app, pilot)
            await pilot.press("3")
            await settle(app, pilot)
            assert isinstance(app.screen, ServersScreen)
            assert "CUDA ran out of memory" in static_text(app.screen.query_one("#servers-detail", Static))
            await press_and_confirm(app, pilot, "r")
            await settle(app, pilot, 5)
    old, new = launcher.list_servers(store)
    assert old.id == crashed.id and (old.state, old.reason) == ("crashed", diagnosis)
    assert (new.name, new.node, str(new.gpus)) == ("llama-3.1-8b", "sim-h100-01", "3") and new.state in ("starting", "ready")
    assert launcher.wait_ready(store, new, timeout=60, poll=0.2).state == "ready"
    actions = [(r["action"], r["target"], r["outcome"]) for r in reversed(audit.query(store))]
    assert actions == [("server.start", new.id, "done")]  # the restart started a new run and stopped nothing
    live.close()


async def test_start_cancel_and_resume_a_demo_fine_tune_from_the_keyboard(home):
    live = DemoProcesses(home.store, max_age_s=0.0)
    app = demo_app(home, live)
    store = open_store(home.store)
    with audit.session(home.store, "tui"):
        async with app.run_test(size=(120, 34)) as pilot:
            dialog = await open_dialog(app, pilot, "4", "s", StartJobScreen)
            assert sorted(dialog.specs) == ["notes-v2", "tickets-v5"]
            dialog.query_one("#job-gpus", Input).value = "sim-a10-02/1"
            dialog.query_one("#job-spec", Select).value = "notes-v2"
            await settle(app, pilot)
            assert "200 examples (chat)" in static_text(dialog.query_one("#job-check", Static))
            await pilot.press("ctrl+s")
            await settle(app, pilot, 5)
            (rec,) = jobs.list_jobs(store)
            assert (rec.node, str(rec.gpus), rec.spec["backend"]) == ("sim-a10-02", "1", "simulated")
            assert Path(rec.workdir).parent == home.jobs
            assert wait_for(lambda: jobs.last_step(rec) is not None, timeout=30)
            app.poll_once_sync()
            (proc,) = next(g for g in app.poller.latest["sim-a10-02"].gpus if g.index == 1).processes
            assert (proc.pid, proc.kind) == (rec.pid, "finetune")
            screen = app.screen
            assert isinstance(screen, JobsScreen)
            screen.reload()
            await settle(app, pilot)
            await press_and_confirm(app, pilot, "c")
            for _ in range(40):
                await settle(app, pilot)
                if jobs.refresh(store, jobs.get(store, rec.id)).state == "cancelled":
                    break
            assert jobs.get(store, rec.id).state == "cancelled"
            screen.reload()
            await settle(app, pilot)
            await pilot.press("r")
            await settle(app, pilot, 5)
            assert jobs.get(store, rec.id).state == "running"
    actions = [(r["action"], r["outcome"]) for r in reversed(audit.query(store))]
    assert actions == [("job.start", "done"), ("job.cancel", "done"), ("job.resume", "done")]
    live.close()


async def test_esc_in_a_start_dialog_starts_nothing_and_esc_during_a_start_says_so(home):
    """Esc closed the dialog while its worker went on to start the server (seen driving the demo: Esc
    right after ctrl+s, then "started llama-3.2-3b-..." on the message line). Now Esc settles it: a start
    not yet begun never begins; one under way keeps the dialog up and says so."""
    import asyncio

    live = DemoProcesses(home.store, max_age_s=0.0)
    app = demo_app(home, live)
    store = open_store(home.store)
    with audit.session(home.store, "tui"):
        async with app.run_test(size=(80, 24)) as pilot:
            for cls, key in ((StartServerScreen, "3"), (StartJobScreen, "4")):
                dialog = await open_dialog(app, pilot, key, "s", cls)
                dialog.gate.begin()  # a start under way (the worker between its plan and the node's answer)
                await pilot.press("escape")
                await pilot.pause()
                assert app.screen is dialog
                status = dialog.query_one("#start-verdict" if cls is StartServerScreen else "#job-check", Static)
                assert "already: it is listed when it has started" in static_text(status)
                dialog.gate.end()  # that start failed: the dialog stays, and Esc now closes it
                if cls is StartServerScreen:
                    dialog.query_one("#start-gpus", Input).value = "sim-a10-02/0"
                    dialog.query_one("#start-profile", Select).value = "llama-3.2-3b"
                else:
                    dialog.query_one("#job-gpus", Input).value = "sim-a10-02/1"
                    dialog.query_one("#job-spec", Select).value = "notes-v2"
                await settle(app, pilot)
                await pilot.press("escape")
                await pilot.pause()
                assert app.screen is not dialog
                await asyncio.to_thread(dialog._launch_now)  # the worker reaching its start after the Esc
                await settle(app, pilot)
            assert launcher.list_servers(store) == [] and jobs.list_jobs(store) == []
    assert [r["action"] for r in audit.query(store)] == []  # nothing was started, so nothing to record
    live.close()


def test_the_flaky_nodes_agent_ends_when_its_dashboard_is_gone_not_when_its_timer_fires(tmp_path):
    """The demo's sim-remote-04 agent (`--exit-after`, a node that drops) lingered after its dashboard was
    killed outright: its timer thread kept the process until the timer fired. It ends at EOF now."""
    agent = subprocess.Popen([sys.executable, "-m", "fleetdeck", "agent", "--stdio", "--simulated", "--node-name",
                              "sim-remote-04", "--exit-after", "3600", "--store", str(tmp_path / "r.db")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        assert b'"hello"' in agent.stdout.readline()  # it is serving
        agent.stdin.close()  # the dashboard's end of the pipe, gone with the dashboard
        assert agent.wait(timeout=300) == 0  # long before its hour: it ends at EOF
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


async def test_a_clumsy_gpu_field_gets_one_line_in_the_dialogs_words_and_starts_nothing(home):
    live = DemoProcesses(home.store, max_age_s=0.0)
    app = demo_app(home, live)
    store = open_store(home.store)
    cases = {"": "type the GPUs", "   ": "type the GPUs", "sim-a10-02/": "type the GPUs",
             "sim-a10-02/0,0": "GPUs are distinct indices", "sim-a10-02/x": "GPUs are distinct indices",
             "sim-a10-02/-1": "GPUs are distinct indices", "nosuch/0": "no node 'nosuch'",
             "sim-a10-02/5": "no GPU [5] on sim-a10-02"}
    with audit.session(home.store, "tui"):
        async with app.run_test(size=(80, 24)) as pilot:
            dialog = await open_dialog(app, pilot, "3", "s", StartServerScreen)
            dialog.query_one("#start-profile", Select).value = "llama-3.2-3b"
            field = dialog.query_one("#start-gpus", Input)
            for typed, words in cases.items():
                field.value = typed
                field.focus()
                await pilot.press("enter")
                await settle(app, pilot)
                await pilot.press("ctrl+s")  # and a start anyway: refused with the same line
                await settle(app, pilot)
                verdict = static_text(dialog.query_one("#start-verdict", Static))
                assert words in verdict and "--gpus" not in verdict and "Traceback" not in verdict, (typed, verdict)
                assert app.screen is dialog
    assert launcher.list_servers(store) == []
    live.close()


def test_reset_ends_what_the_demo_started_and_clears_its_folder(home, capsys):
    from fleetdeck.cli import main

    store = open_store(home.store)
    rec, _ = launcher.start(store, load_profile(home.profiles / "llama-3.2-3b.toml"), [0], force=True,
                            node="sim-ws-4090", log_dir=home.server_logs)
    store.close()
    assert main(["demo", "--store", str(home.root / "other.db")]) == 2
    assert "the demo keeps its own store" in capsys.readouterr().err
    assert main(["demo", "--reset"]) == 0
    out = capsys.readouterr().out
    assert f"server {rec.id} (pid {rec.pid})" in out and "removed" in out
    assert not home.root.exists()
    assert not rec.alive()


def test_after_a_reset_the_next_demos_audit_chain_is_intact_not_broken(home, capsys):
    """The demo store's audit checkpoint (beside the key, outside the demo folder) outlived --reset, and
    the next demo's Audit screen said CHAIN BROKEN: 'the store had no record where the checkpoint held'."""
    from fleetdeck.cli import main

    def record_and_verify() -> str:
        store = open_store(home.store)
        try:
            with audit.session(home.store, "tui"):
                for i in range(3):
                    audit.append(store, "server.start", f"s-{i}", "done", source="demo", node="sim-h100-01")
                verdict = audit.verify(store, audit.anchor_for(store.path), None)
        finally:
            store.close()
        assert verdict.ok, verdict.message
        return verdict.message

    record_and_verify()
    checkpoint = audit.anchor_for(home.store).checkpoint_file
    assert checkpoint.exists()
    assert main(["demo", "--reset"]) == 0
    assert not checkpoint.exists() and not home.root.exists()
    home.prepare()
    record_and_verify()  # a fresh demo store: its own chain, intact
    assert audit.anchor_for(home.store).key_file.exists()  # the node's audit key was left alone


def test_one_demo_at_a_time(home):
    from engine.demo.home import DemoBusy

    held = home.lock()
    try:
        probe = subprocess.run([sys.executable, "-c", "from engine.demo.home import DemoHome; DemoHome.default().lock()"],
                               capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert probe.returncode != 0 and DemoBusy.__name__ in probe.stderr and f"pid {os.getpid()}" in probe.stderr
    finally:
        os.close(held)


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def test_a_hangup_ends_everything_the_demo_started(tmp_path):
    """`fleetdeck demo` in a real pseudo-terminal, hung up (SIGHUP, as when the SSH session drops): none of
    the processes it started, recorded as its process tree while it ran, is left."""
    env = {**os.environ, "XDG_DATA_HOME": os.environ["XDG_DATA_HOME"], "PYTHONPATH": str(ROOT), "TERM": "xterm-256color",
           "COLUMNS": "80", "LINES": "24"}
    env.pop("FLEETDECK_VLLM", None)
    home = DemoHome.default()
    pid, fd = pty.fork()
    if pid == 0:  # the child: the demo, on the pty as its terminal
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, "-m", "fleetdeck", "demo"], env)
    seen: dict[int, psutil.Process] = {}
    try:
        def drain() -> None:
            import select

            for _ in range(256):  # bounded: a dashboard that keeps drawing must not hold the test here
                if not select.select([fd], [], [], 0)[0]:
                    return
                try:
                    os.read(fd, 65536)  # the dashboard's frames: read so that it never blocks writing
                except OSError:
                    return

        def started() -> bool:
            drain()
            for p in _tree(pid):
                seen.setdefault(p.pid, p)
            if not home.store.exists():
                return False
            store = open_store(home.store)
            try:
                servers = [r for r in launcher.list_servers(store) if r.alive()]
                running = [j for j in jobs.list_jobs(store) if j.alive()]
            finally:
                store.close()
            kinds = {" ".join(p.cmdline()[1:4]) for p in seen.values() if _running(p)}
            return len(servers) >= 2 and running and any("fleetdeck proxy" in k for k in kinds)

        assert wait_for(started, timeout=180, step=0.5), "the demo did not start its backend, servers, job and proxy"
        helpers = [p for p in seen.values() if p.pid != pid]
        assert len(helpers) >= 6  # backend, proxy, three simulators, the fine-tune, the remote node's agent
        os.kill(pid, signal.SIGHUP)
        os.close(fd)  # and the terminal goes, as it does when the session drops
        fd = -1
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status), status  # it caught the hangup and ended itself (not killed by the signal)
        gone = wait_for(lambda: not any(_running(p) for p in helpers), timeout=60, step=0.2)
        assert gone, f"left running: {[p.pid for p in helpers if _running(p)]}"
        assert not home.helpers.path.exists()  # the record of helpers is emptied as they end
    finally:
        if fd >= 0:
            os.close(fd)
        for p in [*seen.values()]:  # only what this test started (psutil checks each pid's create time)
            try:
                p.kill()
            except psutil.Error:
                pass
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def test_a_new_demo_ends_what_an_earlier_one_left_by_pid_and_create_time(home):
    """A demo killed outright (SIGKILL) leaves its helpers; the next one ends them, but only the processes
    recorded: a recorded pid that now belongs to another process (its create time differs) is left alone."""
    left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        assert home.helpers.add(left.pid, "demo backend", group=True) is not None
        # This test's own process, as if its pid had been recorded for an earlier process: never signalled.
        mine = psutil.Process(os.getpid())
        with open(home.helpers.path, "a") as fh:
            fh.write(f'{{"pid": {mine.pid}, "create_time": {mine.create_time() - 100}, "what": "reused pid", "group": false}}\n')
        ended = home.end_leftovers()
        assert ended == [f"demo backend (pid {left.pid})"]
        assert left.wait(timeout=30) is not None
        assert psutil.pid_exists(os.getpid()) and not home.helpers.path.exists()
    finally:
        if left.poll() is None:
            left.kill()
            left.wait()


async def test_swap_an_adapter_in_a_demo_server_from_the_keyboard(home):
    from textual.widgets import DataTable

    from tui.screens.servers import AdaptersScreen

    store = open_store(home.store)
    rec, _ = launcher.start(store, load_profile(home.profiles / "mistral-7b-awq.toml"), [0], force=True,
                            node="sim-h100-01", log_dir=home.server_logs, adapter_roots=[home.adapters])
    assert launcher.wait_ready(store, rec, timeout=60, poll=0.2).state == "ready"
    live = DemoProcesses(home.store, max_age_s=0.0)
    app = demo_app(home, live)
    with audit.session(home.store, "tui"):
        async with app.run_test(size=(80, 24)) as pilot:
            panel = await open_dialog(app, pilot, "3", "a", AdaptersScreen, 4)
            for _ in range(40):  # the listing is read in a worker
                if panel.disk:
                    break
                await settle(app, pilot, 1)
            assert panel.loaded_names == ["tickets-v3"], static_text(panel.query_one("#adapters-message", Static))  # preloaded
            disk = panel.query_one("#adapters-disk", DataTable)
            assert str(disk.get_cell("notes-v1", disk.ordered_columns[1].key)) == "no"  # trained on Qwen3-8B; Compatible is second
            # ... and in sight at 80 columns, whatever the base model's length (it was past the right edge)
            assert sum(c.get_render_width(disk) for c in disk.ordered_columns[:2]) <= disk.scrollable_content_region.width
            disk.move_cursor(row=disk.get_row_index("tickets-v4"))
            await pilot.press("tab")  # to the loaded list, where tickets-v3 is highlighted
            await press_and_confirm(app, pilot, "w")
            for _ in range(40):
                await settle(app, pilot, 1)
                if panel.loaded_names == ["tickets-v4"]:
                    break
            assert panel.loaded_names == ["tickets-v4"] and "tickets-v3 unloaded" in panel.last_message
    live.close()


async def test_the_ending_stops_the_node_sources_before_the_helpers_end(tmp_path):
    # A hangup on a stalled terminal never reaches on_unmount; the ending itself must stop the remote
    # nodes' reconnect loops, or the demo's flaky agent is started again while the helpers end.
    import threading

    from tui.app import AppOptions, FleetDeckApp

    from fleet.simulated import demo_fleet

    source, seen = demo_fleet()[0], []
    closes: list[int] = []
    source.close = lambda: closes.append(1)  # a RemoteNode's close stops its reconnecting agent
    release = threading.Event()

    def end_helpers() -> None:
        seen.append(len(closes))  # what the helpers' ending sees when it starts
        release.wait(30)

    app = FleetDeckApp(AppOptions(sources_factory=lambda: [source], store_path=tmp_path / "fd.db", poll=False,
                                  end_helpers=end_helpers))
    async with app.run_test(size=(80, 24)) as pilot:
        from tests.tui_helpers import until

        await until(app, pilot, lambda: app.poller.sources, "the sources are open")
        ender = app.begin_ending()
        assert ender is not None
        release.set()
        ender.join(30)
        assert seen == [1]


async def test_sources_that_open_after_the_ending_began_are_stopped_at_once(tmp_path):
    from fleet.simulated import demo_fleet
    from tests.tui_helpers import until
    from tui.app import AppOptions, FleetDeckApp

    source = demo_fleet()[0]
    closes: list[int] = []
    source.close = lambda: closes.append(1)
    app = FleetDeckApp(AppOptions(sources_factory=lambda: [source], store_path=tmp_path / "fd.db", poll=False))
    app.begin_ending()  # a SIGHUP before the dashboard has opened its nodes
    async with app.run_test(size=(80, 24)) as pilot:
        await until(app, pilot, lambda: app.poller.sources, "the sources are open")
        assert closes == [1]


def test_a_signal_that_lands_inside_the_endings_lock_does_not_deadlock_the_dashboard(tmp_path):
    # A SIGTERM right after a SIGHUP arrives while the main thread is inside the ending's lock (starting the
    # ending's thread); the handler used to take the same lock in the same thread and hang the dashboard for
    # good. Run in a process of its own, so that a regression fails on the timeout instead of hanging pytest.
    script = tmp_path / "lock.py"
    script.write_text(textwrap.dedent(f"""
        import signal, sys, threading
        sys.path.insert(0, {str(ROOT)!r})
        from fleetdeck.dashboard import on_signal
        from tui.app import AppOptions, FleetDeckApp

        ended = threading.Event()
        app = FleetDeckApp(AppOptions(sources_factory=lambda: [], store_path=None, poll=False,
                                      end_helpers=ended.set))
        app.terminal_lost = lambda: (app.begin_ending(), ended.wait(30))  # what the handler's thread runs
        with app._ending_lock:  # the main thread inside the lock when the signal lands
            on_signal(app)(signal.SIGTERM, None)
            print("handler returned", flush=True)
        print("ended" if ended.wait(30) else "not ended", flush=True)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.stdout.split("\n")[:2] == ["handler returned", "ended"], out.stderr[-2000:]


def _bind_conventional_ports(first: int = 8000, last: int = 8010) -> tuple[list[Any], set[int]]:
    """Hold 8000..8010 as a parallel test run (or a real service) would. A port some other process holds
    already is held all the same; the set says which ones this test holds itself."""
    import socket

    held, mine = [], set()
    for port in range(first, last + 1):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            s.close()
            continue
        held.append(s)
        mine.add(port)
    return held, mine


async def test_the_demo_starts_and_serves_with_8000_to_8010_taken(home):
    """The demo's servers took ports from 8000, in the way of a parallel test run (or a real service) on
    the host, and it in theirs. Now the OS picks them from its ephemeral range, and every place that shows
    or uses a port follows the one taken: the server answers there, the Fleet's process and the Servers
    row show it, and a server started from the dialog gets one the same way."""
    import httpx

    from engine.vllm.demo import DEMO_NODE, DEMO_SERVERS, start_demo_servers

    held, _ = _bind_conventional_ports()
    low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    store = open_store(home.store)
    live = DemoProcesses(home.store, max_age_s=0.0)
    try:
        node = next(n for n in demo_fleet(live=live) if n.name == DEMO_NODE)
        with audit.session(home.store, "demo"):
            started = start_demo_servers(store, home, lambda i: node.snapshot().gpus[i])
        assert len(started) == len(DEMO_SERVERS)
        app = demo_app(home, live)
        with audit.session(home.store, "tui"):
            async with app.run_test(size=(200, 40)) as pilot:
                dialog = await open_dialog(app, pilot, "3", "s", StartServerScreen)
                dialog.query_one("#start-gpus", Input).value = "sim-a10-02/0"
                dialog.query_one("#start-profile", Select).value = "llama-3.2-3b"
                await settle(app, pilot)
                await pilot.press("ctrl+s")
                await until(app, pilot, lambda: len(launcher.list_servers(store)) == len(started) + 1, "the dialog's start")
                recs = launcher.list_servers(store)
                for rec in recs:
                    assert rec.port is not None and low <= rec.port <= high, (rec.id, rec.port)
                    assert not 8000 <= rec.port <= 8010
                assert len({r.port for r in recs}) == len(recs)
                # The backend's llama-3.1-8b dies after a minute (FLEETDECK_SIM_CRASH_AFTER): on a loaded
                # machine it may be gone by now, so the serving checks leave it out.
                serving = [r for r in recs if r.name != "llama-3.1-8b"]
                for rec in serving:
                    assert launcher.wait_ready(store, rec, timeout=60, poll=0.2).state == "ready", rec.id
                    with httpx.Client(trust_env=False) as client:
                        models = client.get(f"{rec.base_url}/v1/models", timeout=10).json()
                    assert models["data"][0]["id"] == rec.served_name  # the server answers on the port recorded
                app.poll_once_sync()
                on_gpus = {p.pid: p.port for n in app.poller.latest.values() for g in n.gpus for p in g.processes}
                assert {r.pid: r.port for r in recs if r.pid in on_gpus} == on_gpus  # the Fleet shows each one's port
                assert {r.pid for r in serving} <= set(on_gpus)
                screen = app.screen
                assert isinstance(screen, ServersScreen)
                screen.reload()
                await until(app, pilot, lambda: len(screen.views) == len(recs), "the Servers rows")
                table = screen.query_one("#servers-table")
                assert "port" in table.shown_columns
                for rec in recs:
                    assert table.cells_of(rec.id)["port"] == str(rec.port)
    finally:
        for s in held:
            s.close()
        live.close()


def test_servers_the_demo_stopped_as_it_ended_say_so_not_that_the_operator_did(home):
    """The next demo listed its predecessor's servers as "stopped by the operator", though the operator had
    only pressed q (or closed the terminal)."""
    from engine.demo.home import DEMO_ENDED

    store = open_store(home.store)
    with audit.session(home.store, "demo"):
        rec, _ = launcher.start(store, load_profile(home.profiles / "llama-3.2-3b.toml"), [0], force=True,
                                node="sim-ws-4090", log_dir=home.server_logs)
        assert stop_everything(store) == [f"server {rec.id} (pid {rec.pid})"]
    ended = launcher.get(store, rec.id)
    assert (ended.state, ended.reason) == ("stopped", DEMO_ENDED)
    assert not psutil.pid_exists(rec.pid) or psutil.Process(rec.pid).status() == psutil.STATUS_ZOMBIE
    store.close()


def test_a_demo_folder_from_before_keeps_its_edits_and_its_untouched_profiles_take_os_ports(home):
    """Profiles are written once (an operator's edit is kept): an untouched one, as an earlier fleetdeck
    wrote it (ports from 8000), is brought up to date; an edited one is left as the operator left it."""
    from engine.vllm.demo import DEMO_PROFILES, profile_before_os_port, profile_toml

    untouched, edited = (home.profiles / f"{p.name}.toml" for p in DEMO_PROFILES[:2])
    untouched.write_text(profile_before_os_port(profile_toml(DEMO_PROFILES[0], home.models)))
    mine = profile_before_os_port(profile_toml(DEMO_PROFILES[1], home.models)).replace("max_model_len = 32768",
                                                                                      "max_model_len = 16384")
    edited.write_text(mine)
    assert load_profile(untouched).port == "auto"
    home.prepare()
    assert load_profile(untouched).port == "os"
    assert edited.read_text() == mine and load_profile(edited).port == "auto"


def test_a_new_demo_forgets_the_servers_and_jobs_earlier_demos_ended_and_read_only_keeps_them(home, tmp_path):
    """Each run left its servers and job behind as stopped rows; after a few runs the live servers were
    below the fold of an 80x24 Servers table. The backend prunes what earlier runs ended (audited)."""
    from engine.demo.home import forget_earlier_runs
    from tests.test_tui_habits import ended_job, ended_server

    store = open_store(home.store)
    ended_server(store, "mistral-7b-awq-0ld001", "stopped", tmp_path)
    ended_server(store, "llama-3.1-8b-0ld002", "crashed", tmp_path)
    ended_job(store, "ft-tickets-v5-0ld003", "cancelled", tmp_path)
    with audit.session(home.store, "demo", read_only=True):
        assert forget_earlier_runs(store) == []
    assert len(launcher.list_servers(store)) == 2 and len(jobs.list_jobs(store)) == 1
    with audit.session(home.store, "demo"):
        forgotten = forget_earlier_runs(store)
    assert sorted(forgotten) == ["ft-tickets-v5-0ld003", "llama-3.1-8b-0ld002", "mistral-7b-awq-0ld001"]
    assert launcher.list_servers(store) == [] and jobs.list_jobs(store) == []
    assert [(r["action"], r["outcome"]) for r in audit.query(store) if r["outcome"] == "done"] == [
        ("job.prune", "done"), ("server.prune", "done")]
    store.close()


async def test_does_not_fit_shows_why_at_80x24_not_only_the_verdict(home):
    """Starting llama-3.2-3b a second time on sim-a10-02/0 showed "verdict DOES NOT FIT" on the dialog's
    bottom edge, and ctrl+s then did nothing visible: the why (another process holds 20.74 GiB of that
    GPU) and "Not starting it" were below, reachable only by Tab-ing off the fields and PageDown."""
    from fleet.config import FleetConfig

    app = FleetDeckApp(AppOptions(sources_factory=lambda: demo_fleet(), store_path=home.store,  # A10/0 serves already
                                  config=FleetConfig(adapter_roots=[home.adapters]), simulated=True, poll=False,
                                  show_clock=False, demo_home=home, folders=home.folders()))
    async with app.run_test(size=(80, 24)) as pilot:
        dialog = await open_dialog(app, pilot, "3", "s", StartServerScreen)
        dialog.query_one("#start-profile", Select).value = "llama-3.2-3b"
        field = dialog.query_one("#start-gpus", Input)
        field.value = "sim-a10-02/0"
        field.focus()
        await pilot.press("ctrl+s")
        verdict = dialog.query_one("#start-verdict", Static)
        await until(app, pilot, lambda: "Not starting it" in static_text(verdict), "the refusal")
        box = dialog.query_one("#start-server")
        await until(app, pilot, lambda: box.max_scroll_y > 0 and box.scroll_y == box.max_scroll_y, "the why in sight")
        assert "why: Free memory on device" in static_text(verdict)
        assert app.screen is dialog


def test_the_demo_server_that_dies_while_serving_is_diagnosed_as_such(home, monkeypatch):
    """The demo's llama-3.1-8b, ready for a minute, died printing a start-up OOM ("GPU 0 has a total capacity
    of 23.55 GiB", on an H100) and was diagnosed as running out of memory "while loading the weights or
    warming up". It dies as a serving vLLM does now: its engine process goes, with the kernel error above."""
    store = open_store(home.store)
    monkeypatch.setenv("FLEETDECK_SIM_CRASH_AFTER", "1")
    with audit.session(home.store, "demo"):
        rec, _ = launcher.start(store, load_profile(home.profiles / "llama-3.1-8b.toml"), [3], force=True,
                                node="sim-h100-01", log_dir=home.server_logs)
    assert wait_for(lambda: launcher.refresh(store, launcher.get(store, rec.id)).state == "crashed", timeout=60)
    reason = launcher.get(store, rec.id).reason
    assert "engine process died" in reason and "loading the weights" not in reason, reason
    log = Path(rec.log_path).read_text()
    assert "illegal memory access" in log and "23.55 GiB" not in log
    store.close()
