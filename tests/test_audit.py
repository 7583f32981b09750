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

from engine.audit import syslog
from engine.audit import trail as audit
from fleetdeck.cli import main
from store.db import open_store
from tests.helpers import FAKE_VLLM_CMD, WAIT_CEILING_S, Pipe, make_node_files, wait_for

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
    assert f"pruned 1 ended jobs: {jid}" in step(["finetune", "prune"], "job.prune")  # its folder stays
    assert jid not in _cli(site, capsys, "finetune", "ls")[1]
    assert f"pruned 1 ended servers: {sid}" in step(["serve", "prune"], "server.prune")
    assert sid not in _cli(site, capsys, "serve", "ls")[1]
    assert "no ended servers to prune" in step(["serve", "prune"], "server.prune")
    # Holds no GPU of this host: never signalled, one line, refused and recorded.
    assert "fleetdeck kill: pid 999999 no longer holds a GPU" in step(["kill", "999999"], "process.kill", "refused")
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
    assert {a for a, _ in done} == set(audit.ACTIONS) - set(NOT_CLI)
    recs = _records(site)
    start = recs[0]
    assert start["target"] == sid and json.loads(start["params"])["server"] == sid and start["actor"]
    assert audit.verify(open_store(site / "fd.db")).ok


# Actions no CLI command takes: each has its own test here.
NOT_CLI = {"router.reload": "the proxy's /admin/reload and SIGHUP: test_a_proxy_reload_is_audited_and_fails_closed",
           "audit.prune": "retention, by `fleetdeck audit`: test_retention_prunes_only_old_records_...",
           "audit.anchor": "`fleetdeck audit anchor`: tests/test_audit_attack.py test_audit_anchor_...",}

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
    (["serve", "prune"], "server.prune"),
    (["finetune", "prune"], "job.prune"),
    (["kill", "999999"], "process.kill"),
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
    assert {a for _, a in MUTATING_CLI} == set(audit.ACTIONS) - set(NOT_CLI)


def test_the_agent_records_each_request_on_behalf_of_the_dashboard_and_refuses_read_only(site, monkeypatch):
    from engine.nodes.agent import MUTATING_OPS, Agent
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
    verdict = audit.verify(store, now=now)
    assert verdict.ok and verdict.records == 3 and "pruned by retention" in verdict.message, verdict
    # The prune is itself a chained record: what was cut, by which retention, and from where on it kept.
    prune = audit.query(store)[0]
    assert (prune["action"], prune["outcome"]) == ("audit.prune", "done")
    assert json.loads(prune["params"]) == {"cutoff": now - 6 * 365 * 86400, "retention_days": 6 * 365, "removed": 2,
                                           "first_kept": 3}
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
                    r'outcome="refused" seq="1" mac="hmac1:[0-9a-f]{8}:[0-9a-f]{64}"\] server\.stop q-1 refused: no server \'q-1\'$',
                    line), line


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
    from tui.screens.fleet import FleetScreen
    from tui.screens.jobs import JobsScreen, StartJobScreen
    from tui.screens.router import RouterScreen
    from tui.screens.servers import AdaptersScreen, ServersScreen, StartServerScreen

    screens = [FleetScreen, ServersScreen, StartServerScreen, AdaptersScreen, JobsScreen, StartJobScreen, RouterScreen]
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
        assert "2 record(s), chain intact" in static_text(screen.query_one("#audit-verdict", Static))
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


# -- audit that cannot be skipped ---------------------------------------------------------------------
ODD_OPERATOR = "al\udcffice\x00\x1b[31m\n" + "y" * 20_000


def _ask(pipe: Pipe, op: str, args: dict, rid: int, operator: str = "alice@dash") -> dict:
    pipe.send({"v": 2, "type": "request", "id": rid, "op": op, "args": args, "operator": operator})
    while True:
        msg = pipe.next("response", timeout=60)
        if msg["id"] == rid:
            return msg


