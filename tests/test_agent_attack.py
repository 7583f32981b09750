"""What an attack on a node's agent found, each kept as a test (the agent's boundary, the line parser, the
client that reads an agent, and the command line's `--node`).

- A request id or protocol version of the wrong JSON type ("5", true) was taken as a number: the answer
  came back under another id than was sent, and `"v": "2"` was refused as "protocol v2 not supported".
- A flood of lines started a thread per line, without bound.
- A profile, job spec or adapter in the node's folders that is a symbolic link out of them was followed
  for a request from the network.
- The agent's error text carried the engine's class name ("BadRequest: no profile named ...").
- On the dashboard's side: one line from the node that is not UTF-8 (a login script's banner) ended the
  connection's thread for good (a traceback, and the node CONNECTING forever); a hello that does not fit
  was reported as no hello at all; a `--node` command with a value the agent refuses (a port below 1024,
  an empty id) printed pydantic's multi-line error; and `@other:id` was sent to the `--node` named.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.nodes import agent as agent_module
from engine.nodes.agent import Agent
from engine.nodes.remote import AgentOps
from fleet.protocol import PROTOCOL_VERSION, BadMessage, Request, Subscribe, parse_client, version_problem
from fleet.remote import AgentError, RemoteNode
from fleet.simulated import demo_fleet
from tests.helpers import WAIT_CEILING_S, Pipe, make_adapter, make_node_files, sshd_server, wait_for

PY = sys.executable
THIS_CHECKOUT = str(Path(__file__).resolve().parents[1])

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(max_size=8) | st.sampled_from([10**400, -(10**400), "2", 2.0, True]),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                           max_leaves=6)


def _ask(pipe: Pipe, msg: dict) -> dict:
    pipe.send(msg)
    return pipe.next("response")


@pytest.fixture
def agent_pipe(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    agent = Agent(demo_fleet()[0], tmp_path / "node.db", [], "9.9", interval_s=0.2)
    pipe = Pipe(agent)
    pipe.next("hello")
    yield agent, pipe
    pipe.close()


# -- the line parser ------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(rid=json_values)
def test_a_request_id_is_a_json_integer_and_nothing_else(rid):
    doc = {"v": PROTOCOL_VERSION, "type": "request", "id": rid, "op": "ping"}
    if isinstance(rid, int) and not isinstance(rid, bool):
        assert parse_client(doc) == Request(id=rid, op="ping")
    else:
        with pytest.raises(BadMessage, match="id"):
            parse_client(doc)


@settings(max_examples=300, deadline=None)
@given(v=json_values)
def test_only_the_number_2_is_this_protocols_version(v):
    problem = version_problem({"v": v})
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v == PROTOCOL_VERSION:
        assert problem is None
    else:
        assert problem is not None and "\n" not in problem and f"this agent speaks v{PROTOCOL_VERSION}" in problem


@settings(max_examples=200, deadline=None)
@given(interval=json_values)
def test_a_subscription_interval_is_a_finite_number_of_seconds(interval):
    doc = {"v": PROTOCOL_VERSION, "type": "subscribe", "interval": interval}
    if interval is None or (isinstance(interval, (int, float)) and not isinstance(interval, bool) and _fits_a_float(interval)):
        assert parse_client(doc) == Subscribe(interval=None if interval is None else float(interval))
    else:
        with pytest.raises(BadMessage, match="interval must be seconds"):
            parse_client(doc)


def _fits_a_float(n: float) -> bool:
    try:
        float(n)
        return True
    except OverflowError:  # 10**400: JSON can write it, a number of seconds it is not
        return False


@pytest.mark.parametrize("line,error", [
    ({"v": 2, "type": "request", "id": "5", "op": "ping"}, "malformed message: id: Input should be a valid integer"),
    ({"v": 2, "type": "request", "id": True, "op": "ping"}, "malformed message: id: Input should be a valid integer"),
    ({"v": "2", "type": "request", "id": 5, "op": "ping"}, "v must be the protocol version as a number, got '2'"),
    ({"type": "request", "id": 5, "op": "ping"}, "no protocol version (v)"),
])
def test_an_id_or_version_of_the_wrong_kind_is_refused_not_taken_for_another(agent_pipe, line, error):
    agent, pipe = agent_pipe
    answer = _ask(pipe, line)
    assert answer["ok"] is False and answer["error"].startswith(error), answer
    assert answer["id"] in (None, 5)  # never 1 for `true`, never 5 for "5"
    assert _ask(pipe, {"v": 2, "type": "request", "id": 6, "op": "ping"})["ok"] is True


@pytest.mark.parametrize("op,args,error", [
    ("load_adapter", {"server": "s", "adapter": "a", "name": "x\n"}, "name must be an adapter name, got 'x\\n'"),
    ("swap_adapter", {"server": "s", "adapter": "a", "old": "x\n"}, "old must be an adapter name, got 'x\\n'"),
    ("unload_adapter", {"server": "s", "name": "tickets-v1\n"}, "name must be an adapter name"),
    ("start_server", {"profile": "q", "slurm": {"partition": "gpu\n"}}, "slurm.partition must be a partition name"),
    ("start_job", {"spec": "s", "slurm": {"partition": "gpu\n"}}, "slurm.partition must be a partition name"),
])
def test_a_name_with_a_trailing_newline_is_not_a_name(op, args, error):
    """A name's pattern is matched whole: `$` also matches before a final newline, which let a served-as name
    or a Slurm partition end in one."""
    from fleet.protocol import Op, parse_args

    with pytest.raises(BadMessage) as caught:
        parse_args(Op(op), args)
    assert str(caught.value).startswith(error), caught.value


def test_a_flood_of_requests_waits_for_a_free_handler_and_every_one_is_answered(agent_pipe):
    agent, pipe = agent_pipe
    gate, lock = threading.Event(), threading.Lock()
    running, most = [0], [0]

    def held_ping(_args: object) -> dict:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        gate.wait(WAIT_CEILING_S)
        with lock:
            running[0] -= 1
        return {"pong": 0.0}

    agent.ops["ping"] = held_ping
    n = agent_module.MAX_HANDLERS * 3
    for i in range(n):
        pipe.send({"v": 2, "type": "request", "id": i, "op": "ping"})
    assert wait_for(lambda: running[0] == agent_module.MAX_HANDLERS, timeout=WAIT_CEILING_S)
    assert most[0] == agent_module.MAX_HANDLERS  # the rest wait unread, no thread each
    gate.set()
    assert sorted(pipe.next("response")["id"] for _ in range(n)) == list(range(n))
    assert most[0] == agent_module.MAX_HANDLERS


# -- the node's folders ---------------------------------------------------------------------------------
@pytest.fixture
def linked_node(tmp_path, monkeypatch):
    """A node whose profile, job spec and adapter folders each hold one entry that links out of them."""
    root = make_node_files(tmp_path / "node")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "planted.toml").write_text('name = "planted"\nmodel = "Qwen/Qwen3-8B"\n')
    (root / "profiles" / "planted.toml").symlink_to(outside / "planted.toml")
    os.rename(root / "config" / "fleetdeck" / "finetune" / "sim.toml", outside / "sim.toml")
    (root / "config" / "fleetdeck" / "finetune" / "sim.toml").symlink_to(outside / "sim.toml")
    make_adapter(outside / "adapters", "planted-v1")
    (root / "adapters" / "planted-v1").symlink_to(outside / "adapters" / "planted-v1")
    # A folder that is itself a link is the operator's choice of where it lives: its files are in it.
    (tmp_path / "profiles-link").symlink_to(root / "profiles")
    monkeypatch.setenv("FLEETDECK_PROFILES", str(tmp_path / "profiles-link"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(root / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(root / "state"))
    monkeypatch.setenv("FLEETDECK_VLLM", str(tmp_path / "no-vllm-here"))  # nothing can start
    return root


@pytest.mark.parametrize("op,args,kind,name", [
    ("start_server", {"profile": "planted", "gpus": [0]}, "profile", "planted"),
    ("start_job", {"spec": "sim"}, "job spec", "sim"),
    ("load_adapter", {"server": "nosuch", "adapter": "planted-v1"}, "adapter", "planted-v1"),
    ("swap_adapter", {"server": "nosuch", "adapter": "planted-v1", "old": "tickets-v1"}, "adapter", "planted-v1"),
])
def test_a_name_that_links_out_of_the_nodes_folders_is_refused_and_recorded(linked_node, op, args, kind, name):
    from engine.audit import trail as audit
    from store.db import open_store

    db = linked_node / "fd.db"
    with audit.session(db, "agent"):
        pipe = Pipe(Agent(demo_fleet()[0], db, [linked_node / "adapters"], "9.9", interval_s=0.2))
        try:
            pipe.next("hello")
            answer = _ask(pipe, {"v": 2, "type": "request", "id": 1, "op": op, "args": args, "operator": "eve@dash"})
        finally:
            pipe.close()
    assert answer["ok"] is False
    assert answer["error"].startswith(f"{kind} {name!r} is a symbolic link out of its folder"), answer["error"]
    (rec,) = audit.query(open_store(db))
    assert rec["outcome"] == "refused" and "symbolic link out of its folder" in rec["reason"]


def test_a_profile_in_a_linked_folder_and_a_real_adapter_pass_the_check(linked_node):
    pipe = Pipe(Agent(demo_fleet()[0], linked_node / "fd.db", [linked_node / "adapters"], "9.9", interval_s=0.2))
    try:
        pipe.next("hello")
        started = _ask(pipe, {"v": 2, "type": "request", "id": 1, "op": "start_server", "args": {"profile": "q", "gpus": [0], "force": True}})
        loaded = _ask(pipe, {"v": 2, "type": "request", "id": 2, "op": "load_adapter",
                             "args": {"server": "nosuch", "adapter": "tickets-v1"}})
    finally:
        pipe.close()
    assert started["error"].startswith("cannot find the vLLM command"), started  # past the check, to the launch
    assert loaded["error"] == "no server 'nosuch' (see `fleetdeck serve ls`)"  # the engine's line, no class name


def test_the_nodes_lists_hold_only_names_a_request_can_use(linked_node, tmp_path, monkeypatch):
    """list_profiles and list_specs list what a start can use: not a link out of its folder, not a name no
    request can carry, not a folder or a dangling link named NAME.toml. The node's own CLI keeps its links."""
    from engine.nodes.local import LocalOps
    from store.db import open_store

    monkeypatch.chdir(tmp_path)  # no ./configs/profiles
    profiles = linked_node / "profiles"
    (profiles / "two words.toml").write_text('name = "x"\nmodel = "Qwen/Qwen3-8B"\n')
    (profiles / "adir.toml").mkdir()
    (profiles / "gone.toml").symlink_to(tmp_path / "nowhere.toml")
    (profiles / "-dash.toml").write_text('name = "x"\nmodel = "Qwen/Qwen3-8B"\n')
    pipe = Pipe(Agent(demo_fleet()[0], linked_node / "fd.db", [linked_node / "adapters"], "9.9", interval_s=0.2))
    try:
        pipe.next("hello")
        listed = _ask(pipe, {"v": 2, "type": "request", "id": 1, "op": "list_profiles"})["result"]
        specs = _ask(pipe, {"v": 2, "type": "request", "id": 2, "op": "list_specs"})["result"]
        missing = _ask(pipe, {"v": 2, "type": "request", "id": 3, "op": "start_server",
                              "args": {"profile": "nosuch", "gpus": [0]}})
    finally:
        pipe.close()
    assert listed == ["q"] and specs == []  # `planted` and `sim` link out; the rest cannot be used
    assert missing["error"] == "no profile named 'nosuch' on this host; known: q", missing
    own = LocalOps(open_store(linked_node / "own.db"), [])  # the node's own operator: links are theirs to keep
    assert own.profiles() == ["planted", "q"] and own.specs() == ["sim"]


