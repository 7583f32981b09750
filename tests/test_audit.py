"""The audit trail and read-only, through the entry points operators use: every mutating action leaves
exactly one record with its outcome, read-only refuses each one (recorded), the chain finds a changed or
removed record, records reach a syslog socket in RFC 5424, and no secret is ever written."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine import audit
from fleetdeck.cli import main
from store.db import open_store
from tests.helpers import FAKE_VLLM_CMD, Pipe, make_node_files

PLANTED = "sk-planted-7f3a9c"


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A node with a profile (its API key in the environment), an adapter, a simulated job spec."""
    monkeypatch.setenv("FLEETDECK_VLLM", FAKE_VLLM_CMD)
    monkeypatch.setenv("FLEETDECK_SIM_START_DELAY", "0.2")
    monkeypatch.setenv("PLANTED_KEY", PLANTED)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("FLEETDECK_PROFILES", str(tmp_path / "profiles"))
    monkeypatch.chdir(tmp_path)
    make_node_files(tmp_path, api_key_env="PLANTED_KEY")
    yield tmp_path
    store = open_store(tmp_path / "fd.db")
    from engine.finetune import jobs
    from engine.vllm import launcher

    for rec in launcher.list_servers(store):
        if rec.state not in ("stopped", "crashed"):
            launcher.stop(store, rec, timeout=5)
    for job in jobs.list_jobs(store):
        if job.pid and job.state == "running":
            jobs.cancel(store, job, timeout=10)


def _cli(site: Path, capsys, *argv: str) -> tuple[int, str]:
    rc = main([*argv, "--store", str(site / "fd.db"), "--config", str(site / "fleet.toml")])
    out = capsys.readouterr()
    return rc, out.out + out.err


def _records(site: Path) -> list[dict]:
    return list(reversed(audit.query(open_store(site / "fd.db"))))


def test_every_cli_action_leaves_exactly_one_record_with_its_outcome(site, capsys):
    done: list[tuple[str, str]] = []

    def step(argv: list[str], action: str, outcome: str = "done") -> str:
        before = len(_records(site))
        rc, out = _cli(site, capsys, *argv)
        assert (rc == 0) == (outcome == "done"), out
        recs = _records(site)[before:]
        assert [(r["action"], r["outcome"], r["source"]) for r in recs] == [(action, outcome, "cli")], (argv, recs)
        done.append((action, outcome))
        return out

    out = step(["serve", "start", "q", "--gpus", "3", "--simulated", "--wait"], "server.start")
    sid = re.search(r"started (q-\w+)", out).group(1)
    step(["adapters", "load", sid, "tickets-v1"], "adapter.load")
    step(["adapters", "swap", sid, "tickets-v1", "tickets-v1", "--name", "tickets-v1b"], "adapter.swap")
    step(["adapters", "unload", sid, "tickets-v1b"], "adapter.unload")
    step(["adapters", "load", sid, "nope"], "adapter.load", "refused")
    step(["serve", "stop", sid], "server.stop")
    step(["serve", "stop", "no-such-server"], "server.stop", "refused")
    out = step(["finetune", "start", "config/fleetdeck/finetune/sim.toml", "--gpus", "cpu"], "job.start")
    jid = re.search(r"(ft-sim-\w+)", out).group(1)
    step(["finetune", "cancel", jid], "job.cancel")
    step(["finetune", "resume", jid], "job.resume")
    step(["finetune", "cancel", jid], "job.cancel")
    step(["calibrate", "no-such-task", "--eval", "x.jsonl", "--apply", "--config", str(site / "none.toml")],
         "router.threshold", "refused")
    # The adapter lifecycle: import, evaluate (loaded first, so the evaluation is one record), promote,
    # roll back, merge, quantize; the last four refused here for want of a router config, a local base
    # model and an llm-compressor environment.
    step(["adapters", "import", str(site / "adapters" / "tickets-v2"), "tickets"], "adapter.import")
    out = step(["serve", "start", "q", "--gpus", "3", "--simulated", "--wait"], "server.start")
    sid2 = re.search(r"started (q-\w+)", out).group(1)
    step(["adapters", "load", sid2, "tickets@v1"], "adapter.load")
    evalset = site / "eval.jsonl"
    evalset.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "expected": "billing"}) + "\n")
    step(["adapters", "eval", "tickets@v1", "--eval", str(evalset)], "adapter.eval")
    step(["serve", "stop", sid2], "server.stop")
    router = ["--router-config", str(site / "none.toml")]
    step(["adapters", "promote", "tickets", "tickets@v1", *router], "adapter.promote", "refused")
    step(["adapters", "rollback", "tickets", *router], "adapter.rollback", "refused")
    step(["finetune", "merge", "tickets@v1"], "model.merge", "refused")
    step(["finetune", "quantize", str(site), "--calibration", str(evalset)], "model.quantize", "refused")
    step(["nodes", "install", "no-such-node", "--bundle", str(site / "no-bundle")], "node.install", "refused")
    # Each action the trail knows is exercised here: a new action cannot be added without its row.
    assert {a for a, _ in done} == set(audit.ACTIONS)
    recs = _records(site)
    start = recs[0]
    assert start["target"] == sid and json.loads(start["params"])["server"] == sid and start["actor"]
    assert audit.verify(open_store(site / "fd.db")).ok


