"""Read-only means read-only on every entry point: `fleetdeck --read-only` (the dashboard), every command that
reads, a read-only node agent, `read_only = true` in fleet.toml. Each test hashes the whole tree a node keeps
(the store with its -wal/-shm/-journal, the ledger's journal, the audit key, checkpoint and lock, the servers'
logs, the jobs' folders, the configs): every file's bytes, mode and mtime, and the set of files and folders,
before and after, through the seams operators use (the CLI's main(), the agent's process, the dashboard's
`fleetdeck --read-only` run through Pilot). The one write read-only allows is a refusal's audit record.

Before: `serve ls`, `serve show`, `finetune ls` and `adapters ls` recorded the server or job they found ended
(state reconciliation), `serve logs`, `finetune logs`, `adapters history` and `whatif` opened the store read-write
(its -wal/-shm made and removed), `report` migrated an older store, and the dashboard opened its store read-write
(creating it when missing, migrating an older one) and recorded what its screens found ended.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.audit import trail as audit
from engine.finetune.jobs import JobRecord, JobState
from engine.managed import Cpu, LocalGpus
from engine.vllm.record import ServerRecord, ServerState
from fleetdeck.cli import main
from store.db import open_store
from store.paths import default_store_path
from tests.helpers import make_node_files
from tests.tui_helpers import drain, settle, until

Tree = dict[str, tuple[Any, ...]]


def fingerprint(root: Path) -> Tree:
    """Every file and folder under root: a file's SHA-256, mode, mtime and size; a folder's mode and mtime (a
    file made and removed inside it, an -shm, changes its mtime)."""
    seen: Tree = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            st_ = p.lstat()
            key = str(p.relative_to(root))
            if stat.S_ISREG(st_.st_mode):
                seen[key] = (hashlib.sha256(p.read_bytes()).hexdigest(), st_.st_mode, st_.st_mtime_ns, st_.st_size)
            else:
                seen[key] = (stat.S_IFMT(st_.st_mode), st_.st_mode, st_.st_mtime_ns)
    return seen


def changes(before: Tree, after: Tree) -> list[str]:
    return [f"{k}: {before.get(k)} -> {after.get(k)}" for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]


@dataclass
class Node:
    root: Path
    db: Path
    fleet_toml: Path

    def read_only_by_config(self) -> None:
        self.fleet_toml.write_text("read_only = true\n" + self.fleet_toml.read_text())

    def rows(self, sql: str) -> list[dict[str, Any]]:
        store = open_store(self.db, read_only=True, oldest=1)
        try:
            return store.query(sql)
        finally:
            store.close()


def _dead_pid() -> tuple[int, float]:
    """A pid that was a process a moment ago, and its create time: a server that ended while nobody watched."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    created = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, created


