"""The node agent is the boundary of its node: what a request may name, and what it gets when it names
anything else. Every case holds with the agent still answering afterwards.

Each row: the request's op and args, and the text its error carries. None of them may run a command,
write a file, or touch a server the request did not name exactly.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from engine import managed
from engine.nodes.agent import Agent
from engine.managed import LocalGpus
from engine.vllm.record import ServerRecord, ServerState
from fleet.simulated import demo_fleet
from fleetdeck.cli import main
from store.db import open_store
from tests.helpers import Pipe

MARKER = "/tmp/fleetdeck-agent-was-steered"


@pytest.fixture
def node(tmp_path, monkeypatch):
    """An agent whose node has one profile (`q`) and one job spec (`tickets`) in its own folders, and one
    live server (a real process) in its store."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "q.toml").write_text('name = "q"\nmodel = "Qwen/Qwen3-8B"\n')
    specs = tmp_path / "config" / "fleetdeck" / "finetune"
    specs.mkdir(parents=True)
    (specs / "tickets.toml").write_text('name = "tickets"\nbase_model = "/nonexistent/base"\ndataset = "d.jsonl"\n')
    monkeypatch.setenv("FLEETDECK_PROFILES", str(profiles))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    store_path = tmp_path / "node.db"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    rec = ServerRecord(id="q-live01", name="q", node="n", pid=sleeper.pid, create_time=psutil.Process(sleeper.pid).create_time(),
                       argv=["vllm"], env={}, gpus=LocalGpus((0,)), port=18000, log_path=str(tmp_path / "q.log"), spec={},
                       state=ServerState.READY, reason=None, started_at=time.time())
    (tmp_path / "q.log").write_text("the live server's log\n")
    rec.save(open_store(store_path))
    yield tmp_path, store_path, sleeper
    sleeper.kill()
    sleeper.wait()


def _agent(store_path: Path, read_only: bool = False) -> Pipe:
    source = demo_fleet()[0]
    return Pipe(Agent(source, store_path, [], "9.9", interval_s=0.2, read_only=read_only))


def _ask(pipe: Pipe, op: str, args: object, rid: int) -> dict:
    pipe.send({"v": 2, "type": "request", "id": rid, "op": op, "args": args})
    while True:
        msg = pipe.next("response")
        if msg["id"] == rid:
            return msg


STEERING = [
    # A profile or spec sent whole (with a command in it) is not a name on this node.
    ("start_server", {"profile": {"name": "x", "model": "m", "vllm_command": ["/bin/sh", "-c", f"id > {MARKER}"]}, "gpus": [0]},
     "profile must be a non-empty string"),
    ("start_server", {"profile": "../profiles/q", "gpus": [0]}, "no profile named '../profiles/q'"),
    ("start_server", {"profile": "/etc/passwd", "gpus": [0]}, "no profile named '/etc/passwd'"),
    ("start_server", {"profile": "missing", "gpus": [0]}, "known: q"),
    ("start_server", {"profile": "q", "gpus": ["0; id"]}, "gpus must be a list of distinct GPU indices"),
    ("start_server", {"profile": "q", "gpus": [0, 0]}, "gpus must be a list of distinct GPU indices"),
    ("start_server", {"profile": "q", "gpus": [0], "port": 22}, "port must be from 1024 to 65535"),
    ("start_job", {"spec": {"name": "x", "base_model": "/", "dataset": "/etc/passwd", "adapter_root": "/tmp/evil"}},
     "spec must be a non-empty string"),
    ("start_job", {"spec": "../../../tmp/x"}, "no job spec named"),
    ("start_job", {"spec": "nope"}, "known: tickets"),
    # Ids match exactly, or as a literal unique prefix; never as a SQL pattern, never empty.
    ("stop_server", {"id": "_"}, "no server '_'"),
    ("stop_server", {"id": "%"}, "no server '%'"),
    ("stop_server", {"id": ""}, "id must be a non-empty string"),
    ("stop_server", {"id": ["q-live01"]}, "id must be a non-empty string"),
    ("tail_log", {"id": "_"}, "no server '_'"),
    ("tail_log", {"id": "q-live01", "n": -1}, "n must be a line count"),
    ("cancel_job", {"id": "%"}, "no job '%'"),
    ("list_servers", ["not", "an", "object"], "args must be a JSON object"),
]


@pytest.mark.parametrize("op,args,error", STEERING, ids=[f"{r[0]}-{i}" for i, r in enumerate(STEERING)])
def test_a_request_names_only_what_the_node_defines(node, op, args, error):
    tmp_path, store_path, sleeper = node
    pipe = _agent(store_path)
    try:
        pipe.next("hello")
        answer = _ask(pipe, op, args, 7)
        assert answer["ok"] is False and error in answer["error"], answer
        assert not Path(MARKER).exists() and not (Path("/tmp/evil")).exists()
        assert psutil.Process(sleeper.pid).is_running() and psutil.Process(sleeper.pid).status() != psutil.STATUS_ZOMBIE
        assert _ask(pipe, "ping", {}, 8)["ok"] is True  # and it still answers
    finally:
        pipe.close()