MUTATING_CLI = [
    (["serve", "start", "q", "--gpus", "0", "--simulated"], "server.start"),
    (["serve", "stop", "q-anything"], "server.stop"),
    (["adapters", "load", "q-anything", "tickets-v1"], "adapter.load"),
    (["adapters", "unload", "q-anything", "tickets-v1"], "adapter.unload"),
    (["adapters", "swap", "q-anything", "tickets-v1", "tickets-v1"], "adapter.swap"),
    (["finetune", "start", "config/fleetdeck/finetune/sim.toml", "--gpus", "cpu"], "job.start"),
    (["finetune", "cancel", "ft-anything"], "job.cancel"),
    (["finetune", "resume", "ft-anything"], "job.resume"),
    (["calibrate", "t", "--eval", "x.jsonl", "--apply"], "router.threshold"),
    (["adapters", "import", "adapters/tickets-v1", "tickets"], "adapter.import"),
    (["adapters", "eval", "tickets@v1", "--eval", "x.jsonl"], "adapter.eval"),
    (["adapters", "promote", "t", "tickets@v1"], "adapter.promote"),
    (["adapters", "rollback", "t"], "adapter.rollback"),
    (["finetune", "merge", "tickets@v1"], "model.merge"),
    (["finetune", "quantize", "models/x", "--calibration", "x.jsonl"], "model.quantize"),
    (["nodes", "install", "gpu1", "--bundle", "no-bundle"], "node.install"),
]


@pytest.mark.parametrize("argv,action", MUTATING_CLI, ids=[a for _, a in MUTATING_CLI])
@pytest.mark.parametrize("how", ["flag", "config"])
def test_read_only_refuses_every_mutating_command_and_records_it(site, capsys, argv, action, how):
    if how == "config":  # the node's own fleet config (the default one, and the one --config names)
        text = "read_only = true\n" + (site / "fleet.toml").read_text()
        (site / "fleet.toml").write_text(text)
        (site / "config" / "fleetdeck" / "fleet.toml").write_text(text)
    rc, out = _cli(site, capsys, *argv, *(["--read-only"] if how == "flag" else []))
    assert rc == 2 and "refused, fleetdeck is read-only" in out, out
    (rec,) = _records(site)
    assert (rec["action"], rec["outcome"]) == (action, "refused") and "read-only" in rec["reason"]
    store = open_store(site / "fd.db")
    assert store.execute("SELECT count(*) FROM managed")[0][0] == 0  # nothing was started


def test_every_mutating_action_has_a_read_only_row():
    assert {a for _, a in MUTATING_CLI} == set(audit.ACTIONS)


