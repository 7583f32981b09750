"""A request id names one request of a session: the agent runs a request whose id was used before on the
same connection never again (a change sent twice must not happen twice), and answers it with one error line
that names the id and carries no id of its own (under the reused id it would read as the first one's answer).
The dashboard's side counts its ids up, so it never sends one twice, across reconnects too.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.audit import trail as audit
from engine.nodes import agent as agent_module
from engine.nodes.agent import Agent
from fleet.remote import RemoteNode
from fleet.simulated import demo_fleet
from store.db import open_store
from tests.helpers import WAIT_CEILING_S, Pipe, wait_for

PY = sys.executable
OPS = ["ping", "list_servers", "stop_server", "cancel_job"]


def _recording_agent(tmp_path: Path) -> tuple[Agent, list[tuple[str, str]]]:
    """An agent whose handlers for OPS only record that they ran (and with which target)."""
    agent = Agent(demo_fleet()[0], tmp_path / "node.db", [], "9.9", interval_s=0.5)
    ran: list[tuple[str, str]] = []
    lock = threading.Lock()

    def recorder(op: str):
        def handle(a: object) -> object:
            with lock:
                ran.append((op, getattr(a, "id", "")))
            if op == "ping":
                return {"pong": 0.0}
            if op == "list_servers":
                return []
            raise LookupError(f"no such thing {getattr(a, 'id', '')!r}")  # a change that names nothing: refused
        return handle

    for op in OPS:
        agent.ops[op] = recorder(op)
    return agent, ran


requests = st.lists(st.tuples(st.integers(-3, 5), st.sampled_from(OPS), st.sampled_from(["a", "b", "c"])),
                    min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(reqs=requests)
def test_each_request_id_runs_once_and_a_reused_one_gets_one_line_naming_it(tmp_path_factory, reqs):
    agent, ran = _recording_agent(tmp_path_factory.mktemp("ids"))
    pipe = Pipe(agent)
    try:
        pipe.next("hello")
        for rid, op, target in reqs:
            args = {"id": target} if op in ("stop_server", "cancel_job") else {}
            pipe.send({"v": 2, "type": "request", "id": rid, "op": op, "args": args})
        answers = [pipe.next("response") for _ in reqs]  # one line for each request, no more, no fewer
        pipe.send({"v": 2, "type": "request", "id": 10**6, "op": "ping"})
        assert pipe.next("response")["id"] == 10**6  # still answering
    finally:
        pipe.close()
    first: dict[int, tuple[str, str]] = {}
    for rid, op, target in reqs:
        first.setdefault(rid, (op, target if op in ("stop_server", "cancel_job") else ""))
    answered = sorted(a["id"] for a in answers if a["id"] is not None)
    assert answered == sorted(first), answers  # every id answered under its own id exactly once
    refused = [a for a in answers if a["id"] is None]
    assert len(refused) == len(reqs) - len(first)
    reused = sorted(rid for i, (rid, _, _) in enumerate(reqs) if rid in {r for r, _, _ in reqs[:i]})
    assert sorted(int(a["error"].split("request id ")[1].split()[0]) for a in refused) == reused
    assert all(a["ok"] is False and "was already used on this connection" in a["error"] and "\n" not in a["error"]
               for a in refused)
    assert sorted(ran) == sorted([*first.values(), ("ping", "")])  # the first of each id ran, once; the last ping too


def test_a_reused_id_for_a_change_is_recorded_as_refused_and_names_the_id(tmp_path):
    db = tmp_path / "node.db"
    with audit.session(db, "agent"):
        agent, ran = _recording_agent(tmp_path)
        pipe = Pipe(agent)
        try:
            pipe.next("hello")
            for target in ("first", "second"):
                pipe.send({"v": 2, "type": "request", "id": 7, "op": "stop_server", "args": {"id": target},
                           "operator": "eve@dash"})
            answers = [pipe.next("response"), pipe.next("response")]
        finally:
            pipe.close()
    assert ran == [("stop_server", "first")]  # the second was never run, whatever it named
    (dup,) = [a for a in answers if a["id"] is None]
    assert dup["error"].startswith("stop_server: request id 7 was already used on this connection"), dup
    records = audit.query(open_store(db))
    refusal = next(r for r in records if "already used" in (r["reason"] or ""))
    assert refusal["action"] == "server.stop" and refusal["outcome"] == "refused" and refusal["target"] == "second"


def test_past_the_window_an_old_id_is_still_refused_and_memory_stays_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(agent_module, "ID_WINDOW", 4)
    agent, ran = _recording_agent(tmp_path)
    pipe = Pipe(agent)
    try:
        pipe.next("hello")
        for rid in range(1, 9):
            pipe.send({"v": 2, "type": "request", "id": rid, "op": "ping"})
        assert sorted(pipe.next("response")["id"] for _ in range(8)) == list(range(1, 9))
        for rid in (1, 4, 8):  # forgotten (below the floor), forgotten, remembered: all refused
            pipe.send({"v": 2, "type": "request", "id": rid, "op": "ping"})
            answer = pipe.next("response")
            assert answer["id"] is None and f"request id {rid} " in answer["error"], answer
        pipe.send({"v": 2, "type": "request", "id": 9, "op": "ping"})
        assert pipe.next("response")["id"] == 9
    finally:
        pipe.close()
    assert len(ran) == 9 and len(agent._ids_seen) <= 4


# -- the dashboard's side ---------------------------------------------------------------------------------
# An agent that writes each request's id to a file and answers it; it ends after `n` requests, so the
# dashboard reconnects (to a new agent process, as after a dropped SSH session).
RECORDING_AGENT = """
import json, sys
log, n = sys.argv[1], int(sys.argv[2])
print(json.dumps({"v": 2, "type": "hello", "fleetdeck": "9.9", "node": "n"}), flush=True)
print(json.dumps({"v": 2, "type": "snapshot", "snapshot": {"node": "n", "taken_at": 0, "nvml": "ok", "gpus": []}}), flush=True)
seen = 0
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("type") != "request":
        continue
    with open(log, "a") as f:
        f.write(f"{msg['id']}\\n")
    print(json.dumps({"v": 2, "type": "response", "id": msg["id"], "ok": True, "result": {"pong": 0.0}}), flush=True)
    seen += 1
    if seen >= n:
        break
"""


def test_the_dashboard_never_sends_an_id_twice_across_threads_and_reconnects(tmp_path):
    log = tmp_path / "ids"
    script = tmp_path / "agent.py"
    script.write_text(RECORDING_AGENT)
    node = RemoteNode("n", [PY, str(script), str(log), "25"], interval_s=0.5, backoff_s=(0.05, 0.1),
                      hello_timeout_s=WAIT_CEILING_S)
    done: list[int] = []

    def ask_some() -> None:
        for _ in range(10):
            while True:  # a request sent as the agent ended fails ("connection lost"): ask again
                try:
                    node.request("ping", timeout=WAIT_CEILING_S)
                    done.append(1)
                    break
                except Exception:
                    assert wait_for(lambda: node.link.status == "connected")
    try:
        assert wait_for(lambda: node.link.status == "connected"), node.link.error
        threads = [threading.Thread(target=ask_some) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_CEILING_S)
    finally:
        node.close()
    assert len(done) == 60
    sent = [int(x) for x in log.read_text().split()]
    assert len(sent) >= 60 and len(set(sent)) == len(sent)  # three agents at least, no id twice
    assert sent == sorted(sent)  # and in the order they were counted, so an agent's window never refuses one