def make_node(root: Path, monkeypatch: pytest.MonkeyPatch, with_store: bool = True) -> Node:
    """A node's whole tree under root: XDG folders, fleet and router configs, and (with_store) a store holding a
    month of router traffic, a server recorded ready and a job recorded running whose processes have ended, the
    server's log and the job's folder, an audit record with its key and checkpoint, and the ledger's journal."""
    from engine.router.demo import backfill, demo_router_toml

    for var, sub in (("XDG_DATA_HOME", "data"), ("XDG_CONFIG_HOME", "config"), ("XDG_STATE_HOME", "state"),
                     ("XDG_CACHE_HOME", "cache"), ("HF_HUB_CACHE", "hf-hub")):
        monkeypatch.setenv(var, str(root / sub))
    (root / "cwd").mkdir(parents=True)
    monkeypatch.chdir(root / "cwd")  # anything written relative to the working folder lands in the tree too
    config = root / "config" / "fleetdeck"
    config.mkdir(parents=True)
    (root / "adapters").mkdir()
    fleet_toml = config / "fleet.toml"
    fleet_toml.write_text(f'adapter_roots = ["{root / "adapters"}"]\n')
    # A launch profile, an adapter, a base model folder, a dataset and a fine-tune spec, in the node's own folders.
    make_node_files(root / "files")
    (config / "profiles").mkdir()
    (root / "files" / "profiles" / "q.toml").rename(config / "profiles" / "q.toml")
    (root / "files" / "adapters" / "tickets-v1").rename(root / "adapters" / "tickets-v1")
    (root / "files" / "config" / "fleetdeck" / "finetune").rename(config / "finetune")
    (config / "router.toml").write_text(demo_router_toml("http://127.0.0.1:9", 4000))
    db = default_store_path()
    if not with_store:
        return Node(root, db, fleet_toml)
    store = open_store(db)
    backfill(store, time.time(), days=3, daily_only_days=2, minute_hours=1)
    pid, created = _dead_pid()
    logs = root / "logs"
    logs.mkdir()
    (logs / "qwen-ended1.log").write_text("INFO: Started server process\n")
    ServerRecord(id="qwen-ended1", name="qwen", node="here", pid=pid, create_time=created, argv=["vllm"], env={},
                 gpus=LocalGpus((0,)), port=18011, log_path=str(logs / "qwen-ended1.log"), spec={"model": "qwen"},
                 state=ServerState.READY, reason=None, started_at=time.time() - 3600).save(store)
    job_dir = root / "jobs" / "ft-ended1"
    job_dir.mkdir(parents=True)
    (job_dir / "progress.jsonl").write_text(json.dumps({"event": "step", "step": 1, "total_steps": 10, "loss": 2.0}) + "\n")
    (job_dir / "job.log").write_text("training\n")
    JobRecord(id="ft-ended1", name="ft", node="here", pid=pid, create_time=created, argv=["python"], env={}, gpus=Cpu(),
              port=None, log_path=str(job_dir / "job.log"), spec={}, state=JobState.RUNNING, reason=None,
              started_at=time.time() - 3600, workdir=str(job_dir)).save(store)
    store.close()
    with audit.session(db, "cli"):
        assert audit.record("server.stop", "old-server", "done", server="old-server") is not None
    Path(f"{db}-ledger.jsonl").write_text("")
    return Node(root, db, fleet_toml)


@pytest.fixture
def node(tmp_path, monkeypatch) -> Node:
    return make_node(tmp_path / "node", monkeypatch)


# What an operator runs to look. Expected exit codes: report exits 3 on drift (the demo history drifts); slurm
# says it is not configured.
READING = {
    "gpus": (["gpus"], (0,)),
    "gpus --json": (["gpus", "--json"], (0,)),
    "fit": (["fit", "Qwen/Qwen3-8B", "--gpu-memory-gib", "80"], (0,)),
    "serve ls": (["serve", "ls"], (0,)),
    "serve ls --json": (["serve", "ls", "--json"], (0,)),
    "serve show": (["serve", "show", "qwen-ended1"], (0,)),
    "serve logs": (["serve", "logs", "qwen-ended1"], (0,)),
    "finetune ls": (["finetune", "ls"], (0,)),
    "finetune ls --json": (["finetune", "ls", "--json"], (0,)),
    "finetune logs": (["finetune", "logs", "ft-ended1"], (0,)),
    "finetune check": (["finetune", "check", "../config/fleetdeck/finetune/sim.toml"], (0,)),
    "serve start --dry-run": (["serve", "start", "q", "--gpus", "0", "--dry-run"], (0,)),
    "adapters show": (["adapters", "show", "tickets-v1"], (0,)),
    "adapters ls": (["adapters", "ls"], (0,)),
    "adapters history": (["adapters", "history"], (0,)),
    "report": (["report"], (0, 3)),
    "report --json": (["report", "--json"], (0, 3)),
    "whatif": (["whatif", "triage-alerts", "--frontier-price-change", "-50%"], (0,)),
    "audit": (["audit"], (0,)),
    "audit --json": (["audit", "--json"], (0,)),
    "audit verify": (["audit", "verify"], (0,)),
    "nodes ls": (["nodes", "ls"], (0,)),
    "models ls": (["models", "ls"], (0,)),
    "slurm": (["slurm"], (2,)),
}