def test_the_agent_records_each_request_on_behalf_of_the_dashboard_and_refuses_read_only(site, monkeypatch):
    from engine.agent import MUTATING_OPS, Agent
    from fleet.simulated import demo_fleet

    def ask(pipe: Pipe, op: str, args: dict, rid: int) -> dict:
        pipe.send({"v": 2, "type": "request", "id": rid, "op": op, "args": args, "operator": "alice@dash"})
        while True:
            msg = pipe.next("response", timeout=60)
            if msg["id"] == rid:
                return msg

    db = site / "fd.db"
    with audit.session(db, "agent"):
        pipe = Pipe(Agent(demo_fleet()[0], db, [site / "adapters"], "9.9", interval_s=0.5))
        pipe.next("hello")
        started = ask(pipe, "start_server", {"profile": "q", "gpus": [0], "force": True}, 1)
        assert started["ok"], started
        assert ask(pipe, "stop_server", {"id": started["result"]["server"]["id"]}, 2)["ok"]
        assert not ask(pipe, "start_server", {"profile": "/etc/passwd", "gpus": [0]}, 3)["ok"]
        job = ask(pipe, "start_job", {"spec": "sim"}, 4)
        assert job["ok"], job
        assert ask(pipe, "cancel_job", {"id": job["result"]["id"]}, 5)["ok"]
        pipe.close()
    with audit.session(db, "agent", read_only=True):
        pipe = Pipe(Agent(demo_fleet()[0], db, [], "9.9", interval_s=0.5, read_only=True))
        pipe.next("hello")
        for i, op in enumerate(MUTATING_OPS):
            assert not ask(pipe, op, {"id": "x", "profile": "q", "spec": "sim", "gpus": [0]}, 10 + i)["ok"]
        pipe.close()
    recs = _records(site)
    assert [(r["action"], r["outcome"]) for r in recs] == [
        ("server.start", "done"), ("server.stop", "done"), ("server.start", "refused"), ("job.start", "done"),
        ("job.cancel", "done"), *((a, "refused") for a in MUTATING_OPS.values())]
    assert all(r["source"] == "agent" and r["on_behalf_of"] == "alice@dash" for r in recs)
    assert "no profile named '/etc/passwd'" in recs[2]["reason"]


def test_a_changed_or_removed_record_is_found_and_the_table_refuses_both(tmp_path):
    store = open_store(tmp_path / "fd.db")
    for i in range(5):
        audit.append(store, "server.stop", f"s{i}", "done", params={"server": f"s{i}"})
    assert audit.verify(store).ok
    for sql in ("UPDATE audit SET outcome = 'refused' WHERE seq = 3", "DELETE FROM audit WHERE seq = 3"):
        with pytest.raises(Exception, match="append-only"):
            store.execute(sql)
    # Someone with the file and sqlite3 goes around the triggers:
    store.execute("DROP TRIGGER audit_no_update")
    store.execute("UPDATE audit SET outcome = 'refused' WHERE seq = 3")
    verdict = audit.verify(store)
    assert not verdict.ok and verdict.first_broken == 3 and "changed" in verdict.message
    assert main(["audit", "verify", "--store", str(tmp_path / "fd.db")]) == 1
    store2 = open_store(tmp_path / "other.db")
    for i in range(5):
        audit.append(store2, "job.cancel", f"j{i}", "done")
    store2.execute("DROP TRIGGER audit_no_delete")
    store2.execute("DELETE FROM audit WHERE seq = 2")
    verdict = audit.verify(store2)
    assert not verdict.ok and verdict.first_broken == 3 and "removed" in verdict.message


def test_retention_prunes_only_old_records_and_the_chain_still_verifies(tmp_path):
    store = open_store(tmp_path / "fd.db")
    now = 2_000_000_000.0
    for i, age_days in enumerate((3000, 2500, 10, 1)):
        audit.append(store, "job.cancel", f"j{i}", "done", ts=now - age_days * 86400)
    assert audit.prune(store, retention_days=6 * 365, now=now) == 2
    verdict = audit.verify(store)
    assert verdict.ok and verdict.records == 2 and "pruned by retention" in verdict.message
    with pytest.raises(Exception, match="append-only"):
        store.execute("DELETE FROM audit")  # younger than the cut-off: still refused


def test_records_reach_the_system_log_in_rfc_5424(tmp_path):
    path = tmp_path / "log.sock"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(path))
    sink.settimeout(5)
    try:
        with audit.session(tmp_path / "fd.db", "cli", syslog_socket=path):
            audit.record("server.stop", "q-1", "refused", "no server 'q-1'", server="q-1")
        line = sink.recv(4096).decode()
    finally:
        sink.close()
    assert re.match(r'^<84>1 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z \S+ fleetdeck \d+ server\.stop '
                    r'\[fleetdeck@32473 actor="[^"]+" origin="local" source="cli" node="\S+" target="q-1" '
                    r'outcome="refused" seq="1"\] server\.stop q-1 refused: no server \'q-1\'$', line), line


