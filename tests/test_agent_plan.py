"""plan_server: a node plans a start against its own profile, GPUs and disks and says so, starting nothing.
It is read-only: a read-only agent answers it, and it is recorded nowhere. The Start-server dialog shows a
remote node's plan before ctrl+s (asked from a worker thread)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from engine.audit import trail as audit
from engine.nodes.agent import Agent
from engine.nodes.local import LocalOps
from engine.nodes.ops import ServerPlan
from engine.nodes.remote import AgentOps
from engine.host.folders import Folders
from fleet.remote import AgentError, RemoteNode
from fleet.simulated import demo_fleet
from store.db import open_store
from tests.helpers import WAIT_CEILING_S, Pipe, make_node_files, wait_for

PY = sys.executable


@pytest.fixture
def site(tmp_path, monkeypatch):
    root = make_node_files(tmp_path / "node")
    monkeypatch.setenv("FLEETDECK_PROFILES", str(root / "profiles"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(root / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(root / "state"))
    monkeypatch.chdir(tmp_path)
    return root


def _ask(pipe: Pipe, rid: int, args: dict) -> dict:
    pipe.send({"v": 2, "type": "request", "id": rid, "op": "plan_server", "args": args, "operator": "eve@dash"})
    return pipe.next("response")


@pytest.mark.parametrize("read_only", [False, True])
def test_the_agent_plans_on_its_own_gpus_starts_nothing_and_records_nothing(site, read_only):
    db = site / "fd.db"
    source = demo_fleet()[0]
    with audit.session(db, "agent", read_only=read_only):
        pipe = Pipe(Agent(source, db, [site / "adapters"], "9.9", interval_s=0.2, read_only=read_only))
        try:
            pipe.next("hello")
            planned = _ask(pipe, 1, {"profile": "q", "gpus": [3]})
            missing_gpu = _ask(pipe, 2, {"profile": "q", "gpus": [77]})
            missing_profile = _ask(pipe, 3, {"profile": "../profiles/q", "gpus": [0]})
            wrong = _ask(pipe, 4, {"profile": "q", "gpus": [0], "port": 8000})
        finally:
            pipe.close()
    assert planned["ok"] is True, planned
    plan = ServerPlan.from_json(planned["result"]["verdict"])
    expected = LocalOps(open_store(site / "other.db"), [], source=source).plan_server("q", [3])
    assert plan.verdict == expected.verdict and plan.verdict.fits  # the node's figures, as this host plans
    assert missing_gpu["error"].startswith(f"no GPU [77] on {source.name}"), missing_gpu
    assert missing_profile["error"].startswith("no profile named '../profiles/q'"), missing_profile
    assert wrong["error"].startswith("plan_server: unknown field 'port'; plan_server takes profile, gpus and model only")
    store = open_store(db)
    assert audit.query(store) == []  # a plan changes nothing: no record, refused or done
    from engine.vllm import launcher

    assert launcher.list_servers(store) == []


def test_a_plan_from_a_node_is_read_through_the_planners_own_type(site):
    doc = LocalOps(open_store(site / "fd.db"), [], source=demo_fleet()[0]).plan_server("q", [3]).verdict.to_json()
    assert ServerPlan.from_json(doc).verdict.to_json() == doc  # the wire carries the verdict whole
    with pytest.raises(ValueError, match="a plan that does not fit: kv_tokens"):
        ServerPlan.from_json({**doc, "kv_tokens": "many"})
    with pytest.raises(ValueError, match="a plan that does not fit: quantization: Field required"):
        ServerPlan.from_json({k: v for k, v in doc.items() if k != "quantization"})


def _agent_argv(site, *extra: str) -> list[str]:
    """The agent of `site`'s node, in its own process (this checkout's code, a simulated node)."""
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "XDG_STATE_HOME": str(site / "state"),
           "XDG_CONFIG_HOME": str(site / "config"), "FLEETDECK_PROFILES": str(site / "profiles")}
    return ["env", *[f"{k}={v}" for k, v in env.items()], PY, "-m", "fleetdeck", "agent", "--stdio",
            "--simulated", "--node-name", "node-p", "--store", str(site / "fd.db"), "--config", str(site / "fleet.toml"),
            *extra]


async def test_the_start_dialog_shows_a_remote_nodes_plan_before_ctrl_s(site, tmp_path):
    """The node's agent is read-only: it plans (shown in the dialog before ctrl+s), and refuses the start."""
    from textual.widgets import Input, Select, Static

    from tests.tui_helpers import make_app, open_dialog, settle, static_text, until
    from tui.screens.servers import StartServerScreen

    node = RemoteNode("node-p", _agent_argv(site, "--read-only"), interval_s=0.3, hello_timeout_s=WAIT_CEILING_S)
    try:
        assert wait_for(lambda: node.link.status == "connected"), node.link.error
        app = make_app(lambda: [node], store_path=tmp_path / "local.db")
        app.poller.close = lambda: None  # the test closes the node itself
        async with app.run_test(size=(120, 40)) as pilot:
            dialog = await open_dialog(app, pilot, "3", "s", StartServerScreen)
            field = dialog.query_one("#start-gpus", Input)
            field.value = "node-p/0"
            field.focus()
            await pilot.press("enter")
            await until(app, pilot, lambda: "q" in dialog.profiles, "the node's own profiles")
            dialog.query_one("#start-profile", Select).value = "q"
            verdict = dialog.query_one("#start-verdict", Static)
            await until(app, pilot, lambda: "planned by node-p's agent" in static_text(verdict), "the node's plan")
            text = static_text(verdict)
            assert "FITS" in text and "Qwen/Qwen3-8B" in text, text
            assert node.request("list_servers") == []  # planned, not started
            await pilot.press("ctrl+s")
            await until(app, pilot, lambda: "read-only" in static_text(verdict), "the node's refusal")
            assert isinstance(app.screen, StartServerScreen)
            await settle(app, pilot)
        assert node.request("list_servers") == []
    finally:
        node.close()
    recs = [(r["action"], r["outcome"]) for r in audit.query(open_store(site / "fd.db"))]
    assert recs == [("server.start", "refused")]  # the start, refused; the plans recorded nowhere