# -- the dashboard's side ---------------------------------------------------------------------------------
def _agent_argv(root: Path, banner: bytes = b"") -> list[str]:
    """The agent of a node with make_node_files' folders, after `banner` (a login script's words) on stdout."""
    env = [f"PYTHONPATH={THIS_CHECKOUT}", f"XDG_STATE_HOME={root / 'state'}", f"XDG_CONFIG_HOME={root / 'config'}",
           f"FLEETDECK_PROFILES={root / 'profiles'}"]
    agent = [PY, "-m", "fleetdeck", "agent", "--stdio", "--simulated", "--node-name", "gpu-02",
             "--store", str(root / "fd.db"), "--config", str(root / "fleet.toml")]
    if not banner:
        return ["env", *env, *agent]
    say = f"import sys; sys.stdout.buffer.write({banner!r}); sys.stdout.flush()"
    return ["sh", "-c", f'"$0" -c "$1" && shift && exec env {" ".join(env)} "$@"', PY, say, *agent]


@pytest.mark.parametrize("banner", [b"\xff\xfe welcome to gpu-02\n", b"\xc3( latin-1 motd \xe9t\xe9\n"])
def test_a_line_that_is_not_utf8_from_the_node_is_one_bad_line_not_the_end_of_the_link(tmp_path, banner):
    root = make_node_files(tmp_path / "node")
    node = RemoteNode("gpu-02", _agent_argv(root, banner), interval_s=0.3, hello_timeout_s=WAIT_CEILING_S)
    try:
        assert wait_for(lambda: node.link.status != "connecting", timeout=WAIT_CEILING_S + 5)
        assert node.link.status == "connected", node.link.error
        assert node.link.bad_messages == 1 and node._thread.is_alive()
        assert node.request("ping")["pong"] > 0
    finally:
        node.close()