def test_no_secret_is_written_anywhere(site, capsys):
    rc, out = _cli(site, capsys, "serve", "start", "q", "--gpus", "3", "--simulated", "--wait")
    assert rc == 0, out
    outputs = [out]
    for argv in (["serve", "ls", "--json"], ["audit", "--json"], ["finetune", "ls", "--json"]):
        rc, text = _cli(site, capsys, *argv)
        outputs.append(text)
    sid = re.search(r"started (q-\w+)", out).group(1)
    _cli(site, capsys, "serve", "stop", sid)
    assert all(PLANTED not in text for text in outputs)
    # SQLite deletes the WAL when the last connection to the file closes, which a garbage-collected
    # CLI connection may do mid-scan; holding one open keeps every file in place while it is read.
    held = open_store(site / "fd.db")
    files = [p for p in site.rglob("*") if p.is_file()]
    hits = [p for p in files if PLANTED.encode() in p.read_bytes()]
    assert hits == [], hits
    # ... while the start itself was recorded, with the server but not its key.
    assert any(json.loads(r["params"]).get("server") == sid for r in audit.query(held))


async def test_read_only_disables_every_mutating_key_on_every_screen(tmp_path):
    from fleet.config import FleetConfig
    from tests.tui_helpers import make_app, ready
    from tui.screens.base import ReadOnlyAware
    from tui.screens.jobs import JobsScreen, StartJobScreen
    from tui.screens.router import RouterScreen
    from tui.screens.servers import AdaptersScreen, ServersScreen, StartServerScreen

    screens = [ServersScreen, StartServerScreen, AdaptersScreen, JobsScreen, StartJobScreen, RouterScreen]
    every = {c for c in _subclasses(ReadOnlyAware) if c.MUTATING}
    assert every == set(screens)  # a screen with keys that change a node is listed here
    app = make_app(store_path=tmp_path / "fd.db")
    app.options.config = FleetConfig(read_only=True)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(app, pilot)
        for cls in screens:
            bound = {b.action for b in cls.BINDINGS}
            assert cls.MUTATING <= bound, cls
            screen = SimpleNamespace(app=app, MUTATING=cls.MUTATING)  # check_action reads only the app's mode
            for action in cls.MUTATING:
                assert ReadOnlyAware.check_action(screen, action, ()) is None, (cls, action)
            assert ReadOnlyAware.check_action(screen, "dismiss", ()) is True
        assert "READ-ONLY" in app.status_text


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _subclasses(sub)
    return out



async def test_the_audit_screen_lists_filters_and_verifies(tmp_path):
    from textual.widgets import DataTable, Input, Static

    from tests.tui_helpers import make_app, open_screen, settle, static_text
    from tui.screens.audit import AuditScreen

    store = open_store(tmp_path / "fd.db")
    audit.append(store, "server.start", "q-1", "done", params={"server": "q-1"})
    audit.append(store, "job.cancel", "ft-1", "refused", "no job 'ft-1'", params={"job": "ft-1"})
    app = make_app(store_path=tmp_path / "fd.db")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_screen(app, pilot, "7", AuditScreen)
        table = screen.query_one("#audit-table", DataTable)
        assert [r.key.value for r in table.ordered_rows] == ["2", "1"]  # newest first
        assert "chain intact: 2 record(s)" in static_text(screen.query_one("#audit-verdict", Static))
        action = screen.query_one("#audit-action", Input)
        action.value = "server"
        action.focus()
        await pilot.press("enter")
        await settle(app, pilot)
        assert [r.key.value for r in table.ordered_rows] == ["1"]
        store.execute("DROP TRIGGER audit_no_update")
        store.execute("UPDATE audit SET target = 'q-2' WHERE seq = 1")
        screen.reload()
        await settle(app, pilot)
        assert "CHAIN BROKEN" in static_text(screen.query_one("#audit-verdict", Static))
