"""A fleet, not a host: the agent over a local pipe, remote nodes that drop and come back, protocol
faults, and a real SSH round-trip through sshd on loopback (installed by .ci/run)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pynvml
import pytest
from textual.widgets import DataTable

from engine.nodes.agent import Agent
from fleet.remote import PROTOCOL_VERSION, AgentError, RemoteNode
from fleet.source import LocalNode
from fleetdeck.cli import main
from tests.fakes.fake_nvml import FakeGpu, FakeNvml
from tests.helpers import FAKE_VLLM_CMD, WAIT_CEILING_S, Pipe, kill_processes_mentioning, sshd_server, wait_for
from tests.tui_helpers import make_app, ready, until

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
AGENT = [PY, "-m", "fleetdeck", "agent", "--stdio", "--simulated"]
# sshd passes no environment: an agent started over it runs this checkout's code only when told so.
THIS_CHECKOUT = f"PYTHONPATH={Path(__file__).resolve().parents[1]}"


def test_agent_over_a_local_pipe_with_faked_nvml(monkeypatch, tmp_path):
    FakeNvml([FakeGpu(uuid="GPU-r0"), FakeGpu(uuid="GPU-r1", util=88)]).install(monkeypatch)
    pipe = Pipe(Agent(LocalNode("node-b"), tmp_path / "agent.db", [], "9.9", interval_s=0.1))
    hello = pipe.next("hello")
    assert hello["v"] == PROTOCOL_VERSION and hello["fleetdeck"] == "9.9" and hello["nvml"] == "ok"
    snap = pipe.next("snapshot")["snapshot"]
    assert [g["uuid"] for g in snap["gpus"]] == ["GPU-r0", "GPU-r1"] and snap["gpus"][1]["utilization_gpu_pct"] == 88
    pipe.send({"v": 2, "type": "request", "id": 1, "op": "ping"})
    assert pipe.next("response")["ok"] is True
    pipe.send("{this is not json")
    bad = pipe.next("response")
    assert bad["ok"] is False and "malformed" in bad["error"]
    pipe.send({"v": 99, "type": "request", "id": 2, "op": "ping"})
    assert "protocol v99 not supported" in pipe.next("response")["error"]
    pipe.send({"v": 2, "type": "request", "id": 3, "op": "format_disks"})
    assert "unknown op" in pipe.next("response")["error"]
    pipe.send({"v": 2, "type": "request", "id": 4, "op": "list_servers"})
    assert pipe.next("response")["result"] == []
    pipe.close()


# The first connection is the real agent at once; every later one waits for the test's go file, so the
# test sees the node down for as long as it needs to, however slow the machine.
GATED_AGENT = textwrap.dedent("""
    import os, sys, time
    marker, go, real = sys.argv[1], sys.argv[2], sys.argv[3:]
    if os.path.exists(marker):
        while not os.path.exists(go):
            time.sleep(0.05)
    open(marker, "w").close()
    os.execv(real[0], real)