def _run(capsys, argv: list[str], flag: bool = True) -> tuple[int, str, str]:
    rc = main([*(["--read-only"] if flag else []), *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("how", ["flag", "config"])
@pytest.mark.parametrize("name", list(READING))
def test_a_reading_command_leaves_the_node_as_it_was(node, capsys, name, how):
    if how == "config":
        node.read_only_by_config()
    argv, codes = READING[name]
    before = fingerprint(node.root)
    rc, out, err = _run(capsys, argv, flag=how == "flag")
    assert rc in codes, (rc, out, err)
    assert "Traceback" not in err
    assert changes(before, fingerprint(node.root)) == []


def test_read_only_shows_an_ended_server_and_job_as_ended_without_recording_it(node, capsys):
    rc, out, _ = _run(capsys, ["serve", "ls", "--json"])
    (server,) = json.loads(out)
    assert rc == 0 and server["state"] == "crashed"  # what it sees: the process is gone
    rc, out, _ = _run(capsys, ["finetune", "ls", "--json"])
    (job,) = json.loads(out)
    assert rc == 0 and job["state"] == "failed"
    recorded = {r["id"]: r["state"] for r in node.rows("SELECT id, state FROM managed")}
    assert recorded == {"qwen-ended1": "ready", "ft-ended1": "running"}  # as it was: nothing recorded
    # The first run that writes notices the same and records it.
    assert main(["serve", "ls"]) == 0
    capsys.readouterr()
    assert node.rows("SELECT state FROM managed WHERE id = 'qwen-ended1'") == [{"state": "crashed"}]


def test_on_a_fresh_node_reading_commands_create_nothing(tmp_path, monkeypatch, capsys):
    fresh = make_node(tmp_path / "node", monkeypatch, with_store=False)
    before = fingerprint(fresh.root)
    for name, (argv, _) in READING.items():
        rc, out, err = _run(capsys, argv)
        assert "Traceback" not in err, (name, err)
        lines = [line for line in err.splitlines() if line.strip()]
        if rc == 2 and name != "slurm":  # the commands that need a store say there is none, on one line
            assert len(lines) == 1 and "no store at" in lines[0], (name, err)
    assert not fresh.db.parent.exists()
    assert changes(before, fingerprint(fresh.root)) == []


def _make_older(db: Path, version: int = 7) -> None:
    """A store as an older fleetdeck left it (its schema_version says `version`)."""
    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM schema_version WHERE version > ?", (version,))
    conn.commit()
    conn.close()


def test_an_older_store_is_not_migrated_by_a_read_only_run_which_says_so(node, capsys):
    _make_older(node.db)
    before = fingerprint(node.root)
    for argv in (["serve", "ls"], ["report"], ["finetune", "ls"], ["adapters", "history"]):
        rc, out, err = _run(capsys, argv)
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1, (argv, err)
        assert "older than this fleetdeck's" in lines[0] and "read-only run, does not migrate it" in lines[0], lines
    for argv in (["audit"], ["audit", "verify"]):  # the audit trail is read as schema 7 has it
        rc, out, err = _run(capsys, argv)
        assert rc == 0, (argv, out, err)
    assert changes(before, fingerprint(node.root)) == []


def test_a_refusal_on_an_older_store_is_recorded_without_migrating_it(node, capsys):
    """Before: the refusal's record opened the store read-write, which migrated it to this schema."""
    _make_older(node.db)
    rc, out, err = _run(capsys, ["serve", "prune"])
    assert rc == 2 and "refused, fleetdeck is read-only" in err and "not written" not in err, err
    assert node.rows("SELECT MAX(version) AS v FROM schema_version") == [{"v": 7}]
    assert node.rows("SELECT action, outcome FROM audit ORDER BY seq DESC LIMIT 1") == [
        {"action": "server.prune", "outcome": "refused"}]


REFUSED = [["serve", "stop", "qwen-ended1"], ["serve", "prune"], ["finetune", "prune"], ["finetune", "cancel", "ft-ended1"],
           ["kill", "999999"]]


def _data_tables(node: Node) -> dict[str, list[Any]]:
    store = open_store(node.db, read_only=True)
    try:
        names = [r[0] for r in store.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT IN ('audit', 'sqlite_sequence')")]
        return {n: store.execute(f'SELECT * FROM "{n}"') for n in names}
    finally:
        store.close()


@pytest.mark.parametrize("argv", REFUSED, ids=[" ".join(a) for a in REFUSED])
def test_a_refusal_writes_its_audit_record_and_nothing_else(node, capsys, argv):
    tables = _data_tables(node)
    records = len(node.rows("SELECT seq FROM audit"))
    before = fingerprint(node.root)
    rc, out, err = _run(capsys, argv)
    assert rc == 2 and "refused, fleetdeck is read-only" in err
    changed = {line.split(":", 1)[0] for line in changes(before, fingerprint(node.root))}
    audit_dir = str(Path("state", "fleetdeck", "audit"))
    store_files = {str(node.db.relative_to(node.root)), str(node.db.parent.relative_to(node.root))}
    assert changed <= store_files | {p for p in changed if p.startswith(audit_dir)}, changed
    assert not any(p.endswith(".key") for p in changed)  # the key is never rewritten
    assert _data_tables(node) == tables  # nothing but the audit trail changed in the store
    last = node.rows("SELECT action, outcome, reason FROM audit ORDER BY seq")
    assert len(last) == records + 1 and last[-1]["outcome"] == "refused" and "read-only" in last[-1]["reason"]


def test_calibrate_read_only_prints_its_result_and_saves_nothing(node, capsys):
    """Before: `--read-only calibrate` (without --apply: not a change the trail refuses) created or migrated the
    store and saved its calibration there."""
    from tests.fakes.fake_openai import ServerThread, slm_app

    server = ServerThread(slm_app()).start()
    try:
        router = node.root / "calibrate-router.toml"
        router.write_text(f'[[task]]\nname = "t"\nslm_base_url = "{server.url}/v1"\nslm_model = "m"\nthreshold = 0.5\n')
        evalset = node.root / "eval.jsonl"
        evalset.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"q lp={lp}"}],
                                                 "expected": "slm answer" if lp > -1 else "else"})
                                      for lp in (-0.01, -0.01, -0.01, -2.0)))
        before = fingerprint(node.root)
        rc, out, err = _run(capsys, ["calibrate", "t", "--eval", str(evalset), "--json", "--router-config", str(router)])
    finally:
        server.stop()
    assert rc == 0 and json.loads(out)["items"] == 4 and json.loads(out)["applied"] is False, (out, err)
    assert "result not saved: fleetdeck is read-only" in err
    assert changes(before, fingerprint(node.root)) == []


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(sorted(READING)), min_size=1, max_size=4), st.booleans())
def test_any_sequence_of_reading_commands_changes_nothing(node, capsys, names, by_config):
    """The property over the read commands: whatever an operator runs, in any order, read-only by the flag or
    by fleet.toml (the same node each time: a change would show in the next example too)."""
    text = node.fleet_toml.read_text()
    try:
        if by_config:
            node.read_only_by_config()
        before = fingerprint(node.root)
        for name in names:
            argv, codes = READING[name]
            rc, _, err = _run(capsys, argv, flag=not by_config)
            assert rc in codes and "Traceback" not in err, (name, rc, err)
        after = fingerprint(node.root)
    finally:
        node.fleet_toml.write_text(text)
    assert changes(before, after) == []