def test_a_hello_that_does_not_fit_is_named_in_the_error(tmp_path):
    hello = json.dumps({"v": PROTOCOL_VERSION, "type": "hello", "fleetdeck": 5})
    node = RemoteNode("odd", [PY, "-c", f"import time; print({hello!r}, flush=True); time.sleep(60)"], hello_timeout_s=1)
    try:
        assert wait_for(lambda: node.link.status == "unreachable", timeout=WAIT_CEILING_S)
        assert node.link.error.startswith("no hello from the agent within 1 s; its hello did not fit the protocol "
                                          "(malformed message: fleetdeck: Input should be a valid string)")
    finally:
        node.close()


def test_values_the_agent_would_refuse_are_one_line_before_anything_is_sent(tmp_path):
    root = make_node_files(tmp_path / "node")
    node = RemoteNode("gpu-02", _agent_argv(root), interval_s=0.3, hello_timeout_s=WAIT_CEILING_S)
    try:
        assert wait_for(lambda: node.link.status == "connected", timeout=WAIT_CEILING_S + 5), node.link.error
        ops = AgentOps(node)
        cases = [(lambda: ops.start_server("q", [0], port=80), "gpu-02: port must be from 1024 to 65535, got 80"),
                 (lambda: ops.stop_server(""), "gpu-02: id must be a non-empty string, got ''"),
                 (lambda: ops.tail_log("server", "x", n=0), "gpu-02: n must be a line count from 1 to 10000, got 0"),
                 (lambda: ops.stop_server("@gpu-03:q-1"), "@gpu-03:q-1 is on gpu-03, not gpu-02"),
                 (lambda: ops.cancel_job("@gpu-03:ft-1"), "@gpu-03:ft-1 is on gpu-03, not gpu-02")]
        for call, line in cases:
            with pytest.raises(AgentError) as caught:
                call()
            assert str(caught.value).startswith(line) and "\n" not in str(caught.value)
        assert ops.servers() == []  # nothing was started
    finally:
        node.close()