def test_an_agent_without_plan_server_is_named_with_its_upgrade(site, tmp_path):
    """An older agent answers plan_server "unknown op": the client says to upgrade the node, in one line."""
    script = tmp_path / "old_agent.py"
    script.write_text(
        "import json, sys\n"
        "print(json.dumps({'v': 2, 'type': 'hello', 'fleetdeck': '0.9'}), flush=True)\n"
        "for line in sys.stdin:\n"
        "    m = json.loads(line)\n"
        "    if m.get('type') == 'request':\n"
        "        print(json.dumps({'v': 2, 'type': 'response', 'id': m['id'], 'ok': False,\n"
        "                          'error': 'unknown op ' + repr(m['op']) + '; known: [...]'}), flush=True)\n")
    node = RemoteNode("old-1", [PY, str(script)], interval_s=0.3, hello_timeout_s=WAIT_CEILING_S)
    try:
        assert wait_for(lambda: node.link.status == "connected"), node.link.error
        with pytest.raises(AgentError) as caught:
            AgentOps(node).plan_server("q", [3])
    finally:
        node.close()
    assert str(caught.value) == ("old-1: its fleetdeck is older than this dashboard's and plans a start only when it "
                                 "starts; upgrade it: fleetdeck nodes install old-1 --bundle DIR")


def test_this_host_plans_the_same_way(site):
    ops = LocalOps(open_store(site / "fd.db"), [], source=demo_fleet()[0],
                   folders=Folders(profiles=(site / "profiles",)))
    plan = ops.plan_server("q", [3])
    assert plan.verdict.fits and ops.servers() == []
    with pytest.raises(ValueError, match="no GPU \\[9\\]"):
        ops.plan_server("q", [9])


@pytest.fixture
def sshd(tmp_path):
    from tests.helpers import sshd_server

    yield from sshd_server(tmp_path)


def test_serve_start_dry_run_with_node_prints_that_nodes_plan_also_read_only(site, sshd, tmp_path, capsys):
    """`serve start --dry-run --node N`: the node's plan, over real SSH, from a read-only dashboard too; nothing
    is started or recorded on either side."""
    import json

    from fleetdeck.cli import main

    dest, opts = sshd
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'[[node]]\nname = "node-p"\nssh = "{dest}"\nssh_options = {json.dumps(opts)}\n'
                     f"agent_command = {json.dumps(_agent_argv(site))}\nhello_timeout_s = {WAIT_CEILING_S}\n")
    local = tmp_path / "local.db"
    for extra in ([], ["--read-only"]):
        rc = main([*extra, "serve", "start", "q", "--gpus", "3", "--node", "node-p", "--dry-run", "--config", str(fleet),
                   "--store", str(local)])
        out = capsys.readouterr()
        assert rc == 0, out.err
        assert out.out.startswith("planned by node-p, on its own profile and GPUs:\nQwen/Qwen3-8B") and "FITS" in out.out
    assert main(["serve", "start", "q", "--gpus", "7", "--node", "node-p", "--dry-run", "--config", str(fleet),
                 "--store", str(local)]) == 2
    err = capsys.readouterr().err
    assert "no GPU [7] on node-p" in err and len(err.strip().splitlines()) == 1, err
    assert audit.query(open_store(site / "fd.db")) == []
    from engine.vllm import launcher

    assert launcher.list_servers(open_store(site / "fd.db")) == []
    assert not local.exists() or audit.query(open_store(local)) == []