def test_a_value_the_store_cannot_take_is_recorded_and_the_action_goes_ahead_with_its_record(site, capsys,
                                                                                              monkeypatch):
    """A non-UTF-8 byte, a lone surrogate, NUL, ESC and 20k characters: stored escaped (and cut, with the
    whole value's hash), never a reason to lose the record of what was done."""
    from engine.nodes.agent import Agent
    from engine.audit.text import LIMIT, unstored
    from fleet.simulated import demo_fleet

    db = site / "fd.db"
    with audit.session(db, "agent"):
        pipe = Pipe(Agent(demo_fleet()[0], db, [site / "adapters"], "9.9", interval_s=0.5))
        pipe.next("hello")
        started = _ask(pipe, "start_server", {"profile": "q", "gpus": [0], "force": True}, 1, ODD_OPERATOR)
        assert started["ok"], started
        assert _ask(pipe, "stop_server", {"id": started["result"]["server"]["id"]}, 2, ODD_OPERATOR)["ok"]
        pipe.close()
    # From the command line: the operator's name (the environment) and an argument with a byte that is
    # not UTF-8 (Python hands it over as a lone surrogate).
    monkeypatch.setenv("LOGNAME", "bob\udcfe\x1b[2J")
    rc, out = _cli(site, capsys, "serve", "start", "q", "--gpus", "3", "--simulated", "--wait")
    assert rc == 0, out
    sid = re.search(r"started (q-\w+)", out).group(1)
    assert _cli(site, capsys, "serve", "stop", sid)[0] == 0
    assert _cli(site, capsys, "serve", "stop", "q-\udcff")[0] == 2
    recs = _records(site)
    assert [(r["action"], r["outcome"]) for r in recs] == [
        ("server.start", "done"), ("server.stop", "done"), ("server.start", "done"), ("server.stop", "done"),
        ("server.stop", "refused")]
    assert unstored(recs[0]["on_behalf_of"]) == ODD_OPERATOR[:LIMIT] and "more characters; sha256" in recs[0]["on_behalf_of"]
    assert unstored(recs[2]["actor"]) == "bob\udcfe\x1b[2J" and unstored(recs[4]["target"]) == "q-\udcff"
    assert audit.verify(open_store(db)).ok


def _bad_key(site: Path) -> Path:
    """The fleet config names a key file that is not a key (changed, or another file): unreadable as one."""
    key = site / "keys" / "audit.key"
    key.parent.mkdir()
    key.write_text("not a key\n")
    text = (site / "fleet.toml").read_text() + f'\n[audit]\nkey_file = "{key}"\n'
    for path in (site / "fleet.toml", site / "config" / "fleetdeck" / "fleet.toml"):
        path.write_text(text)
    return key