""")


def test_a_remote_node_connects_drops_and_comes_back(tmp_path):
    go = tmp_path / "go"
    node = RemoteNode("flaky", [PY, "-c", GATED_AGENT, str(tmp_path / "first"), str(go), *AGENT], interval_s=0.2,
                      backoff_s=(0.2, 0.5), hello_timeout_s=WAIT_CEILING_S)
    try:
        assert wait_for(lambda: node.link.status == "connected" and node.snapshot().gpus, timeout=60)
        snap = node.snapshot()
        assert snap.node == "flaky" and all(g.node == "flaky" for g in snap.gpus) and snap.nvml == "ok"
        assert node.request("ping")["pong"] > 0
        # The agent dies (the node dropped; killed here, not on a timer that a loaded machine could beat):
        # the screen keeps the last GPUs, marked stale, with the error.
        os.kill(node._proc.pid, signal.SIGKILL)
        assert wait_for(lambda: node.link.status != "connected")
        down = node.snapshot()
        assert down.nvml == "unavailable" and down.gpus and down.gpus[0].error.startswith("stale")
        assert ("unreachable" in down.reason or "connecting" in down.reason)
        with pytest.raises(AgentError):
            node.request("ping", timeout=1)
        # ... and is reconnected with backoff when the node is back.
        go.touch()
        assert wait_for(lambda: node.link.status == "connected")
    finally:
        node.close()


def test_an_unreachable_node_says_so():
    node = RemoteNode("gone", [PY, "-c", "import sys; sys.stderr.write('ssh: connect to host gone port 22: Connection refused\\n'); sys.exit(255)"],
                      backoff_s=(0.2, 0.4))
    try:
        assert wait_for(lambda: node.link.status == "unreachable")
        snap = node.snapshot()  # the last state, read under a lock: no I/O (tests assert no timings)
        assert snap.nvml == "unavailable" and "unreachable since" in snap.reason and "Connection refused" in snap.reason
    finally:
        node.close()


def fake_agent(lines: list[str], tmp_path: Path) -> list[str]:
    script = tmp_path / "agent.py"
    script.write_text("import sys, time\n" + "".join(f"print({line!r}, flush=True)\n" for line in lines) + "time.sleep(30)\n")
    return [PY, str(script)]


def test_version_mismatch_is_reported_clearly(tmp_path):
    node = RemoteNode("old", fake_agent([json.dumps({"v": 1, "type": "hello", "fleetdeck": "9.0"})], tmp_path),
                      backoff_s=(5, 5))
    try:
        assert wait_for(lambda: node.link.status == "incompatible")
        assert "protocol v1, this dashboard v2" in node.snapshot().reason
    finally:
        node.close()


def test_malformed_and_out_of_order_messages_are_counted_not_fatal(tmp_path):
    snap = {"node": "x", "taken_at": 1.0, "nvml": "ok", "gpus": [], "host": {}}
    lines = [
        json.dumps({"v": 2, "type": "snapshot", "snapshot": snap}),  # before the hello
        "garbage{",
        json.dumps({"v": 2, "type": "hello", "fleetdeck": "0.1.0"}),
        json.dumps({"v": 2, "type": "response", "id": 12345, "ok": True}),  # an answer to nothing
        json.dumps({"v": 2, "type": "snapshot", "snapshot": {"nonsense": True}}),
        json.dumps({"v": 2, "type": "snapshot", "snapshot": snap}),
    ]
    node = RemoteNode("odd", fake_agent(lines, tmp_path), backoff_s=(5, 5))
    try:
        assert wait_for(lambda: node.link.status == "connected" and node.link.bad_messages >= 4)
        assert wait_for(lambda: node.snapshot().nvml == "ok")
    finally:
        node.close()


def test_no_hello_in_time_is_an_error(tmp_path):
    node = RemoteNode("silent", [PY, "-c", "import time; time.sleep(30)"], hello_timeout_s=0.5, backoff_s=(5, 5))
    try:
        assert wait_for(lambda: node.link.status == "unreachable")
        assert "no hello from the agent within 0.5 s" in (node.link.error or "")
    finally:
        node.close()


async def test_the_dashboard_shows_local_and_remote_gpus_grouped_by_node(monkeypatch):
    FakeNvml([FakeGpu(uuid="GPU-local")]).install(monkeypatch)
    remote = RemoteNode("node-b", [*AGENT, "--node-name", "node-b"], interval_s=0.2, hello_timeout_s=WAIT_CEILING_S)
    try:
        assert wait_for(lambda: remote.snapshot().nvml == "ok")
        app = make_app(lambda: [LocalNode("node-a"), remote], simulated=False)
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(app, pilot)
            keys = [r.key.value for r in app.screen.query_one("#fleet-table", DataTable).ordered_rows]
            assert keys[0] == "node:node-a" and "gpu:node-a/GPU-local" in keys
            assert "node:node-b" in keys and sum(k.startswith("gpu:node-b/") for k in keys) == 4
    finally:
        remote.close()


# --- a real SSH round-trip ------------------------------------------------------------------------
@pytest.fixture
def sshd(tmp_path):
    yield from sshd_server(tmp_path)


def test_a_remote_node_over_real_ssh_shows_gpus_and_starts_a_server(sshd, tmp_path, capsys):
    dest, opts = sshd
    remote_store = tmp_path / "remote.db"
    profiles = tmp_path / "remote-profiles"  # the node's own profile folder: the dashboard names, never sends
    profiles.mkdir()
    (profiles / "q.toml").write_text('name = "q"\nmodel = "Qwen/Qwen3-8B"\n')
    agent = ["env", THIS_CHECKOUT, f"FLEETDECK_VLLM={FAKE_VLLM_CMD}", "FLEETDECK_SIM_START_DELAY=0.2",
             f"XDG_STATE_HOME={tmp_path / 'state'}", f"FLEETDECK_PROFILES={profiles}",
             PY, "-m", "fleetdeck", "agent", "--stdio", "--simulated", "--node-name", "remote-1", "--store", str(remote_store)]
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'[[node]]\nname = "remote-1"\nssh = "{dest}"\nssh_options = {json.dumps(opts)}\n'
                     f"agent_command = {json.dumps(agent)}\n")
    node = RemoteNode.over_ssh("remote-1", dest, opts, agent, interval_s=0.3, backoff_s=(0.3, 1.0),
                               hello_timeout_s=WAIT_CEILING_S)
    try:
        assert wait_for(lambda: node.snapshot().nvml == "ok"), node.link.error
        assert len(node.snapshot().gpus) == 4
        # Start a (fake) vLLM server on the remote node through the same command line the operator uses.
        assert main(["serve", "start", "q", "--gpus", "3", "--node", "remote-1", "--config", str(fleet)]) == 0, \
            capsys.readouterr().err
        assert "started q-" in capsys.readouterr().out
        assert wait_for(lambda: any(s["state"] == "ready" for s in node.request("list_servers")))
        # The node drops (its agent is killed) and comes back.
        assert kill_processes_mentioning(str(remote_store))  # only the agent this test started
        assert wait_for(lambda: node.link.status != "connected")
        assert wait_for(lambda: node.link.status == "connected")
        servers = node.request("list_servers")
        assert servers and servers[0]["gpus"] == "3"
        node.request("stop_server", {"id": servers[0]["id"]})
    finally:
        node.close()


def test_a_restricted_key_runs_only_the_agent_whatever_the_client_asks(sshd, tmp_path):
    """The deployment README describes: the dashboard's key is forced to `fleetdeck agent --stdio` in the
    node's authorized_keys, so the key cannot run anything else, and the agent refuses what its config lacks."""
    dest, opts = sshd
    keys = tmp_path / "ssh"
    forced = " ".join([PY, "-m", "fleetdeck", "agent", "--stdio", "--simulated", "--node-name", "locked",
                       "--store", str(tmp_path / "locked.db")])
    (keys / "authorized_keys").write_text(f'command="{forced}",restrict {(keys / "client.pub").read_text()}')
    marker = tmp_path / "ran"
    # The client asks for a shell command; sshd runs the agent instead, which says hello.
    out = subprocess.run(["ssh", "-T", *opts, dest, f"id > {marker}"], input="", capture_output=True, text=True,
                         timeout=60)
    hello = json.loads(out.stdout.splitlines()[0])
    assert hello["type"] == "hello" and hello["node"] == "locked" and not marker.exists()
    # Through the agent, a profile carrying a command is not a name this node defines.
    node = RemoteNode.over_ssh("locked", dest, opts, None, interval_s=0.3, backoff_s=(0.3, 1.0),
                               hello_timeout_s=WAIT_CEILING_S)
    try:
        assert wait_for(lambda: node.link.status == "connected"), node.link.error
        with pytest.raises(AgentError, match="profile must be a non-empty string"):  # a name, never a profile's text
            node.request("start_server", {"profile": {"name": "x", "model": "m",
                                                      "vllm_command": ["/bin/sh", "-c", f"id > {marker}"]}, "gpus": [0]})
        assert not marker.exists()
    finally:
        node.close()
    # The node's audit trail has the refusal, with the SSH source, the key that made it and who asked.
    from engine.audit import trail as audit
    from store.db import open_store

    (rec,) = audit.query(open_store(tmp_path / "locked.db"))
    fingerprint = subprocess.run(["ssh-keygen", "-lf", str(keys / "client.pub")], capture_output=True, text=True,
                                 check=True).stdout.split()[1]
    assert (rec["action"], rec["outcome"], rec["source"]) == ("server.start", "refused", "agent")
    assert rec["origin"].startswith("127.0.0.1:") and rec["key_fingerprint"] == fingerprint
    assert rec["on_behalf_of"] and "@" in rec["on_behalf_of"]


