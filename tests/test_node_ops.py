"""The one node client (engine/nodes): every op through `NodeOps`, against this host (LocalOps) and against
a node's agent over the real sshd (AgentOps), with the same calls and the same typed results; and the
protocol's request models (fleet/protocol.py) that the agent parses every request with.

The TUI's side (a remote fine-tune started from the Jobs dialog) and a Slurm server's stop and restart
through the client are here too; the CLI's --node is in tests/test_remote.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.audit import trail as audit
from engine.finetune.jobs import JobRecord
from engine.host.folders import Folders
from engine.nodes.agent import Agent
from engine.nodes.ids import split_id
from engine.nodes.local import LocalOps, NotConfigured
from engine.nodes.ops import NodeOps, ServerStarted
from engine.nodes.remote import AgentOps
from engine.vllm.record import ServerRecord
from fleet.protocol import OPS, BadMessage, Op, SlurmAsk, StartServer, args_of, parse_args, parse_result
from fleet.remote import AgentError, RemoteNode
from fleet.simulated import demo_fleet
from store.db import open_store
from tests.test_remote import stop_everything as _stop_everything
from tests.helpers import FAKE_VLLM_CMD, WAIT_CEILING_S, make_node_files, sshd_server, wait_for

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]  # sshd passes no environment: the agent runs this checkout's code


# -- the protocol's models ----------------------------------------------------------------------------------
def test_every_op_has_a_request_model_a_response_model_and_a_handler(tmp_path):
    assert set(OPS) == set(Op)
    agent = Agent(demo_fleet()[0], tmp_path / "n.db", [], "9.9")
    assert set(agent.ops) == {op.value for op in Op}


BAD_ARGS = [
    (Op.START_SERVER, {"profile": "q", "gpus": [0, 0]}, "gpus must be a list of distinct GPU indices"),
    (Op.START_SERVER, {"profile": "q"}, "gpus must be a list of distinct GPU indices"),
    (Op.START_SERVER, {"profile": "q", "gpus": [0], "force": "yes"}, "force must be true or false"),
    (Op.START_SERVER, {"profile": "q", "gpus": [0], "port": 80}, "port must be from 1024 to 65535"),
    (Op.START_SERVER, {"profile": "q", "gpus": [0], "cmd": "id"}, "unknown field 'cmd'; start_server takes profile"),
    (Op.START_JOB, {"spec": "sim", "slurm": {"gpus": 65}}, "slurm.gpus must be a count 1-64"),
    # Both GPUs and a Slurm ask: one of them would go unused, silently.
    (Op.START_SERVER, {"profile": "q", "gpus": [0], "slurm": {"gpus": 1}}, "gpus and slurm: give one"),
    (Op.START_JOB, {"spec": "sim", "gpus": [0], "slurm": {"gpus": 1}}, "gpus and slurm: give one"),
    (Op.START_JOB, {"spec": "sim", "slurm": {"partition": "a b"}}, "slurm.partition must be a partition name"),
    (Op.STOP_SERVER, {}, "stop_server: id is required"),
    (Op.TAIL_LOG, {"id": "x", "kind": "other"}, "kind must be 'server' or 'job'"),
    (Op.SWAP_ADAPTER, {"server": "s", "adapter": "a"}, "swap_adapter: old is required"),
    (Op.UNLOAD_ADAPTER, {"server": "s", "name": "$(id)"}, "name must be an adapter name"),
    (Op.PING, {"x": 1}, "ping takes no arguments"),
]


@pytest.mark.parametrize("op,args,why", BAD_ARGS, ids=[f"{r[0].value}-{i}" for i, r in enumerate(BAD_ARGS)])
def test_a_bad_args_object_is_refused_with_one_line_naming_the_field(op, args, why):
    with pytest.raises(BadMessage) as exc:
        parse_args(op, args)
    assert why in str(exc.value) and "\n" not in str(exc.value)


@settings(max_examples=200, deadline=None)
@given(op=st.sampled_from(list(Op)),
       args=st.dictionaries(st.sampled_from(["id", "profile", "spec", "gpus", "port", "force", "server", "adapter",
                                             "name", "old", "kind", "n", "slurm", "model"]) | st.text(max_size=6),
                            st.none() | st.booleans() | st.integers(-5, 70_000) | st.text(max_size=8)
                            | st.lists(st.integers(-1, 1100), max_size=3), max_size=5))
def test_any_args_parse_to_the_ops_model_or_one_line_and_a_model_goes_back_on_the_wire_unchanged(op, args):
    try:
        model = parse_args(op, args)
    except BadMessage as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert parse_args(op, args_of(model)) == model  # what a client sends is what the agent reads


def test_an_answer_that_does_not_fit_its_model_is_refused():
    with pytest.raises(BadMessage, match="list_servers answered"):
        parse_result(Op.LIST_SERVERS, [{"id": 3}])
    server = {"id": "q-1", "name": "q", "node": "n", "gpus": "0", "log_path": "/l", "state": "starting",
              "started_at": 1.0, "create_time": 2.0, "argv": ["vllm"], "env": {}, "predicted_kv_tokens": 7}
    started = parse_result(Op.START_SERVER, {"server": server, "verdict": None})
    assert started.server.id == "q-1" and started.server.model_dump()["predicted_kv_tokens"] == 7  # the rest passes
    # What the engine's record cannot be made without is refused here, in one line, not a TypeError later.
    with pytest.raises(BadMessage, match="start_server answered server.env: Field required"):
        parse_result(Op.START_SERVER, {"server": {k: v for k, v in server.items() if k != "env"}, "verdict": None})


def test_a_start_on_slurm_needs_no_gpus_and_one_on_gpus_needs_them():
    assert parse_args(Op.START_SERVER, {"profile": "q", "slurm": {"gpus": 2}}) == StartServer(
        profile="q", slurm=SlurmAsk(gpus=2))
    assert args_of(StartServer(profile="q", gpus=[1])) == {"profile": "q", "gpus": [1], "force": False}


# -- the same calls on this host and over SSH -----------------------------------------------------------------
@pytest.fixture
def sshd(tmp_path):
    yield from sshd_server(tmp_path)


def _node_env(site: Path) -> dict[str, str]:
    return {"PYTHONPATH": str(REPO), "FLEETDECK_VLLM": FAKE_VLLM_CMD, "FLEETDECK_SIM_START_DELAY": "0.2", "XDG_STATE_HOME": str(site / "state"),
            "XDG_CONFIG_HOME": str(site / "config"), "FLEETDECK_PROFILES": str(site / "profiles")}


@pytest.fixture(params=["this host", "over ssh"])
def node(request, tmp_path, monkeypatch):
    """(NodeOps, the node's store path) for the node files of tests/helpers.py's make_node_files: this host's
    engine on them, or the agent on them reached through the real sshd."""
    site = make_node_files(tmp_path / "node")
    store_path = site / "fd.db"
    if request.param == "this host":
        for k, v in _node_env(site).items():
            monkeypatch.setenv(k, v)
        with audit.session(store_path, "test"):
            ops = LocalOps(open_store(store_path), [site / "adapters"], name="", model_roots=[],
                           folders=Folders(profiles=(site / "profiles",), specs=(site / "config" / "fleetdeck" / "finetune",)),
                           source=demo_fleet()[0])
            yield ops, store_path
            _stop_everything(store_path)
        return
    dest, opts = request.getfixturevalue("sshd")
    agent = ["env", *[f"{k}={v}" for k, v in _node_env(site).items()], PY, "-m", "fleetdeck", "agent", "--stdio",
             "--simulated", "--node-name", "gpu-02", "--store", str(store_path), "--config", str(site / "fleet.toml")]
    remote = RemoteNode.over_ssh("gpu-02", dest, opts, agent, interval_s=0.3, hello_timeout_s=WAIT_CEILING_S)
    try:
        assert wait_for(lambda: remote.link.status == "connected"), remote.link.error
        yield AgentOps(remote), store_path
    finally:
        remote.close()
        _stop_everything(store_path)


def _came_up(ops: NodeOps, sid: str) -> None:
    """Wait until the server is up or has ended (the ceiling is only a safety net); say why if not up."""
    def rec() -> ServerRecord:
        return next(st.rec for st in ops.servers() if st.rec.id == sid)

    assert wait_for(lambda: rec().state != "starting")
    assert rec().state == "ready", rec().reason


def test_each_op_through_the_one_client(node):
    ops, store_path = node
    remote = isinstance(ops, AgentOps)
    assert "q" in ops.profiles() and "sim" in ops.specs()  # the node's own folders
    assert isinstance(ops.models(), list)

    started = ops.start_server("q", [3], force=True)
    assert isinstance(started, ServerStarted) and isinstance(started.rec, ServerRecord)
    sid = started.rec.id
    assert (split_id(sid)[0] == "gpu-02") is remote  # a remote record comes back as @node:id
    assert started.verdict is not None and started.verdict["kv_tokens"] > 0  # planned on the node
    _came_up(ops, sid)
    assert {"tickets-v1", "tickets-v2"} <= {a.name for a in ops.adapters(None).adapters}
    assert "added successfully" in ops.load_adapter(sid, "tickets-v1")
    assert "tickets-v2 loaded, then tickets-v1 unloaded" in ops.swap_adapter(sid, "tickets-v1", "tickets-v2")
    assert ops.adapters(sid).loaded == ["tickets-v2"]
    assert "Success" in ops.unload_adapter(sid, "tickets-v2")
    assert "Starting vLLM API server" in ops.tail_log("server", sid)

    done = ops.restart_server(sid)
    assert done.old.id == sid and done.new.id != sid and str(done.new.gpus) == "3"
    _came_up(ops, done.new.id)
    assert ops.stop_server(done.new.id).state == "stopped"

    job = ops.start_job("sim", None)
    assert isinstance(job, JobRecord) and job.state == "running" and str(job.gpus) == "cpu"
    assert wait_for(lambda: any(p.events for p in ops.jobs() if p.rec.id == job.id))  # it has taken a step
    assert ops.cancel_job(job.id).state == "cancelled"
    assert ops.resume_job(job.id).state == "running"
    assert ops.cancel_job(job.id).state == "cancelled"
    assert isinstance(ops.tail_log("job", job.id), str)

    with pytest.raises(AgentError if remote else NotConfigured, match="Slurm is not configured"):
        ops.slurm_view()
    if remote:  # no agent op prunes: said, with where to do it
        with pytest.raises(AgentError, match="fleetdeck serve prune"):
            ops.prune_servers()
    else:
        assert split_id(sid)[1] in ops.prune_servers()

    # The node audits every change where it happened, from this client or its own operator alike.
    recs = [(r["action"], r["outcome"]) for r in reversed(audit.query(open_store(store_path)))]
    assert recs[:9] == [("server.start", "done"), ("adapter.load", "done"), ("adapter.swap", "done"),
                        ("adapter.unload", "done"), ("server.stop", "done"), ("server.start", "done"),
                        ("server.stop", "done"), ("job.start", "done"), ("job.cancel", "done")]


def test_a_request_the_node_refuses_comes_back_as_one_line_and_changes_nothing(node):
    ops, store_path = node
    with pytest.raises(Exception) as exc:
        ops.start_server("../profiles/q", [3])
    assert "no profile named '../profiles/q'" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(Exception, match="no job spec named 'nope'"):
        ops.start_job("nope", None)
    assert ops.servers() == [] and ops.jobs() == []


# -- from the TUI: a remote fine-tune started from the Jobs dialog ---------------------------------------------
async def test_a_remote_fine_tune_is_started_from_the_jobs_dialog_on_that_nodes_own_spec(tmp_path):
    from textual.widgets import DataTable, Input, Select, Static

    from tests.tui_helpers import make_app, open_dialog, settle, static_text, until
    from tui.screens.jobs import JobsScreen
    from tui.screens.start_job import StartJobScreen

    site = make_node_files(tmp_path / "node")
    agent = ["env", *[f"{k}={v}" for k, v in _node_env(site).items()], PY, "-m", "fleetdeck", "agent", "--stdio",
             "--simulated", "--node-name", "node-j", "--store", str(site / "fd.db"), "--config", str(site / "fleet.toml")]
    node = RemoteNode("node-j", agent, interval_s=0.3, hello_timeout_s=WAIT_CEILING_S)
    try:
        assert wait_for(lambda: node.link.status == "connected"), node.link.error
        app = make_app(lambda: [node], store_path=tmp_path / "local.db")
        app.poller.close = lambda: None  # the test closes the node itself
        async with app.run_test(size=(120, 34)) as pilot:
            dialog = await open_dialog(app, pilot, "4", "s", StartJobScreen)
            assert "sim" not in dialog.specs  # this host has no spec of that name: it is the node's
            dialog.query_one("#job-gpus", Input).value = "node-j/cpu"
            dialog.check()
            await until(app, pilot, lambda: "sim" in dialog.specs, "the node's own job specs")
            dialog.query_one("#job-spec", Select).value = "sim"
            await settle(app, pilot)
            assert "checked by node-j's agent" in static_text(dialog.query_one("#job-check", Static))
            await pilot.press("ctrl+s")
            await until(app, pilot, lambda: not isinstance(app.screen, StartJobScreen), "the dialog closes")
            (doc,) = node.request("list_jobs")
            assert doc["spec"]["name"] == "sim" and doc["gpus"] == "cpu"  # started there, from its own spec
            screen = app.screen
            assert isinstance(screen, JobsScreen)
            table = screen.query_one("#jobs-table", DataTable)
            await until(app, pilot, lambda: f"@node-j:{doc['id']}" in [r.key.value for r in table.ordered_rows],
                        "the remote job listed")
        from engine.vllm import launcher  # nothing was started on this host
        assert not (tmp_path / "local.db").exists() or launcher.list_servers(open_store(tmp_path / "local.db")) == []
    finally:
        node.close()
        _stop_everything(site / "fd.db")


# -- a Slurm server's stop and restart through the client, on this host and through a login node's agent ------
from tests.test_slurm import cluster  # noqa: E402,F401  (the one-host Slurm cluster fixture)


@pytest.mark.parametrize("where", ["this host", "login node's agent"])
def test_a_slurm_servers_stop_and_restart_through_the_client(cluster, tmp_path, monkeypatch, where):
    from fleet.config import load_fleet_config

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    # A Slurm server listens on its compute node's interfaces: the profile says it goes without a key.
    (profiles / "sim.toml").write_text('name = "sim"\nmodel = "Qwen/Qwen3-8B"\nmax_model_len = 8192\n'
                                       'allow_unauthenticated = true\n')
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'[slurm]\nenabled = true\nconf = "{cluster.conf}"\npartition = "gpu"\ngpu_memory_gib = 80\n')
    env = {"FLEETDECK_VLLM": FAKE_VLLM_CMD, "XDG_STATE_HOME": str(tmp_path / "state"), "FLEETDECK_PROFILES": str(profiles)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    store_path = tmp_path / "fd.db"
    remote = None
    if where == "this host":
        ops: NodeOps = LocalOps(open_store(store_path), [], slurm_settings=load_fleet_config(fleet).slurm,
                                folders=Folders(profiles=(profiles,)))
    else:
        remote = RemoteNode("login", [PY, "-m", "fleetdeck", "agent", "--stdio", "--simulated", "--node-name", "login",
                                      "--store", str(store_path), "--config", str(fleet)],
                            interval_s=0.5, hello_timeout_s=WAIT_CEILING_S)
        assert wait_for(lambda: remote.link.status == "connected"), remote.link.error
        ops = AgentOps(remote)
    try:
        started = ops.start_server("sim", [], slurm=SlurmAsk(gpus=1, time="30"))
        sid = started.rec.id
        assert str(started.rec.gpus) == "slurm:1"
        _came_up(ops, sid)
        done = ops.restart_server(sid)  # a Slurm placement: no GPU indices to parse, the same ask again
        assert str(done.new.gpus) == "slurm:1" and done.new.slurm is not None
        assert "--time=00:30:00" in done.new.slurm.options or "--time=30" in done.new.slurm.options
        states = {split_id(st.rec.id)[1]: st.rec.state for st in ops.servers()}
        assert states[split_id(sid)[1]] == "stopped"
        _came_up(ops, done.new.id)
        stopped = ops.stop_server(done.new.id)
        assert stopped.state == "stopped" and stopped.slurm is not None
    finally:
        if remote is not None:
            remote.close()
        _stop_everything(store_path)


def test_a_restart_of_an_ended_server_is_planned_against_its_gpus_as_they_are_now(tmp_path, monkeypatch):
    """The demo's operator restarted a stopped server onto a GPU another live server had taken since: the
    restart was forced (no plan), so two servers shared one GPU. A server that had ended is now planned like
    any start; one that still runs takes its own place again (the memory it frees shows late)."""
    from engine.vllm.command import LaunchError
    from tests.helpers import h100

    site = make_node_files(tmp_path / "node")
    store_path = site / "fd.db"
    for k, v in _node_env(site).items():
        monkeypatch.setenv(k, v)
    with audit.session(store_path, "test"):
        ops = LocalOps(open_store(store_path), [site / "adapters"], name="", model_roots=[],
                       folders=Folders(profiles=(site / "profiles",)), source=demo_fleet()[0])
        try:
            sid = ops.start_server("q", [3], force=True).rec.id
            _came_up(ops, sid)
            taken = [h100(free_gib=3.0, index=3)]  # another server holds the GPU now
            live = ops.restart_server(sid, gpu_snapshots=taken)  # still running: it replaces itself, forced
            _came_up(ops, live.new.id)
            assert ops.stop_server(live.new.id).state == "stopped"
            before = {st.rec.id for st in ops.servers()}
            with pytest.raises(LaunchError, match="(?i)fit|memory"):
                ops.restart_server(live.new.id, gpu_snapshots=taken)
            assert {st.rec.id for st in ops.servers()} == before  # nothing started
            again = ops.restart_server(live.new.id, gpu_snapshots=[h100(index=3)])  # the GPU is free again
            _came_up(ops, again.new.id)
        finally:
            _stop_everything(store_path)