@pytest.fixture
def sshd(tmp_path):
    yield from sshd_server(tmp_path)


def test_over_real_ssh_a_banner_that_is_not_utf8_and_clumsy_values_get_one_line(sshd, tmp_path, capsys):
    """Through a real sshd: a node whose login prints latin-1 before the agent answers `--node` commands, and
    values the agent refuses get one line and exit 2 from the command line, never a traceback."""
    from fleetdeck.cli import main

    dest, opts = sshd
    root = make_node_files(tmp_path / "node")
    agent = _agent_argv(root, "bienvenue à gpu-02\n".encode("latin-1"))
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'[[node]]\nname = "gpu-02"\nssh = "{dest}"\nssh_options = {json.dumps(opts)}\n'
                     f"agent_command = {json.dumps(agent)}\n"
                     f"hello_timeout_s = {WAIT_CEILING_S}\n")

    def cli(*argv: str) -> tuple[int, str, str]:
        rc = main([*argv, "--node", "gpu-02", "--config", str(fleet), "--store", str(tmp_path / "local.db")])
        out = capsys.readouterr()
        return rc, out.out, out.err

    assert cli("serve", "ls")[:2] == (0, "no servers (start one with `fleetdeck serve start PROFILE --gpus 0`)\n")
    for argv, line in [(("serve", "start", "q", "--gpus", "0", "--port", "80"), "port must be from 1024 to 65535, got 80"),
                       (("serve", "stop", ""), "id must be a non-empty string, got ''"),
                       (("serve", "stop", "@gpu-03:q-1"), "@gpu-03:q-1 is on gpu-03, not gpu-02"),
                       (("serve", "start", "nope", "--gpus", "0"), "no profile named 'nope' on this host; known: q")]:
        rc, out, err = cli(*argv)
        assert rc == 2 and line in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_a_node_whose_ssh_fails_at_once_is_named_by_sshs_words_and_its_link_lives_on(tmp_path):
    """ssh refused (exit 255) before the subscription is written: the write meets a closed pipe, which ends
    that session with ssh's own line, not the connection's thread."""
    refused = "ssh: connect to host gpu-09 port 22: Connection refused"
    node = RemoteNode("gpu-09", ["sh", "-c", f"exec <&-; echo '{refused}' >&2; exit 255"], backoff_s=(0.2, 0.5))
    try:
        assert wait_for(lambda: node.link.status == "unreachable", timeout=WAIT_CEILING_S)
        assert node.link.error == refused and node._thread.is_alive()
    finally:
        node.close()