# --- one node interface ------------------------------------------------------------------------------
def test_a_reconnect_with_an_answered_request_still_pending_does_not_kill_the_node(tmp_path):
    """A future already answered when the link drops is left alone; the node comes back."""
    from concurrent.futures import Future

    go = tmp_path / "go"
    node = RemoteNode("flaky", [PY, "-c", GATED_AGENT, str(tmp_path / "first"), str(go), *AGENT], interval_s=0.2,
                      backoff_s=(0.2, 0.5), hello_timeout_s=WAIT_CEILING_S)
    try:
        assert wait_for(lambda: node.link.status == "connected")
        answered: Future = Future()
        answered.set_result({"pong": 1})
        node._pending[999_999] = answered  # as if request() had not yet collected it when the agent went
        os.kill(node._proc.pid, signal.SIGKILL)  # the agent goes now (not on a timer a loaded machine could beat)
        assert wait_for(lambda: node.link.status != "connected")
        go.touch()  # the node is back
        assert wait_for(lambda: node.link.status == "connected"), node.link.error
        assert node._thread.is_alive() and node.request("ping")["pong"] > 0
    finally:
        node.close()


def test_every_protocol_operation_has_its_handler_and_unknown_ones_are_refused_before_sending():
    from fleet.remote import Op

    agent = Agent(LocalNode("x"), None, [], "9.9")
    assert set(agent.ops) == {op.value for op in Op}
    node = RemoteNode("n", [PY, "-c", "import time; time.sleep(30)"], hello_timeout_s=30)
    try:
        with pytest.raises(ValueError):
            node.request("format_disks")
    finally:
        node.close()