# -- the demo ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["demo", "--read-only"], ["--read-only", "demo", "--reset"], ["demo"]])
def test_the_demo_does_not_run_read_only(node, capsys, argv):
    if argv == ["demo"]:
        node.read_only_by_config()
    before = fingerprint(node.root)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "the demo does not run read-only" in err, err
    assert changes(before, fingerprint(node.root)) == []


# -- a read-only node agent ------------------------------------------------------------------------------
def test_a_read_only_agent_lists_what_it_sees_and_writes_nothing(node):
    before = fingerprint(node.root)
    requests = "".join(json.dumps({"v": 2, "type": "request", "id": i, "op": op, "args": {}}) + "\n"
                       for i, op in enumerate(("list_servers", "list_jobs"), 1))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-m", "fleetdeck", "agent", "--stdio", "--read-only"], input=requests,
                          capture_output=True, text=True, env=env, timeout=120)
    answers = {m["id"]: m for m in map(json.loads, proc.stdout.splitlines()) if m.get("type") == "response"}
    assert answers[1]["ok"] and [s["state"] for s in answers[1]["result"]] == ["crashed"], proc.stdout[-2000:]
    assert answers[2]["ok"] and [j["state"] for j in answers[2]["result"]] == ["failed"]
    assert changes(before, fingerprint(node.root)) == []
    assert node.rows("SELECT state FROM managed ORDER BY id") == [{"state": "running"}, {"state": "ready"}]