@pytest.mark.parametrize("gpus,partition,time,line", [
    (0, None, None, "slurm.gpus must be a count 1-64, got 0"),
    (65, None, None, "slurm.gpus must be a count 1-64, got 65"),
    (1, "../../x", None, "slurm.partition must be a partition name, got '../../x'"),
    (1, "-p", None, "slurm.partition must be a partition name, got '-p'"),
    (1, None, " ", "slurm.time must be a non-empty string, got ' '"),
])
def test_a_slurm_ask_from_the_command_line_is_refused_in_one_line(gpus, partition, time, line, tmp_path, capsys):
    from fleet.protocol import slurm_ask
    from fleetdeck.cli import main

    with pytest.raises(BadMessage) as caught:
        slurm_ask(gpus, partition, time)
    assert str(caught.value) == line
    if gpus == 1:  # the flags' own checks come first for a count
        fleet = tmp_path / "fleet.toml"  # never reached: the ask is refused before any connection
        fleet.write_text('[[node]]\nname = "gpu-02"\nssh = "ops@gpu-02.invalid"\n')
        argv = ["--slurm", "--gpus", "1"] + [f"--partition={partition}"] * bool(partition) + [f"--time={time}"] * bool(time)
        for command in (["serve", "start", "q"], ["finetune", "start", "sim"]):
            assert main([*command, *argv, "--node", "gpu-02", "--config", str(fleet),
                         "--store", str(tmp_path / "s.db")]) == 2
            err = capsys.readouterr().err
            assert err.strip().endswith(line) and len(err.strip().splitlines()) == 1, err


def test_changes_asked_at_once_happen_one_at_a_time_so_starts_never_share_a_port(tmp_path, monkeypatch):
    """Four starts sent together: before, two planned at once took the same free port and one crashed on it."""
    from engine.vllm import launcher
    from store.db import open_store
    from tests.helpers import FAKE_VLLM_CMD

    root = make_node_files(tmp_path / "node")
    for key, value in {"FLEETDECK_VLLM": FAKE_VLLM_CMD, "FLEETDECK_SIM_START_DELAY": "0.2",
                       "FLEETDECK_PROFILES": str(root / "profiles"), "XDG_STATE_HOME": str(root / "state"),
                       "XDG_CONFIG_HOME": str(root / "config")}.items():
        monkeypatch.setenv(key, value)
    db = root / "fd.db"
    pipe = Pipe(Agent(demo_fleet()[0], db, [root / "adapters"], "9.9", interval_s=0.2))
    try:
        pipe.next("hello")
        for i in range(4):
            pipe.send({"v": 2, "type": "request", "id": i, "op": "start_server",
                       "args": {"profile": "q", "gpus": [i], "force": True}})
        answers = [pipe.next("response") for _ in range(4)]
        assert all(a["ok"] for a in answers), answers
        assert len({a["result"]["server"]["port"] for a in answers}) == 4
    finally:
        pipe.close()
        store = open_store(db)
        for rec in launcher.list_servers(store):
            launcher.stop(store, rec, timeout=5)