def test_link_state_is_a_field_the_fleet_screen_reads():
    node = RemoteNode("gone", [PY, "-c", "import sys; sys.exit(255)"], backoff_s=(0.2, 0.4))
    try:
        assert wait_for(lambda: node.snapshot().link == "unreachable")
        from tui.screens.fleet import node_cells

        assert str(node_cells(node.snapshot(), 40)["vram"]) == "UNREACHABLE"
    finally:
        node.close()


def test_a_hung_nvml_call_marks_the_gpus_stale_and_never_blocks(monkeypatch):
    fake = FakeNvml([FakeGpu(uuid="GPU-h0")])
    fake.install(monkeypatch)
    node = LocalNode("hung", timeout_s=WAIT_CEILING_S)  # the first read answers, however loaded the machine
    first = node.snapshot()
    assert first.nvml == "ok" and first.gpus[0].uuid == "GPU-h0"
    node.timeout_s = 0.3  # from here a read that has not answered is stale, whatever the time it took
    release, entered = threading.Event(), threading.Event()
    real = pynvml.nvmlDeviceGetCount
    reads: list[int] = []

    def hung() -> int:
        reads.append(1)
        entered.set()
        release.wait(WAIT_CEILING_S)
        return real()

    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", hung)
    stale = node.snapshot()
    again = node.snapshot()  # no second read is started while the first is stuck
    assert stale.nvml == "unavailable" and "has not answered" in stale.reason
    assert stale.gpus[0].uuid == "GPU-h0" and stale.gpus[0].error.startswith("stale:")
    assert entered.wait(WAIT_CEILING_S)  # the read thread is inside the hung call (however slowly it got there)
    assert again.nvml == "unavailable" and len(reads) == 1
    release.set()  # the driver recovers
    assert wait_for(lambda: node.snapshot().nvml == "ok")


def test_nvml_that_fails_after_a_driver_reload_is_initialised_again(monkeypatch):
    fake = FakeNvml([FakeGpu(uuid="GPU-r0")])
    fake.install(monkeypatch)
    node = LocalNode("reload", timeout_s=120)  # each read answers; the limit is only a safety net
    assert node.snapshot().nvml == "ok"
    inits = []
    real_init = pynvml.nvmlInit
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: (inits.append(1), real_init())[1])
    real_count = pynvml.nvmlDeviceGetCount

    def uninitialised() -> int:
        monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", real_count)  # only the first call after the reload
        raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", uninitialised)
    failed = node.snapshot()
    assert failed.nvml == "unavailable" and "re-initialised" in failed.reason
    assert node.snapshot().nvml == "ok" and inits == [1]


def test_the_agent_relays_live_figures_of_its_servers(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETDECK_VLLM", FAKE_VLLM_CMD)
    monkeypatch.setenv("FLEETDECK_SIM_START_DELAY", "0.2")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "q.toml").write_text('name = "q"\nmodel = "Qwen/Qwen3-8B"\n')
    monkeypatch.setenv("FLEETDECK_PROFILES", str(profiles))
    monkeypatch.chdir(tmp_path)  # no ./configs/profiles
    from fleet.simulated import demo_fleet

    pipe = Pipe(Agent(demo_fleet()[0], tmp_path / "agent.db", [], "9.9", interval_s=0.5))
    try:
        pipe.next("hello")

        def ask(op: str, args: dict, rid: int) -> dict:
            pipe.send({"v": 2, "type": "request", "id": rid, "op": op, "args": args})
            while True:
                msg = pipe.next("response", timeout=60)
                if msg["id"] == rid:
                    assert msg["ok"], msg
                    return msg["result"]

        assert ask("list_profiles", {}, 1) == ["q"]
        sid = ask("start_server", {"profile": "q", "gpus": [3]}, 2)["server"]["id"]
        fresh = itertools.count(3)  # an id names one request: the agent refuses one used before
        assert wait_for(lambda: ask("list_servers", {}, next(fresh))[0]["state"] == "ready")
        docs = ask("list_servers", {}, next(fresh))
        fig = docs[0]["figures"]
        assert fig is not None and fig["kv_tokens"] and fig["running"] is not None
        ask("stop_server", {"id": sid}, next(fresh))
    finally:
        pipe.close()


