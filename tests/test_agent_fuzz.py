"""The agent's line protocol under any input, as a node runs it: `fleetdeck agent --stdio` in its own process
with a strict UTF-8 locale (LC_ALL=C.UTF-8, PYTHONIOENCODING=utf-8:strict), fed by Hypothesis.

The property, for every line (random bytes, bytes that are not UTF-8, JSON of any shape, protocol messages
with fields of the wrong kind, lines nested deep or longer than the limit):
- the line gets a reply (an error, or the answer to a request that was well formed), unless it is blank or
  a well-formed subscription, which the protocol does not answer;
- the agent answers the valid request that follows it;
- nothing on the node changes: the agent starts no process, its store gains no server or job, and every
  audit record it writes says `refused`.

One agent process serves the whole run (that is the point: one line must not deafen it for the next).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from engine.nodes.agent import MAX_LINE
from fleet.protocol import BadMessage, Op, Request, Subscribe, parse_client

# A generous ceiling on waiting for one reply: only a safety net against a deaf agent hanging the suite.
REPLY_CEILING_S = 60.0


class AgentProcess:
    """`fleetdeck agent --stdio --simulated` in a child process; responses collected by a reader thread."""

    def __init__(self, root: Path) -> None:
        for folder in ("profiles", "config", "state", "data"):
            (root / folder).mkdir()
        env = {**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8:strict",
               "FLEETDECK_PROFILES": str(root / "profiles"), "XDG_CONFIG_HOME": str(root / "config"),
               "XDG_STATE_HOME": str(root / "state"), "XDG_DATA_HOME": str(root / "data")}
        self.store = root / "node.db"
        self.stderr = (root / "agent.err").open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "fleetdeck", "agent", "--stdio", "--simulated",
                                      "--store", str(self.store)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, env=env, cwd=root)
        self.replies: queue.Queue[dict | Exception] = queue.Queue()
        threading.Thread(target=self._collect, daemon=True).start()
        self.ids = itertools.count(-(10**18), -1)  # ping ids no generated request uses (see `assume` below)
        self.deaf_after: bytes | None = None  # the line after which it stopped answering, once it has
        self.last_line = b""

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError as exc:  # the agent wrote something that is not a protocol line
                self.replies.put(AssertionError(f"agent wrote a non-JSON line: {raw[:200]!r} ({exc})"))
                continue
            if msg.get("type") == "response":
                self.replies.put(msg)
        self.replies.put(AssertionError("the agent closed its stdout"))

    def send(self, data: bytes) -> None:
        self._check_hearing()  # writing to a deaf agent would block once its pipe is full
        self.last_line = data
        self._write(data)

    def _check_hearing(self) -> None:
        # A deaf agent stays deaf: every later example fails at once (naming the line that did it) rather
        # than each waiting out the ceiling while Hypothesis shrinks.
        if self.deaf_after is not None:
            raise AssertionError(f"the agent stopped answering after the line {self.deaf_after[:200]!r}")

    def _write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data + b"\n")
        self.proc.stdin.flush()

    def until(self, ids: set[int]) -> list[dict]:
        """Every response up to the ones carrying all of `ids`."""
        self._check_hearing()
        got: list[dict] = []
        while ids - {m["id"] for m in got}:
            try:
                msg = self.replies.get(timeout=REPLY_CEILING_S)
            except queue.Empty:
                self.deaf_after = self.last_line
                raise AssertionError(f"the agent stopped answering after the line {self.last_line[:200]!r}; "
                                     f"waiting for {ids}, got {got}") from None
            if isinstance(msg, Exception):
                raise msg
            got.append(msg)
        return got

    def ping(self) -> int:
        self._check_hearing()
        rid = next(self.ids)
        self._write(json.dumps({"v": 2, "type": "request", "id": rid, "op": "ping", "args": {}}).encode())
        return rid

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # the agent ends when its stdin closes
        try:
            self.proc.wait(timeout=REPLY_CEILING_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


# -- what a line can hold ---------------------------------------------------------------------------------
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
ARG_KEYS = ["id", "profile", "spec", "gpus", "port", "force", "server", "adapter", "name", "old", "kind", "n", "slurm"]
args = st.dictionaries(st.sampled_from(ARG_KEYS) | st.text(max_size=8), json_values, max_size=5) | json_values
messages = st.fixed_dictionaries(
    {"v": st.just(2) | json_values, "type": st.sampled_from(["request", "subscribe", "hello", "response"]) | st.text(max_size=10)},
    optional={"id": st.integers() | json_values, "op": st.sampled_from([o.value for o in Op]) | json_values, "args": args,
              "operator": st.text(max_size=40) | json_values, "interval": st.floats() | json_values})


def _encode(doc: object, ascii_only: bool) -> bytes:
    # Not ASCII-escaped, a lone surrogate in a string becomes bytes that are not UTF-8 (surrogatepass).
    return json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


json_lines = st.builds(_encode, messages | json_values, st.booleans())
mutated = st.builds(lambda line, at, junk: line[:at % (len(line) + 1)] + junk + line[at % (len(line) + 1):],
                    json_lines, st.integers(min_value=0), st.binary(min_size=1, max_size=4))
deep = st.builds(lambda depth, open_, close: open_ * depth + close * depth, st.integers(1, 200_000),
                 st.sampled_from([b"[", b'{"a":']), st.sampled_from([b"]", b"}"]))
huge = st.builds(lambda n, fill: b'"' + fill * n + b'"', st.integers(MAX_LINE - 8, MAX_LINE + 8), st.sampled_from([b"y", b"\xff", b"\xc3\xa9"]))
lines = (st.binary(max_size=300) | json_lines | mutated | deep | huge).map(lambda b: b.replace(b"\n", b" "))


def _answerless(line: bytes) -> bool:
    """What the protocol does not answer: a blank line, a well-formed subscription."""
    try:
        text = line.decode("utf-8")
        if not text.strip():
            return True
        doc = json.loads(text)
        return isinstance(doc, dict) and doc.get("v") == 2 and isinstance(parse_client(doc), Subscribe)
    except (ValueError, RecursionError, BadMessage):
        return False


def _request_id(line: bytes) -> int | None:
    """The id of a well-formed request: its answer comes from a worker thread, maybe after the next one's."""
    try:
        doc = json.loads(line.decode("utf-8"))
        if isinstance(doc, dict) and doc.get("v") == 2:
            typed = parse_client(doc)
            return typed.id if isinstance(typed, Request) else None
    except (ValueError, RecursionError, BadMessage):
        pass
    return None