def test_two_dashboards_agents_on_one_node_make_their_changes_one_at_a_time(tmp_path, monkeypatch):
    """Two dashboards are two SSH sessions, two agents on one store: their starts sent together each took a
    port the other had just taken (the one-change-at-a-time lock was one agent's). A lock file beside the
    store now orders them across agents."""
    from engine.vllm import launcher
    from store.db import open_store
    from tests.helpers import FAKE_VLLM_CMD

    root = make_node_files(tmp_path / "node")
    for key, value in {"FLEETDECK_VLLM": FAKE_VLLM_CMD, "FLEETDECK_SIM_START_DELAY": "0.2",
                       "FLEETDECK_PROFILES": str(root / "profiles"), "XDG_STATE_HOME": str(root / "state"),
                       "XDG_CONFIG_HOME": str(root / "config")}.items():
        monkeypatch.setenv(key, value)
    db = root / "fd.db"
    pipes = [Pipe(Agent(demo_fleet()[0], db, [root / "adapters"], "9.9", interval_s=0.2)) for _ in range(2)]
    try:
        for pipe in pipes:
            pipe.next("hello")
        for i in range(3):
            for n, pipe in enumerate(pipes):
                pipe.send({"v": 2, "type": "request", "id": i, "op": "start_server",
                           "args": {"profile": "q", "gpus": [n * 2 + i % 2], "force": True}})
        answers = [pipe.next("response") for pipe in pipes for _ in range(3)]
        assert all(a["ok"] for a in answers), answers
        assert len({a["result"]["server"]["port"] for a in answers}) == 6  # no port taken twice
        assert (root / "fd.db.changes.lock").stat().st_mode & 0o777 == 0o600
    finally:
        for pipe in pipes:
            pipe.close()
        store = open_store(db)
        for rec in launcher.list_servers(store):
            launcher.stop(store, rec, timeout=5)