def test_names_and_exact_ids_still_work(node):
    tmp_path, store_path, sleeper = node
    pipe = _agent(store_path)
    try:
        pipe.next("hello")
        assert _ask(pipe, "tail_log", {"id": "q-live01", "n": 5}, 1)["result"].strip() == "the live server's log"
        assert _ask(pipe, "tail_log", {"id": "q-live"}, 2)["ok"] is True  # a unique literal prefix
        stopped = _ask(pipe, "stop_server", {"id": "q-live01"}, 3)
        assert stopped["ok"] is True and stopped["result"]["state"] == "stopped"
        assert sleeper.wait(timeout=10) is not None
    finally:
        pipe.close()


@pytest.mark.parametrize("op,args", [
    ("start_server", {"profile": "q", "gpus": [0]}),
    ("stop_server", {"id": "q-live01"}),
    ("start_job", {"spec": "tickets"}),
    ("cancel_job", {"id": "ft-x"}),
])
def test_a_read_only_agent_refuses_every_change(node, op, args):
    tmp_path, store_path, sleeper = node
    pipe = _agent(store_path, read_only=True)
    try:
        pipe.next("hello")
        answer = _ask(pipe, op, args, 1)
        assert answer["ok"] is False and answer["error"] == f"{op}: refused, this node's agent is read-only"
        assert sleeper.poll() is None
        assert _ask(pipe, "list_servers", {}, 2)["ok"] is True  # reading is still allowed
    finally:
        pipe.close()


WIRE = [
    # What one line can do to the agent: each gets an error and the agent keeps answering.
    ('{"v": 2, "type": "subscribe", "interval": 1e300}', None),  # clamped to the maximum, not a sleep forever
    ('{"v": 2, "type": "subscribe", "interval": "soon"}', "interval must be seconds"),
    ('{"v": 2, "type": "subscribe", "interval": NaN}', "interval must be seconds"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"v": 2, "type": "request", "id": 1, "op": ["unhashable"]}', "unknown op"),
    ('"x' + "y" * (1 << 20) + '"', "longer than"),
    # Bytes that are not UTF-8 (the agent's stdin is a strict UTF-8 text stream under LC_ALL=C.UTF-8).
    (b"\xff\xfe not utf-8", "not UTF-8 (byte 0xff at offset 0)"),
    (b'{"v": 2, "type": "request", "id": 3, "op": "ping", "operator": "\xc3("}', "not UTF-8"),
]


@pytest.mark.parametrize("line,error", WIRE, ids=["interval-huge", "interval-text", "interval-nan", "deep", "op-list", "huge-line",
                                                  "invalid-byte", "invalid-byte-in-json"])
def test_one_line_neither_crashes_nor_deafens_the_agent(node, line, error):
    tmp_path, store_path, _ = node
    agent = Agent(demo_fleet()[0], store_path, [], "9.9", interval_s=0.2)
    pipe = Pipe(agent)
    try:
        pipe.next("hello")
        if isinstance(line, bytes):
            pipe.to_agent.buffer.write(line + b"\n")
            pipe.to_agent.buffer.flush()
        else:
            pipe.send(line)
        if error is not None:
            answer = pipe.next("response")
            assert answer["ok"] is False and error in answer["error"], answer
        assert _ask(pipe, "ping", {}, 99)["ok"] is True
        assert 0.2 <= agent.interval_s <= 60.0
        assert pipe.thread.is_alive()
    finally:
        pipe.close()


def test_serve_stop_with_a_wildcard_stops_nothing(node, capsys):
    tmp_path, store_path, sleeper = node
    for ident in ("_", "%", "", "q-live01%"):
        assert main(["serve", "stop", ident, "--store", str(store_path)]) == 2
        assert "no server" in capsys.readouterr().err
    assert sleeper.poll() is None


def test_an_ambiguous_prefix_is_refused_with_the_candidates(node, capsys):
    tmp_path, store_path, sleeper = node
    store = open_store(store_path)
    other = managed.find(store, ServerRecord, "q-live01")
    assert other is not None
    other.id, other.pid = "q-live02", None
    other.save(store)
    assert main(["serve", "stop", "q-live", "--store", str(store_path)]) == 2
    err = capsys.readouterr().err
    assert "'q-live' names 2 servers" in err and "q-live01" in err and "q-live02" in err
    assert sleeper.poll() is None