def _files(root: Path) -> set[Path]:
    """What the node holds, less the audit trail's own key and checkpoint (fleetdeck/audit/): a refusal is
    recorded, and the first record makes them."""
    return {p.relative_to(root) for p in root.rglob("*")
            if p.is_file() and p.relative_to(root).parts[:2] != ("fleetdeck", "audit")}


def test_any_line_gets_a_reply_and_changes_nothing(tmp_path):
    agent = AgentProcess(tmp_path)
    try:
        agent.until({agent.ping()})
        state_before = _files(tmp_path / "state")
        used: set[int] = set()  # the request ids sent so far on this one connection

        @settings(max_examples=120, deadline=None, derandomize=False,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
        @given(line=lines)
        @example(line=b"\xff")
        @example(line=b'{"v": 2, "type": "request", "id": 1, "op": "start_server", "args": {"profile": "q\xff", "gpus": [0]}}')
        @example(line=b'{"v": 2, "type": "request", "id": 2, "op": "stop_server", "args": {"id": "%"}, "operator": "\xed\xa0\x80"}')
        @example(line=b'{"v": 2, "type": "request", "id": 3, "op": "start_job", "args": {"spec": "../../etc/passwd"}}')
        @example(line=b'{"v": 2, "type": "request", "id": 3, "op": "cancel_job", "args": {"id": "x"}}')  # id 3 again
        @example(line=b"[" * 100_000)
        def check(line: bytes) -> None:
            rid = _request_id(line)
            assume(rid is None or rid > -(10**17))  # never one of the pings' ids
            # An id used by an earlier example is refused with an id-less line (engine/nodes/agent.py): wait for that.
            reused = rid is not None and rid in used
            if rid is not None:
                used.add(rid)
            agent.send(line)
            ping = agent.ping()
            got = agent.until({ping} | ({None} if reused else {rid} if rid is not None else set()))
            replies = [m for m in got if m["id"] != ping]
            assert all(m["ok"] is False or m["id"] == rid for m in replies), replies
            assert not reused or any("already used" in (m["error"] or "") for m in replies), replies
            if not _answerless(line):
                assert replies, f"no reply to {line[:200]!r}"
            assert not psutil.Process(agent.proc.pid).children(recursive=True), "the agent started a process"

        check()
        agent.until({agent.ping()})  # still answering after the whole run
    finally:
        agent.close()
    err = (tmp_path / "agent.err").read_text(errors="replace")
    assert "Traceback" not in err, err
    assert _files(tmp_path / "state") == state_before  # no job or server folder made
    if agent.store.exists():
        db = sqlite3.connect(f"file:{agent.store}?mode=ro", uri=True)
        try:
            assert db.execute("SELECT COUNT(*) FROM managed").fetchone()[0] == 0
            outcomes = {row[0] for row in db.execute("SELECT outcome FROM audit")}
            assert outcomes <= {"refused"}, outcomes
        finally:
            db.close()


@pytest.mark.parametrize("bad", [b"\xff", b"\xc3", b"\xed\xa0\x80", b'{"v": 2, "type": "request", "id": 9, "op": "ping\xfe"}'])
def test_one_invalid_byte_gets_an_error_and_the_agent_keeps_answering(tmp_path, bad):
    agent = AgentProcess(tmp_path)
    try:
        agent.send(bad)
        ping = agent.ping()
        got = agent.until({ping})
        errors = [m for m in got if m["id"] != ping]
        assert len(errors) == 1 and errors[0]["ok"] is False and "not UTF-8" in errors[0]["error"], got
        assert next(m for m in got if m["id"] == ping)["ok"] is True
    finally:
        agent.close()
    assert agent.proc.returncode == 0  # stdin closed: the agent ended by itself