def test_requests_sent_just_before_stdin_closes_are_all_answered_and_recorded(tmp_path):
    """`printf REQUESTS | fleetdeck agent --stdio`: the agent used to end at EOF with requests still in hand
    (answers lost, and a change cut off before its record); it now ends when each has answered."""
    import subprocess

    from engine.audit import trail as audit
    from store.db import open_store

    env = {**os.environ, "PYTHONPATH": THIS_CHECKOUT, "XDG_STATE_HOME": str(tmp_path / "state"),
           "XDG_CONFIG_HOME": str(tmp_path / "config"), "FLEETDECK_PROFILES": str(tmp_path / "profiles")}
    asks = [("list_servers", {}), ("stop_server", {"id": "nosuch"}), ("start_job", {"spec": "nope"}), ("ping", {})] * 5
    lines = "".join(json.dumps({"v": 2, "type": "request", "id": i, "op": op, "args": args}) + "\n"
                    for i, (op, args) in enumerate(asks))
    db = tmp_path / "node.db"
    done = subprocess.run([PY, "-m", "fleetdeck", "agent", "--stdio", "--simulated", "--store", str(db)], input=lines,
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=WAIT_CEILING_S)
    assert done.returncode == 0, done.stderr
    answers = [m for m in map(json.loads, done.stdout.splitlines()) if m["type"] == "response"]
    assert sorted(a["id"] for a in answers) == list(range(len(asks)))
    recs = audit.query(open_store(db))
    assert sorted((r["action"], r["outcome"]) for r in recs) == [("job.start", "refused")] * 5 + [("server.stop", "refused")] * 5


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_a_log_tail_reaches_the_terminal_with_no_control_character_but_lines_and_tabs(text):
    import unicodedata

    from fleetdeck.node_cli import log_text

    out = log_text(text)
    assert all(ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Zl", "Zp") for ch in out)
    assert out.count("\n") == text.replace("\r\n", "\n").replace("\r", "\n").count("\n")


def test_serve_logs_shows_what_a_log_holds_without_letting_it_drive_the_terminal(tmp_path, capsys):
    import time

    from engine.managed import LocalGpus
    from engine.vllm.record import ServerRecord, ServerState
    from fleetdeck.cli import main
    from store.db import open_store

    log = tmp_path / "q.log"
    log.write_bytes(b"INFO started\r\nprompt was \x1b]0;owned\x07\x1b[2J here\rLoading 100%\n")
    rec = ServerRecord(id="q-esc001", name="q", node="n", pid=None, create_time=None, argv=["vllm"], env={},
                       gpus=LocalGpus((0,)), port=18001, log_path=str(log), spec={}, state=ServerState.STOPPED,
                       reason=None, started_at=time.time())
    rec.save(open_store(tmp_path / "s.db"))
    assert main(["serve", "logs", "q-esc001", "--store", str(tmp_path / "s.db")]) == 0
    out = capsys.readouterr().out
    assert out == "INFO started\nprompt was \\x1b]0;owned\\x07\\x1b[2J here\nLoading 100%\n"


def test_a_remote_restart_is_the_nodes_own_from_its_record_even_when_the_profile_is_named_otherwise(tmp_path):
    """A server's record carries its profile's `name`, which need not be its file's name. The dashboard
    restarted a remote server by stopping it and starting that name: "no profile named 'qwen'", and the
    server stayed stopped. The node now restarts it from its own record (its spec, its GPUs)."""
    from engine.vllm import launcher
    from store.db import open_store
    from tests.helpers import FAKE_VLLM_CMD

    root = make_node_files(tmp_path / "node")
    (root / "profiles" / "q.toml").write_text('name = "qwen"\nmodel = "Qwen/Qwen3-8B"\n')  # the file q, the profile qwen
    env = [f"PYTHONPATH={THIS_CHECKOUT}", f"FLEETDECK_VLLM={FAKE_VLLM_CMD}", "FLEETDECK_SIM_START_DELAY=0.2",
           f"XDG_STATE_HOME={root / 'state'}", f"XDG_CONFIG_HOME={root / 'config'}", f"FLEETDECK_PROFILES={root / 'profiles'}"]
    argv = ["env", *env, PY, "-m", "fleetdeck", "agent", "--stdio", "--simulated", "--node-name", "gpu-02",
            "--store", str(root / "fd.db"), "--config", str(root / "fleet.toml")]
    node = RemoteNode("gpu-02", argv, interval_s=0.3, hello_timeout_s=WAIT_CEILING_S)
    try:
        assert wait_for(lambda: node.link.status == "connected", timeout=WAIT_CEILING_S + 5), node.link.error
        ops = AgentOps(node)
        sid = ops.start_server("q", [3], force=True).rec.id
        assert wait_for(lambda: next(s.rec.state for s in ops.servers() if s.rec.id == sid) != "starting")
        done = ops.restart_server(sid)
        assert done.old.id == sid and done.new.id != sid and done.new.id.startswith("@gpu-02:qwen-")
        assert str(done.new.gpus) == "3" and done.new.spec["model"] == "Qwen/Qwen3-8B"
        states = {s.rec.id: s.rec.state for s in ops.servers()}
        # (crashed: it had ended before the restart, e.g. its port taken by another test's server meanwhile)
        assert states[sid] in ("stopped", "crashed") and states[done.new.id] in ("starting", "ready", "crashed")
    finally:
        node.close()
        store = open_store(root / "fd.db")
        for rec in launcher.list_servers(store):
            launcher.stop(store, rec, timeout=5)


OLD_AGENT = """
import json, sys, time
asked = sys.argv[1]
record = {"id": "qwen-1", "name": "qwen", "node": "gpu-02", "pid": 1, "create_time": 1.0, "argv": ["vllm"], "env": {},
          "gpus": "3", "port": 8000, "log_path": "/x.log",
          "spec": {"name": "qwen", "model": "Qwen/Qwen3-8B"}, "state": "ready", "started_at": 0.0}
print(json.dumps({"v": 2, "type": "hello", "fleetdeck": "0.9"}), flush=True)
for line in sys.stdin:
    m = json.loads(line)
    if m.get("type") != "request":
        continue
    with open(asked, "a") as f:
        f.write(m["op"] + "\\n")
    answers = {"list_servers": [record], "list_profiles": ["q"]}
    if m["op"] in answers:
        out = {"ok": True, "result": answers[m["op"]]}
    else:
        out = {"ok": False, "error": "unknown op " + repr(m["op"]) + "; known: [...]"}
    print(json.dumps({"v": 2, "type": "response", "id": m["id"], **out}), flush=True)
"""


def test_an_older_agent_is_never_asked_to_stop_a_server_it_cannot_start_again(tmp_path):
    """An agent without restart_server gets stop then start by name, but only for a name it has a profile of."""
    script, asked = tmp_path / "old_agent.py", tmp_path / "asked"
    script.write_text(OLD_AGENT)
    node = RemoteNode("gpu-02", [PY, str(script), str(asked)], interval_s=0.3, hello_timeout_s=WAIT_CEILING_S)
    try:
        assert wait_for(lambda: node.link.status == "connected"), node.link.error
        with pytest.raises(AgentError) as caught:
            AgentOps(node).restart_server("@gpu-02:qwen-1")
    finally:
        node.close()
    assert "has no profile named 'qwen': nothing was stopped; upgrade it" in str(caught.value)
    assert asked.read_text().split() == ["restart_server", "list_servers", "list_profiles"]  # no stop_server