@pytest.mark.parametrize("why", ["key", "locked"])
def test_a_cli_action_whose_record_cannot_be_written_does_not_happen(site, capsys, why):
    import sqlite3

    open_store(site / "fd.db").close()
    holder = None
    if why == "key":
        _bad_key(site)
    else:  # another process holds the store's write lock past the busy timeout
        holder = sqlite3.connect(site / "fd.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
    try:
        rc, out = _cli(site, capsys, "serve", "start", "q", "--gpus", "3", "--simulated", "--wait")
    finally:
        if holder is not None:
            holder.execute("ROLLBACK")
            holder.close()
    assert rc == 2 and "server.start q: refused, its audit record cannot be written" in out, out
    assert "Traceback" not in out and len([l for l in out.splitlines() if l.startswith("fleetdeck: server")]) == 1
    store = open_store(site / "fd.db")
    assert store.execute("SELECT count(*) FROM managed")[0][0] == 0  # nothing was started


def test_an_agent_request_whose_record_cannot_be_written_does_not_happen(site):
    from engine.nodes.agent import Agent
    from fleet.simulated import demo_fleet

    key = _bad_key(site)
    db = site / "fd.db"
    with audit.session(db, "agent", key_file=key):
        pipe = Pipe(Agent(demo_fleet()[0], db, [site / "adapters"], "9.9", interval_s=0.5))
        pipe.next("hello")
        answer = _ask(pipe, "start_server", {"profile": "q", "gpus": [0], "force": True}, 1)
        job = _ask(pipe, "start_job", {"spec": "sim"}, 2)
        pipe.close()
    assert not answer["ok"] and "its audit record cannot be written" in answer["error"], answer
    assert not job["ok"] and "its audit record cannot be written" in job["error"], job
    store = open_store(db)
    assert store.execute("SELECT count(*) FROM managed")[0][0] == 0


def test_the_agent_records_every_refusal_unknown_ids_and_bad_names_included(site):
    from engine.nodes.agent import Agent
    from fleet.simulated import demo_fleet

    db = site / "fd.db"
    with audit.session(db, "agent"):
        pipe = Pipe(Agent(demo_fleet()[0], db, [site / "adapters"], "9.9", interval_s=0.5))
        pipe.next("hello")
        asks = [("stop_server", {"id": "q-nope"}), ("cancel_job", {"id": "ft-nope"}), ("resume_job", {"id": "ft-nope"}),
                ("load_adapter", {"server": "q-nope", "adapter": "tickets-v1"}),
                ("start_job", {"spec": "../../etc/passwd"}), ("stop_server", {"id": 7})]
        answers = [_ask(pipe, op, args, i) for i, (op, args) in enumerate(asks)]
        pipe.close()
    assert not any(a["ok"] for a in answers)
    recs = _records(site)
    assert [(r["action"], r["target"], r["outcome"]) for r in recs] == [
        ("server.stop", "q-nope", "refused"), ("job.cancel", "ft-nope", "refused"), ("job.resume", "ft-nope", "refused"),
        ("adapter.load", "tickets-v1", "refused"), ("job.start", "../../etc/passwd", "refused"),
        ("server.stop", "?", "refused")]
    assert "no server 'q-nope'" in recs[0]["reason"] and json.loads(recs[0]["params"]) == {"server": "q-nope"}
    assert json.loads(recs[1]["params"]) == {"job": "ft-nope"}
    assert all(r["on_behalf_of"] == "alice@dash" and r["source"] == "agent" for r in recs)


def test_audit_output_escapes_what_would_act_on_the_terminal(tmp_path, capsys):
    store = open_store(tmp_path / "fd.db")
    evil = "mallory\x1b[31mRED\x1b[0m\n2026-01-01T00:00:00Z  node  cli  root  server.stop  forged  done"
    audit.append(store, "server.stop", "q-1\x1b]0;title\x07\u202e", "refused", "no\rserver",
                 params={"server": "q-1"}, who={"actor": evil, "on_behalf_of": evil})
    assert main(["audit", "--store", str(tmp_path / "fd.db")]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\r\u202e"), repr(out)
    assert len(out.splitlines()) == 2 and "\\x1b[31mRED" in out and "\\x0a2026-01-01" in out  # header + one row
    assert main(["audit", "--json", "--store", str(tmp_path / "fd.db")]) == 0
    raw = capsys.readouterr().out
    assert "\x1b" not in raw and json.loads(raw)[0]["actor"] == evil


def test_a_proxy_reload_is_audited_and_fails_closed(site, tmp_path):
    """POST /admin/reload (and SIGHUP) change what the node's proxy does: recorded, source proxy, and
    refused with a 503 in OpenAI's shape when the record cannot be written."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    from tests.engines.stack import free_port, wait_http

    port = free_port()
    cfg = tmp_path / "router.toml"
    task = '[[task]]\nname = "{}"\nslm_base_url = "http://127.0.0.1:9/v1"\nslm_model = "m"\nthreshold = 0.5\n'
    cfg.write_text(f'[proxy]\nhost = "127.0.0.1"\nport = {port}\n\n' + task.format("a"))
    db = site / "fd.db"
    proxy = subprocess.Popen([sys.executable, "-m", "fleetdeck", "proxy", "--router-config", str(cfg), "--store", str(db)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", "FLEETDECK_CONFIG": str(site / "fleet.toml")})
    url = f"http://127.0.0.1:{port}"
    models = lambda: sorted(m["id"] for m in httpx.get(f"{url}/v1/models", trust_env=False).json()["data"])  # noqa: E731
    try:
        wait_http(f"{url}/v1/models")  # /health is 503 "down" here: its one task has no upstream
        cfg.write_text(cfg.read_text() + task.format("b"))
        r = httpx.post(f"{url}/admin/reload", trust_env=False, timeout=30)
        assert r.status_code == 200 and models() == ["a", "b"], r.text
        key = audit.anchor_for(db).key_file
        good = key.read_bytes()
        key.write_text("not a key\n")
        cfg.write_text(cfg.read_text() + task.format("c"))
        r = httpx.post(f"{url}/admin/reload", trust_env=False, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable", r.text
        assert "its audit record cannot be written" in r.json()["error"]["message"] and models() == ["a", "b"]
        key.write_bytes(good)
        proxy.send_signal(signal.SIGHUP)
        assert wait_for(lambda: models() == ["a", "b", "c"])
    finally:
        proxy.send_signal(signal.SIGTERM)
        out, _ = proxy.communicate(timeout=30)
    assert proxy.returncode == 0, out
    recs = [r for r in _records(site) if r["action"] == "router.reload"]
    assert [(r["outcome"], r["source"], json.loads(r["params"])["via"]) for r in recs] == [
        ("done", "proxy", "http"), ("done", "proxy", "SIGHUP")]
    assert recs[0]["origin"].startswith("127.0.0.1:") and json.loads(recs[0]["params"])["changed"] == "b"
    assert audit.verify(open_store(db)).ok


def test_a_read_only_run_makes_no_key_and_its_refusal_still_verifies(site, capsys):
    """Read-only writes nothing on the node but its refusals' records: on a node without an audit key yet,
    the refusal is written the pre-key way (no key, no checkpoint made), and the chain the first keyed
    record continues still verifies, the refusal counted as unkeyed."""
    anchor = audit.anchor_for(site / "fd.db")
    rc, out = _cli(site, capsys, "serve", "stop", "q-x", "--read-only")
    assert rc == 2 and "read-only" in out
    assert not anchor.key_file.exists() and not anchor.checkpoint_file.exists()
    rc, out = _cli(site, capsys, "serve", "stop", "q-y")  # refused too (no such server), and keyed
    assert rc == 2 and anchor.key_file.exists() and anchor.checkpoint_file.exists()
    rc, out = _cli(site, capsys, "audit", "verify")
    assert rc == 0 and "2 record(s), chain intact" in out and "1 unkeyed" in out, out
    assert [(r["target"], r["outcome"]) for r in _records(site)] == [("q-x", "refused"), ("q-y", "refused")]


def test_reloads_refused_at_the_door_or_read_only_are_recorded_without_letting_a_client_fill_the_disk(tmp_path,
                                                                                                      monkeypatch):
    from starlette.testclient import TestClient

    from engine.router import proxy as proxy_mod
    from engine.router.config import load_router_config

    monkeypatch.setattr(proxy_mod, "REFUSAL_RECORD_S", 1e9)  # one record per window; the window never ends here
    cfg = tmp_path / "router.toml"
    cfg.write_text('[[task]]\nname = "a"\nslm_base_url = "http://127.0.0.1:9/v1"\nslm_model = "m"\nthreshold = 0.5\n')
    router = proxy_mod.Router(load_router_config(cfg), load_litellm=False, config_path=cfg)
    app = proxy_mod.create_app(router)
    db = tmp_path / "fd.db"
    with audit.session(db, "cli"), TestClient(app, base_url="http://127.0.0.1") as remote:  # "testclient" is not loopback
        for _ in range(3):
            assert remote.post("/admin/reload").status_code == 403
        router._refusal_recorded_at = float("-inf")  # as if the window had passed
        assert remote.post("/admin/reload").status_code == 403
    with audit.session(db, "cli", read_only=True), TestClient(app, base_url="http://127.0.0.1", client=("127.0.0.1", 5000)) as local:
        r = local.post("/admin/reload")
        assert r.status_code == 403 and r.json()["error"]["code"] == "read_only", r.text
    recs = list(reversed(audit.query(open_store(db))))
    assert [(r["action"], r["outcome"], r["source"]) for r in recs] == [("router.reload", "refused", "proxy")] * 3
    assert "loopback" in recs[0]["reason"] and "2 more reload request(s)" in recs[1]["reason"]
    assert "read-only" in recs[2]["reason"] and recs[2]["origin"] == "127.0.0.1:5000"


async def test_the_audit_screen_and_the_system_log_escape_what_would_act_on_a_terminal(tmp_path):
    from textual.widgets import DataTable

    from tests.tui_helpers import make_app, open_screen
    from tui.screens.audit import AuditScreen

    store = open_store(tmp_path / "fd.db")
    evil = "mallory\x1b[31m[bold]RED[/]\nforged"
    rec = audit.append(store, "server.stop", evil, "refused", evil, params={"server": evil}, who={"actor": evil})
    line = syslog.syslog_line(rec)
    assert b"\n" not in line and b"\x1b" not in line and b"\\x1b[31m" in line
    app = make_app(store_path=tmp_path / "fd.db")
    async with app.run_test(size=(160, 24)) as pilot:
        screen = await open_screen(app, pilot, "7", AuditScreen)
        table = screen.query_one("#audit-table", DataTable)
        cells = [str(c) for c in table.get_row("1")]
        assert any("mallory\\x1b[31m[bold]RED[/]\\x0aforged" in c for c in cells), cells  # as written, escaped
        assert not any("\x1b" in c or "\n" in c for c in cells)


async def test_a_tui_action_whose_record_cannot_be_written_does_not_happen(tmp_path, monkeypatch):
    from engine.vllm import launcher
    from tests.helpers import h100, profile
    from tests.tui_helpers import make_app, open_screen, press_and_confirm, settle, until
    from tui.screens.servers import ServersScreen

    monkeypatch.setenv("FLEETDECK_VLLM", FAKE_VLLM_CMD)
    monkeypatch.setenv("FLEETDECK_SIM_START_DELAY", "0.2")
    path = tmp_path / "fd.db"
    store = open_store(path)
    rec, _ = launcher.start(store, profile(), [0], gpu_snapshots=[h100()], log_dir=tmp_path)
    rec = launcher.wait_ready(store, rec, timeout=WAIT_CEILING_S, poll=0.1)
    key = tmp_path / "audit.key"
    key.write_text("not a key\n")
    try:
        app = make_app(store_path=path)
        with audit.session(path, "tui", key_file=key):
            async with app.run_test(size=(140, 30)) as pilot:
                screen = await open_screen(app, pilot, "3", ServersScreen)
                await settle(app, pilot)
                table = screen.query_one("#servers-table")
                # The rows load in a worker: under load they can come after settle, and x on no row asks nothing.
                await until(app, pilot, lambda: rec.id in [r.key.value for r in table.ordered_rows], "the server's row")
                await press_and_confirm(app, pilot, "x")

                def refused() -> bool:
                    return any("its audit record cannot be written" in n.message for n in app._notifications)

                await until(app, pilot, refused, "the refusal's notification")  # a stop runs in a worker
        assert launcher.refresh(store, launcher.get(store, rec.id)).state == "ready"  # still serving
        assert audit.query(store) == []
    finally:
        launcher.stop(store, launcher.get(store, rec.id), timeout=5)