def test_every_operation_on_a_node_over_real_ssh_from_the_command_line(sshd, tmp_path, capsys, monkeypatch):
    """Servers, adapters, jobs and logs on a node reached over a real sshd, through the same commands as
    on this host with --node; the figures come from the node's agent; the node audits each change."""
    import re

    from tests.helpers import make_node_files

    dest, opts = sshd
    remote = make_node_files(tmp_path / "remote")
    agent = ["env", THIS_CHECKOUT, f"FLEETDECK_VLLM={FAKE_VLLM_CMD}", "FLEETDECK_SIM_START_DELAY=0.2",
             f"XDG_STATE_HOME={remote / 'state'}",
             f"XDG_CONFIG_HOME={remote / 'config'}", f"FLEETDECK_PROFILES={remote / 'profiles'}",
             PY, "-m", "fleetdeck", "agent", "--stdio", "--simulated", "--node-name", "gpu-02",
             "--store", str(remote / "fd.db"), "--config", str(remote / "fleet.toml")]
    fleet = tmp_path / "fleet.toml"
    # Every command below is a fresh ssh + agent start: on a loaded machine its hello can be slow.
    fleet.write_text(f'[[node]]\nname = "gpu-02"\nssh = "{dest}"\nssh_options = {json.dumps(opts)}\n'
                     f"agent_command = {json.dumps(agent)}\nhello_timeout_s = {WAIT_CEILING_S}\n")
    monkeypatch.chdir(tmp_path)

    def cli(*argv: str) -> str:
        rc = main([*argv, "--node", "gpu-02", "--config", str(fleet), "--store", str(tmp_path / "local.db")])
        out = capsys.readouterr()
        assert rc == 0, (argv, out.err)
        return out.out

    sid = re.search(r"started (q-\w+)", cli("serve", "start", "q", "--gpus", "3")).group(1)
    try:
        _operate_on_the_node(cli, sid, fleet, capsys, remote)
    finally:  # whatever failed, nothing this test started outlives it
        stop_everything(remote / "fd.db")


def test_a_node_whose_agent_never_says_hello_is_named_with_the_nodes_hello_limit(sshd, tmp_path, capsys):
    """A `--node` command waits for the first session's outcome, bounded by the node's hello_timeout_s."""
    dest, opts = sshd
    marker = str(tmp_path / "mute-agent")  # marks it for the kill below (nothing else names it)
    silent = [PY, "-c", "import time; time.sleep(600)", marker]
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'[[node]]\nname = "mute"\nssh = "{dest}"\nssh_options = {json.dumps(opts)}\n'
                     f"agent_command = {json.dumps(silent)}\nhello_timeout_s = 1\n")
    try:
        assert main(["serve", "ls", "--node", "mute", "--config", str(fleet), "--store", str(tmp_path / "l.db")]) == 2
        err = capsys.readouterr().err
        assert "mute: no hello from the agent within 1 s" in err and "Traceback" not in err
    finally:
        kill_processes_mentioning(marker)


def stop_everything(store_path: Path) -> None:
    """Stop the servers and jobs a node's store records as live (by their recorded pids)."""
    from engine.finetune import jobs as job_records
    from engine.vllm import launcher
    from store.db import open_store

    if not store_path.exists():
        return
    store = open_store(store_path)
    for rec in launcher.list_servers(store):
        if rec.state not in ("stopped", "crashed"):
            launcher.stop(store, rec, timeout=5)
    for job in job_records.list_jobs(store):
        if job.state == "running":
            job_records.cancel(store, job, timeout=10)


