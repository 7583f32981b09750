"""A fleet, not a host: the agent over a local pipe, remote nodes that drop and come back, protocol
faults, and a real SSH round-trip through sshd on loopback (installed by .ci/run)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from textual.widgets import DataTable

from engine.agent import Agent
from fleet.remote import PROTOCOL_VERSION, AgentError, RemoteNode
from fleet.source import LocalNode
from fleetdeck.cli import main
from tests.fakes.fake_nvml import FakeGpu, FakeNvml
from tests.helpers import FAKE_VLLM_CMD, Pipe, kill_processes_mentioning, wait_for
from tests.tui_helpers import make_app, ready

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
AGENT = [PY, "-m", "fleetdeck", "agent", "--stdio", "--simulated"]


def test_agent_over_a_local_pipe_with_faked_nvml(monkeypatch, tmp_path):
    FakeNvml([FakeGpu(uuid="GPU-r0"), FakeGpu(uuid="GPU-r1", util=88)]).install(monkeypatch)
    pipe = Pipe(Agent(LocalNode("node-b"), tmp_path / "agent.db", [], "9.9", interval_s=0.1))
    hello = pipe.next("hello")
    assert hello["v"] == PROTOCOL_VERSION and hello["fleetdeck"] == "9.9" and hello["nvml"] == "ok"
    snap = pipe.next("snapshot")["snapshot"]
    assert [g["uuid"] for g in snap["gpus"]] == ["GPU-r0", "GPU-r1"] and snap["gpus"][1]["utilization_gpu_pct"] == 88
    pipe.send({"v": 1, "type": "request", "id": 1, "op": "ping"})
    assert pipe.next("response")["ok"] is True
    pipe.send("{this is not json")
    bad = pipe.next("response")
    assert bad["ok"] is False and "malformed" in bad["error"]
    pipe.send({"v": 99, "type": "request", "id": 2, "op": "ping"})
    assert "protocol v99 not supported" in pipe.next("response")["error"]
    pipe.send({"v": 1, "type": "request", "id": 3, "op": "format_disks"})
    assert "unknown op" in pipe.next("response")["error"]
    pipe.send({"v": 1, "type": "request", "id": 4, "op": "list_servers"})
    assert pipe.next("response")["result"] == []
    pipe.close()


def test_a_remote_node_connects_drops_and_comes_back():
    node = RemoteNode("flaky", [*AGENT, "--exit-after", "1.5"], interval_s=0.2, backoff_s=(0.2, 0.5))
    try:
        assert wait_for(lambda: node.link.status == "connected" and node.snapshot().gpus)
        snap = node.snapshot()
        assert snap.node == "flaky" and all(g.node == "flaky" for g in snap.gpus) and snap.nvml == "ok"
        assert node.request("ping")["pong"] > 0
        # The agent exits (the node dropped): the screen keeps the last GPUs, marked stale, with the error.
        assert wait_for(lambda: node.link.status != "connected")
        down = node.snapshot()
        assert down.nvml == "unavailable" and down.gpus and down.gpus[0].error.startswith("stale")
        assert ("unreachable" in down.reason or "connecting" in down.reason)
        with pytest.raises(AgentError):
            node.request("ping", timeout=1)
        # ... and is reconnected with backoff.
        assert wait_for(lambda: node.link.status == "connected", timeout=20)
    finally:
        node.close()


def test_an_unreachable_node_says_so_and_never_blocks():
    node = RemoteNode("gone", [PY, "-c", "import sys; sys.stderr.write('ssh: connect to host gone port 22: Connection refused\\n'); sys.exit(255)"],
                      backoff_s=(0.2, 0.4))
    try:
        assert wait_for(lambda: node.link.status == "unreachable")
        t = time.perf_counter()
        snap = node.snapshot()
        assert time.perf_counter() - t < 0.05
        assert snap.nvml == "unavailable" and "unreachable since" in snap.reason and "Connection refused" in snap.reason
    finally:
        node.close()


def fake_agent(lines: list[str], tmp_path: Path) -> list[str]:
    script = tmp_path / "agent.py"
    script.write_text("import sys, time\n" + "".join(f"print({line!r}, flush=True)\n" for line in lines) + "time.sleep(30)\n")
    return [PY, str(script)]


def test_version_mismatch_is_reported_clearly(tmp_path):
    node = RemoteNode("old", fake_agent([json.dumps({"v": 2, "type": "hello", "fleetdeck": "9.0"})], tmp_path),
                      backoff_s=(5, 5))
    try:
        assert wait_for(lambda: node.link.status == "incompatible")
        assert "protocol v2, this dashboard v1" in node.snapshot().reason
    finally:
        node.close()


def test_malformed_and_out_of_order_messages_are_counted_not_fatal(tmp_path):
    snap = {"node": "x", "taken_at": 1.0, "nvml": "ok", "gpus": [], "host": {}}
    lines = [
        json.dumps({"v": 1, "type": "snapshot", "snapshot": snap}),  # before the hello
        "garbage{",
        json.dumps({"v": 1, "type": "hello", "fleetdeck": "0.1.0"}),
        json.dumps({"v": 1, "type": "response", "id": 12345, "ok": True}),  # an answer to nothing
        json.dumps({"v": 1, "type": "snapshot", "snapshot": {"nonsense": True}}),
        json.dumps({"v": 1, "type": "snapshot", "snapshot": snap}),
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
    remote = RemoteNode("node-b", [*AGENT, "--node-name", "node-b"], interval_s=0.2)
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
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@pytest.fixture
def sshd(tmp_path):
    if not Path(SSHD).exists():
        pytest.skip("sshd is not installed (.ci/run installs Debian's openssh-server)")
    keys = tmp_path / "ssh"
    keys.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "host")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "client")], check=True)
    (keys / "authorized_keys").write_text((keys / "client.pub").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    Path("/run/sshd").mkdir(exist_ok=True)
    config = keys / "sshd_config"
    config.write_text(textwrap.dedent(f"""
        ListenAddress 127.0.0.1
        Port {port}
        HostKey {keys / 'host'}
        AuthorizedKeysFile {keys / 'authorized_keys'}
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        PermitRootLogin prohibit-password
        StrictModes no
        UsePAM no
        PidFile {keys / 'sshd.pid'}
        AcceptEnv NONE
        ExposeAuthInfo yes
    """))
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)
    assert wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=0.2).close() is None
                    if _port_open(port) else False, timeout=10)
    user = os.environ.get("USER") or "root"
    opts = ["-p", str(port), "-i", str(keys / "client"), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    yield f"{user}@127.0.0.1", opts
    proc.terminate()
    proc.wait(timeout=10)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def test_a_remote_node_over_real_ssh_shows_gpus_and_starts_a_server(sshd, tmp_path, capsys):
    dest, opts = sshd
    remote_store = tmp_path / "remote.db"
    profiles = tmp_path / "remote-profiles"  # the node's own profile folder: the dashboard names, never sends
    profiles.mkdir()
    (profiles / "q.toml").write_text('name = "q"\nmodel = "Qwen/Qwen3-8B"\n')
    agent = ["env", f"FLEETDECK_VLLM={FAKE_VLLM_CMD}", "FLEETDECK_SIM_START_DELAY=0.2", f"XDG_STATE_HOME={tmp_path / 'state'}",
             f"FLEETDECK_PROFILES={profiles}",
             PY, "-m", "fleetdeck", "agent", "--stdio", "--simulated", "--node-name", "remote-1", "--store", str(remote_store)]
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'[[node]]\nname = "remote-1"\nssh = "{dest}"\nssh_options = {json.dumps(opts)}\n'
                     f"agent_command = {json.dumps(agent)}\n")
    node = RemoteNode.over_ssh("remote-1", dest, opts, agent, interval_s=0.3, backoff_s=(0.3, 1.0))
    try:
        assert wait_for(lambda: node.snapshot().nvml == "ok", timeout=30), node.link.error
        assert len(node.snapshot().gpus) == 4
        # Start a (fake) vLLM server on the remote node through the same command line the operator uses.
        assert main(["serve", "start", "q", "--gpus", "3", "--node", "remote-1", "--config", str(fleet)]) == 0, \
            capsys.readouterr().err
        assert "started q-" in capsys.readouterr().out
        assert wait_for(lambda: any(s["state"] == "ready" for s in node.request("list_servers")), timeout=30)
        # The node drops (its agent is killed) and comes back.
        assert kill_processes_mentioning(str(remote_store))  # only the agent this test started
        assert wait_for(lambda: node.link.status != "connected", timeout=15)
        assert wait_for(lambda: node.link.status == "connected", timeout=30)
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
    node = RemoteNode.over_ssh("locked", dest, opts, None, interval_s=0.3, backoff_s=(0.3, 1.0))
    try:
        assert wait_for(lambda: node.link.status == "connected", timeout=30), node.link.error
        with pytest.raises(AgentError, match="no profile named"):
            node.request("start_server", {"profile": {"name": "x", "model": "m",
                                                      "vllm_command": ["/bin/sh", "-c", f"id > {marker}"]}, "gpus": [0]})
        assert not marker.exists()
    finally:
        node.close()
    # The node's audit trail has the refusal, with the SSH source, the key that made it and who asked.
    from engine import audit
    from store.db import open_store

    (rec,) = audit.query(open_store(tmp_path / "locked.db"))
    fingerprint = subprocess.run(["ssh-keygen", "-lf", str(keys / "client.pub")], capture_output=True, text=True,
                                 check=True).stdout.split()[1]
    assert (rec["action"], rec["outcome"], rec["source"]) == ("server.start", "refused", "agent")
    assert rec["origin"].startswith("127.0.0.1:") and rec["key_fingerprint"] == fingerprint
    assert rec["on_behalf_of"] and "@" in rec["on_behalf_of"]