@pytest.fixture
def sshd(tmp_path):
    from tests.helpers import sshd_server

    yield from sshd_server(tmp_path)


def test_a_read_only_command_asks_a_node_over_ssh_for_a_read_only_agent(node, sshd, tmp_path, capsys):
    """`--node` commands and the dashboard's nodes are agents over SSH: a read-only run starts them read-only, so a
    listing records nothing in the node's own store either (a real sshd; the node's agent works on `node`'s tree).
    Before: the node's agent recorded the server it found ended."""
    from fleet.config import load_fleet_config
    from fleetdeck.dashboard import remote_sources
    from tests.helpers import WAIT_CEILING_S

    dest, opts = sshd
    env = [f"PYTHONPATH={Path(__file__).resolve().parent.parent}", f"XDG_STATE_HOME={node.root / 'state'}",
           f"XDG_CONFIG_HOME={node.root / 'config'}", f"XDG_DATA_HOME={node.root / 'data'}"]
    agent = ["env", *env, sys.executable, "-m", "fleetdeck", "agent", "--stdio", "--node-name", "gpu-02"]
    fleet = tmp_path / "dashboard-fleet.toml"
    fleet.write_text(f'[[node]]\nname = "gpu-02"\nssh = "{dest}"\nssh_options = {json.dumps(opts)}\n'
                     f"agent_command = {json.dumps(agent)}\nhello_timeout_s = {WAIT_CEILING_S}\n")
    before = fingerprint(node.root)
    rc = main(["--read-only", "serve", "ls", "--json", "--node", "gpu-02", "--config", str(fleet),
               "--store", str(tmp_path / "dashboard.db")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert [s["state"] for s in json.loads(out.out)] == ["crashed"]
    assert changes(before, fingerprint(node.root)) == []
    assert node.rows("SELECT state FROM managed WHERE id = 'qwen-ended1'") == [{"state": "ready"}]
    assert not (tmp_path / "dashboard.db").exists()
    # The dashboard's nodes: the same agent command, read-only when the dashboard is.
    config = load_fleet_config(fleet)
    for read_only in (True, False):
        (source,) = remote_sources(config.model_copy(update={"read_only": read_only}))
        try:
            assert (source.command[-1] == "--read-only") is read_only, source.command
        finally:
            source.close()


# -- the dashboard: `fleetdeck --read-only`, driven through Pilot ------------------------------------------
Script = Callable[[Any, Any], Awaitable[None]]

# Every key that changes a node, on the screen that has it (README, Keys).
MUTATING_KEYS = {"1": ["ctrl+k"], "3": ["s", "x", "r", "p"], "4": ["s", "c", "r", "v", "p"], "5": ["a", "e", "p", "r"]}


def dashboard(monkeypatch, capsys, argv: list[str], script: Script) -> tuple[int, str]:
    """`fleetdeck ARGV` as an operator runs it (fleetdeck/cli.py main -> dashboard.py cmd_dashboard, its audit
    session), with the app driven by `script` through Pilot instead of a terminal."""
    import signal

    from tui.app import FleetDeckApp

    def run(app: FleetDeckApp, *args: Any, **kw: Any) -> None:
        async def drive() -> None:
            async with app.run_test(size=(100, 30)) as pilot:
                await until(app, pilot, lambda: app.store is not None or app.store_error is not None, "the store opened")
                await settle(app, pilot)
                await script(app, pilot)
                # No poll is left in flight as the app closes: one that ended after its screens were gone met none
                # (ScreenStackError from FleetDeckApp._poll_done, seen once under load; reported, not this test's).
                app._polling = True
                await drain(app)

        asyncio.run(drive())

    monkeypatch.setattr(FleetDeckApp, "run", run)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # the test process keeps its own handlers
    rc = main(argv)
    return rc, capsys.readouterr().err


async def _every_screen_and_key(app: Any, pilot: Any) -> None:
    from tui.screens.confirm import ConfirmScreen
    from tui.screens.servers import ServersScreen

    app.poll_once_sync()
    for key in "1234567":
        await pilot.press(key)
        await settle(app, pilot)
        app.poll_once_sync()
        for press in MUTATING_KEYS.get(key, []):
            await pilot.press(press)
            await settle(app, pilot)
            assert app.screen_stack[-1] is app.screen and not isinstance(app.screen, ConfirmScreen), (key, press)
        if key == "3":
            screen = app.screen
            assert isinstance(screen, ServersScreen)
            await until(app, pilot, lambda: "qwen-ended1" in screen.views, "the ended server listed")
            assert screen.views["qwen-ended1"].rec.state == "crashed"  # shown as it is...
    await pilot.press("ctrl+r")
    await settle(app, pilot)
    errors = [n.message for n in app._notifications if n.severity == "error"]
    assert errors == [], errors  # every screen read the read-only store (a query-only connection) without a failure


@pytest.mark.parametrize("how", ["flag", "config"])
def test_the_read_only_dashboard_leaves_the_node_as_it_was(node, monkeypatch, capsys, how):
    if how == "config":
        node.read_only_by_config()
    before = fingerprint(node.root)
    rc, err = dashboard(monkeypatch, capsys, ["--read-only"] if how == "flag" else [], _every_screen_and_key)
    assert rc == 0 and "Traceback" not in err, err
    assert changes(before, fingerprint(node.root)) == []
    assert node.rows("SELECT state FROM managed WHERE id = 'qwen-ended1'") == [{"state": "ready"}]  # ...not recorded


def test_the_read_only_dashboard_on_a_fresh_node_creates_no_store_says_so_and_reads_one_made_later(
        tmp_path, monkeypatch, capsys):
    fresh = make_node(tmp_path / "node", monkeypatch, with_store=False)
    before = fingerprint(fresh.root)
    said: list[str] = []
    untouched: list[list[str]] = []

    async def script(app: Any, pilot: Any) -> None:
        from tui.screens.servers import ServersScreen

        app.poll_once_sync()
        for key in "1234567":
            await pilot.press(key)
            await settle(app, pilot)
        said.extend(str(n.message) for n in app._notifications)
        said.append(app.status_text)
        untouched.append(changes(before, fingerprint(fresh.root)))
        # A run that writes makes the store (a `serve start` on this host): the open dashboard reads it.
        writer = open_store(fresh.db)
        ServerRecord(id="q-later1", name="q", node="here", pid=None, create_time=None, argv=[], env={},
                     gpus=LocalGpus((0,)), port=None, log_path=str(fresh.root / "q.log"), spec={},
                     state=ServerState.STOPPED, reason="stopped by the operator", started_at=time.time()).save(writer)
        writer.close()
        await pilot.press("3")
        screen = app.screen
        assert isinstance(screen, ServersScreen)
        await until(app, pilot, lambda: "q-later1" in screen.views, "the store made later, read")
        app.update_status()
        said.append(app.status_text)

    rc, err = dashboard(monkeypatch, capsys, ["--read-only"], script)
    assert rc == 0 and "Traceback" not in err
    notice = [m for m in said if "a read-only run does not create one" in m]
    assert len(notice) == 1 and "\n" not in notice[0] and "without history" in notice[0], said
    assert "store: none yet" in said[-2] and "store: fleetdeck.db" in said[-1]
    assert untouched == [[]]  # nothing made while it ran alone


def test_the_read_only_dashboard_does_not_migrate_an_older_store_and_says_so(node, monkeypatch, capsys):
    _make_older(node.db)
    before = fingerprint(node.root)
    said: list[str] = []

    async def script(app: Any, pilot: Any) -> None:
        said.extend(str(n.message) for n in app._notifications)
        said.append(app.status_text)

    rc, err = dashboard(monkeypatch, capsys, ["--read-only"], script)
    assert rc == 0
    (line,) = [m for m in said if "older than this fleetdeck's" in m]
    assert "\n" not in line and "read-only run, does not migrate it" in line and "without history" in line
    assert "store: unavailable" in said[-1]
    assert changes(before, fingerprint(node.root)) == []


async def test_the_disabled_keys_cannot_be_reached_another_way(node):
    """Not by the command palette, not by a binding remapped in a keymap, not by running the action by name; and
    a confirmation's callback run directly (as if a dialog had been answered) is refused by the engine and
    recorded, its server left as it was."""
    from dataclasses import replace

    from fleet.config import FleetConfig
    from tests.tui_helpers import make_app
    from tui.screens.confirm import ConfirmScreen
    from tui.screens.servers import ServersScreen

    base = make_app(store_path=node.db)
    app = type(base)(replace(base.options, config=FleetConfig(read_only=True)))
    with audit.session(node.db, "tui", read_only=True):
        async with app.run_test(size=(100, 30)) as pilot:
            await until(app, pilot, lambda: app.store is not None, "the store opened")
            await pilot.press("3")
            await settle(app, pilot)
            screen = app.screen
            assert isinstance(screen, ServersScreen)
            await until(app, pilot, lambda: "qwen-ended1" in screen.views, "the server listed")
            titles = [c.title for c in app.get_system_commands(screen)]
            assert not [t for t in titles if t.startswith(("Start (", "Stop (", "Restart (", "Prune ("))], titles
            app.set_keymap({"servers.stop": "z", "servers.prune": "w"})
            for key in ("z", "w", "x", "p"):
                await pilot.press(key)
                await settle(app, pilot)
                assert not isinstance(app.screen, ConfirmScreen), key
            for action in sorted(ServersScreen.MUTATING):
                assert await app.run_action(action, screen) is False, action
            assert not isinstance(app.screen, ConfirmScreen)
            screen._stop(screen.views["qwen-ended1"].rec)  # the stop dialog's yes, reached without the dialog
            await settle(app, pilot)
            # The Router's confirmations (threshold, rollback), answered the same way: refused, said, the app lives.
            router_toml = node.root / "config" / "fleetdeck" / "router.toml"
            text = router_toml.read_text()
            await pilot.press("5")
            await settle(app, pilot)
            app.screen._write_threshold(router_toml, "triage-alerts", 0.5)
            app.screen._run_adapter("rollback", "triage-alerts", None, router_toml)
            await settle(app, pilot)
            assert app.is_running and router_toml.read_text() == text
    tui = [(r["action"], r["outcome"]) for r in node.rows("SELECT action, outcome, reason, source FROM audit ORDER BY seq")
           if r["source"] == "tui" and "read-only" in r["reason"]]
    assert sorted(tui) == [("adapter.rollback", "refused"), ("router.threshold", "refused"), ("server.stop", "refused")]
    assert node.rows("SELECT state FROM managed WHERE id = 'qwen-ended1'") == [{"state": "ready"}]


# -- the store a long-lived read-only run reads (store/readview.py) -----------------------------------------
def test_a_read_view_follows_its_store_as_others_write_it_and_writes_nothing(tmp_path):
    from store.readview import open_read_view

    path = tmp_path / "fd.db"
    view = open_read_view(path)
    assert view.absent and view.query("SELECT COUNT(*) AS n FROM managed") == [{"n": 0}]
    assert not path.exists() and list(tmp_path.iterdir()) == []
    writer = open_store(path)  # a run that writes makes the store: the view reads it from then on
    ServerRecord(id="s-1", name="s", node="n", pid=None, create_time=None, argv=[], env={}, gpus=LocalGpus((0,)),
                 port=None, log_path="/x.log", spec={}, state=ServerState.READY, reason=None,
                 started_at=time.time()).save(writer)
    assert [r["id"] for r in view.query("SELECT id FROM managed")] == ["s-1"] and not view.absent
    ServerRecord(id="s-2", name="s", node="n", pid=None, create_time=None, argv=[], env={}, gpus=LocalGpus((0,)),
                 port=None, log_path="/x.log", spec={}, state=ServerState.READY, reason=None,
                 started_at=time.time() + 1).save(writer)
    assert [r["id"] for r in view.query("SELECT id FROM managed ORDER BY id")] == ["s-1", "s-2"]
    writer.close()  # the writer gone (its WAL checkpointed into the file): still current
    writer = open_store(path)
    writer.execute("DELETE FROM managed WHERE id = 's-1'")
    writer.close()
    assert [r["id"] for r in view.query("SELECT id FROM managed")] == ["s-2"]
    with pytest.raises(Exception):
        view.execute("DELETE FROM managed")
    with pytest.raises(Exception):
        view.insert("managed", {"id": "x"})
    view.close()