def _operate_on_the_node(cli, sid, fleet, capsys, remote):
    assert wait_for(lambda: json.loads(cli("serve", "ls", "--json"))[0]["state"] == "ready")
    listed = json.loads(cli("serve", "ls", "--json"))[0]
    assert listed["figures"]["kv_tokens"]  # read by the agent on its node
    assert json.loads(cli("serve", "show", sid, "--json"))["id"] == sid
    assert "added successfully" in cli("adapters", "load", sid, "tickets-v1")
    assert "tickets-v2 loaded, then tickets-v1 unloaded" in cli("adapters", "swap", sid, "tickets-v1", "tickets-v2")
    assert "Success" in cli("adapters", "unload", sid, "tickets-v2")
    assert "Starting vLLM API server" in cli("serve", "logs", sid)
    job = json.loads(cli("finetune", "start", "sim", "--gpus", "cpu", "--json"))
    assert [j["id"] for j in json.loads(cli("finetune", "ls", "--json"))] == [job["id"]]
    cli("finetune", "logs", job["id"])  # the job's log tail, read on its node (exit 0)
    assert json.loads(cli("finetune", "cancel", job["id"], "--json"))["state"] == "cancelled"
    assert cli("finetune", "resume", job["id"]).startswith(f"{job['id']}: running")  # the line this host prints
    assert json.loads(cli("finetune", "cancel", job["id"], "--json"))["state"] == "cancelled"
    assert json.loads(cli("serve", "stop", sid, "--json"))["state"] == "stopped"
    # A wrong node is named with the ones that exist.
    assert main(["serve", "ls", "--node", "gpu-99", "--config", str(fleet)]) == 2
    assert "no node 'gpu-99' in the fleet config (nodes: gpu-02)" in capsys.readouterr().err
    # Every change is in the node's own audit trail, on behalf of this dashboard's user.
    from engine.audit import trail as audit
    from store.db import open_store

    recs = list(reversed(audit.query(open_store(remote / "fd.db"))))
    assert [(r["action"], r["outcome"]) for r in recs] == [
        ("server.start", "done"), ("adapter.load", "done"), ("adapter.swap", "done"), ("adapter.unload", "done"),
        ("job.start", "done"), ("job.cancel", "done"), ("job.resume", "done"), ("job.cancel", "done"),
        ("server.stop", "done")]
    assert all(r["source"] == "agent" and r["on_behalf_of"] for r in recs)


async def test_restart_of_a_remote_server_from_the_servers_screen_starts_it_again(tmp_path):
    from tests.tui_helpers import open_screen, press_and_confirm, settle
    from tui.screens.servers import ServersScreen

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "q.toml").write_text('name = "q"\nmodel = "Qwen/Qwen3-8B"\n')
    agent = ["env", THIS_CHECKOUT, f"FLEETDECK_VLLM={FAKE_VLLM_CMD}", "FLEETDECK_SIM_START_DELAY=0.2",
             f"XDG_STATE_HOME={tmp_path / 'state'}", f"FLEETDECK_PROFILES={profiles}", *AGENT, "--node-name", "node-r", "--store", str(tmp_path / "r.db")]
    node = RemoteNode("node-r", agent, interval_s=0.3, hello_timeout_s=WAIT_CEILING_S)
    try:
        assert wait_for(lambda: node.link.status == "connected")
        first = node.request("start_server", {"profile": "q", "gpus": [3], "force": True})["server"]["id"]
        assert wait_for(lambda: node.request("list_servers")[0]["state"] == "ready")
        app = make_app(lambda: [node], store_path=tmp_path / "local.db")
        app.poller.close = lambda: None  # the test closes the node itself
        async with app.run_test(size=(140, 30)) as pilot:
            screen = await open_screen(app, pilot, "3", ServersScreen)
            table = screen.query_one("#servers-table", DataTable)
            assert f"@node-r:{first}" in [r.key.value for r in table.ordered_rows]
            assert str(table.get_cell(f"@node-r:{first}", "cap")).startswith("476,016")  # figures from the node
            table.move_cursor(row=table.get_row_index(f"@node-r:{first}"))
            await press_and_confirm(app, pilot, "r")
            await settle(app, pilot, 5)
            assert wait_for(lambda: len(node.request("list_servers")) == 2)
        states = {s["id"]: s["state"] for s in node.request("list_servers")}
        assert states.pop(first) == "stopped" and list(states.values())[0] in ("starting", "ready")
    finally:
        node.close()
        stop_everything(tmp_path / "r.db")


async def test_the_jobs_screen_shows_and_cancels_a_job_on_a_remote_node(tmp_path):
    from tests.helpers import make_node_files
    from tests.tui_helpers import open_screen, press_and_confirm, settle
    from tui.screens.jobs import JobsScreen
    from tui.screens.logs import LogScreen

    site = make_node_files(tmp_path / "node")
    agent = ["env", f"XDG_STATE_HOME={site / 'state'}", f"XDG_CONFIG_HOME={site / 'config'}",
             *AGENT, "--node-name", "node-j", "--store", str(site / "fd.db"), "--config", str(site / "fleet.toml")]
    node = RemoteNode("node-j", agent, interval_s=0.3, hello_timeout_s=WAIT_CEILING_S)
    try:
        assert wait_for(lambda: node.link.status == "connected")
        jid = node.request("start_job", {"spec": "sim"})["id"]
        assert wait_for(lambda: node.request("list_jobs")[0]["events"])  # it has taken a step
        app = make_app(lambda: [node], store_path=tmp_path / "local.db")
        app.poller.close = lambda: None  # the test closes the node itself
        async with app.run_test(size=(120, 30)) as pilot:
            screen = await open_screen(app, pilot, "4", JobsScreen)
            table = screen.query_one("#jobs-table", DataTable)
            key = f"@node-j:{jid}"
            assert key in [r.key.value for r in table.ordered_rows]
            assert str(table.get_cell(key, "step")).endswith("/400")  # progress read on the node
            table.move_cursor(row=table.get_row_index(key))
            await pilot.press("l")
            await settle(app, pilot)
            assert isinstance(app.screen, LogScreen)  # read through the node's agent
            await pilot.press("escape")
            await pilot.pause()
            await press_and_confirm(app, pilot, "c")
            # Let the app run while the agent cancels (never block its loop), however long that takes.
            await until(app, pilot, lambda: node.request("list_jobs")[0]["state"] == "cancelled", "job cancelled")
    finally:
        node.close()
        stop_everything(site / "fd.db")


async def test_a_remote_servers_adapters_panel_and_serving_a_remote_jobs_adapter(tmp_path):
    """The adapters panel and the Jobs screen's `v` go through the server's node, as for this host."""
    from engine.audit import trail as audit
    from store.db import open_store
    from tests.helpers import make_node_files
    from tests.tui_helpers import open_screen, settle
    from tui.screens.jobs import JobsScreen
    from tui.screens.servers import AdaptersScreen, ServersScreen

    site = make_node_files(tmp_path / "node")
    specs = site / "config" / "fleetdeck" / "finetune"
    (specs / "quick.toml").write_text((specs / "sim.toml").read_text().replace('name = "sim"', 'name = "quick"')
                                      .replace("max_steps = 400", "max_steps = 2\nwarmup_steps = 1\nlora_rank = 16"))
    agent = ["env", f"FLEETDECK_VLLM={FAKE_VLLM_CMD}", "FLEETDECK_SIM_START_DELAY=0.2", f"XDG_STATE_HOME={site / 'state'}",
             f"XDG_CONFIG_HOME={site / 'config'}", f"FLEETDECK_PROFILES={site / 'profiles'}", *AGENT,
             "--node-name", "node-a", "--store", str(site / "fd.db"), "--config", str(site / "fleet.toml")]
    node = RemoteNode("node-a", agent, interval_s=0.3, hello_timeout_s=WAIT_CEILING_S)

    def loaded(sid: str) -> list[str]:
        return node.request("list_adapters", {"server": sid})["loaded"]

    try:
        assert wait_for(lambda: node.link.status == "connected")
        sid = node.request("start_server", {"profile": "q", "gpus": [3], "force": True})["server"]["id"]
        assert wait_for(lambda: node.request("list_servers")[0]["state"] == "ready")
        jid = node.request("start_job", {"spec": "quick"})["id"]
        assert wait_for(lambda: node.request("list_jobs")[0]["state"] == "finished")
        app = make_app(lambda: [node], store_path=tmp_path / "local.db")
        app.poller.close = lambda: None  # the test closes the node itself
        async with app.run_test(size=(140, 36)) as pilot:
            screen = await open_screen(app, pilot, "3", ServersScreen)
            table = screen.query_one("#servers-table", DataTable)
            table.move_cursor(row=table.get_row_index(f"@node-a:{sid}"))
            await pilot.press("a")
            await settle(app, pilot, 3)
            panel = app.screen
            assert isinstance(panel, AdaptersScreen)
            await until(app, pilot, lambda: panel.disk, "the node's adapter listing")
            assert {"tickets-v1", "tickets-v2", "quick@v1"} <= {a.name for a in panel.disk}  # the node's roots
            assert panel.integrity["quick@v1"] is None  # hashed on the node
            disk = panel.query_one("#adapters-disk", DataTable)
            disk.move_cursor(row=disk.get_row_index("tickets-v1"))
            await pilot.press("enter")
            await until(app, pilot, lambda: loaded(sid) == ["tickets-v1"], "tickets-v1 loaded")
            await pilot.press("escape")
            await pilot.press("4")
            await settle(app, pilot)
            jobs_screen = app.screen
            assert isinstance(jobs_screen, JobsScreen)
            jt = jobs_screen.query_one("#jobs-table", DataTable)
            jt.move_cursor(row=jt.get_row_index(f"@node-a:{jid}"))
            await pilot.press("v")
            await until(app, pilot, lambda: "quick@v1" in loaded(sid), "quick@v1 served")
            assert loaded(sid) == ["tickets-v1", "quick@v1"]
        recs = [(r["action"], r["outcome"], r["source"]) for r in audit.query(open_store(site / "fd.db"))]
        assert ("adapter.load", "done", "agent") in recs
    finally:
        node.close()
        stop_everything(site / "fd.db")


# The first connection answers hello, takes requests and never answers them, and drops when told to;
# every later connection is the real agent. So the requests are in flight when the link drops.
FLAKY_AGENT = textwrap.dedent("""
    import json, os, sys, threading, time
    marker, go, seen, real = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    if os.path.exists(marker):
        os.execv(real[0], real)
    open(marker, "w").close()
    print(json.dumps({"v": %d, "type": "hello", "fleetdeck": "test", "host": "flaky", "node": "flaky",
                      "nvml": "ok", "reason": None}), flush=True)
    def read():
        for line in sys.stdin:
            if json.loads(line).get("type") == "request":
                with open(seen, "a") as fh:
                    fh.write(line)
    threading.Thread(target=read, daemon=True).start()
    while not os.path.exists(go):
        time.sleep(0.05)
    os._exit(0)
""" % PROTOCOL_VERSION)


def test_requests_in_flight_when_the_link_drops_fail_at_once_and_the_node_comes_back(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    marker, go, seen = tmp_path / "first", tmp_path / "go", tmp_path / "seen"
    node = RemoteNode("flaky", [PY, "-c", FLAKY_AGENT, str(marker), str(go), str(seen), *AGENT],
                      interval_s=0.2, backoff_s=(0.2, 0.5), hello_timeout_s=WAIT_CEILING_S)
    pool = ThreadPoolExecutor(4)
    try:
        assert wait_for(lambda: node.link.status == "connected")
        # Four requests the agent has received and not answered, each allowed 10 minutes.
        futures = [pool.submit(node.request, "ping", {}, 600.0) for _ in range(4)]
        assert wait_for(lambda: seen.exists() and len(seen.read_text().splitlines()) == 4)
        assert not any(f.done() for f in futures)
        go.touch()  # the link drops now
        outcomes = []
        for f in futures:
            with pytest.raises(AgentError) as err:
                f.result(timeout=60)  # well under the requests' own 600 s: they fail when the link goes
            outcomes.append(str(err.value))
        assert all("connection lost" in o for o in outcomes), outcomes
        # The node comes back (the real agent this time) and answers.
        assert wait_for(lambda: node.link.status == "connected"), node.link.error
        assert node.request("ping")["pong"] > 0 and node._thread.is_alive()
    finally:
        pool.shutdown(wait=False)
        node.close()


def test_both_sides_read_the_protocol_through_the_same_typed_messages():
    from fleet.protocol import BadMessage, Hello, Op, Request, Response, parse_agent, parse_client

    line = Request(id=7, op=Op.TAIL_LOG, args={"id": "s1", "n": 5}, operator="ann@dash").line()
    back = parse_client(json.loads(line))
    assert isinstance(back, Request) and (back.id, back.op, back.args) == (7, Op.TAIL_LOG, {"id": "s1", "n": 5})
    assert isinstance(parse_agent(json.loads(Hello(fleetdeck="1.0", node="n1").line())), Hello)
    answer = parse_agent({"v": PROTOCOL_VERSION, "type": "response", "id": 7, "ok": True, "result": [1], "extra": "new"})
    assert isinstance(answer, Response) and answer.result == [1]  # a newer peer's extra field is ignored
    for doc, why in [({"v": 2, "type": "request", "id": 1, "op": "reboot"}, "unknown op 'reboot'"),
                     ({"v": 2, "type": "request", "id": 1, "op": "ping", "args": []}, "args must be a JSON object"),
                     ({"v": 2, "type": "request", "op": "ping"}, "malformed message: id: Field required"),
                     ({"v": 2, "type": "shell", "cmd": "rm"}, "unknown type 'shell'")]:
        with pytest.raises(BadMessage, match=why):
            parse_client(doc)
    with pytest.raises(BadMessage, match="ok: Field required"):
        parse_agent({"v": 2, "type": "response", "id": 3})


@pytest.mark.parametrize("name", ["gpu:02", "gpu/02", "@gpu", "gpu 02", "-gpu"])
def test_a_node_name_that_would_split_an_id_or_a_gpu_field_is_refused_naming_the_key(tmp_path, capsys, name):
    """`@gpu:02:q-1` split at the first ':' named node `gpu`; `gpu/02/3` in the start dialog, node `gpu`."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'[[node]]\nname = "{name}"\nssh = "ops@gpu-02.invalid"\n')
    assert main(["nodes", "ls", "--config", str(fleet), "--store", str(tmp_path / "s.db")]) == 2
    err = capsys.readouterr().err
    assert str(fleet) in err and "node[0].name" in err and "Traceback" not in err, err
