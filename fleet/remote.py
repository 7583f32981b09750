"""Remote nodes over SSH: `ssh -T NODE fleetdeck agent --stdio`, JSON lines both ways.

No port is opened on any node: the system's OpenSSH client does the connecting (so ~/.ssh/config,
jump hosts and keys all work) and the agent speaks on its stdin/stdout. The agent says hello
(protocol version, fleetdeck version, hostname, NVML state), then sends a snapshot every interval and
answers requests. A node that drops is retried with exponential backoff; `snapshot()` never blocks,
it returns the last snapshot or a "not connected" one with the error and when the node was last seen.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

from fleet.model import GpuProcess, GpuSnapshot, HostInfo, MigDevice, NodeSnapshot
from fleet.procs import stop_child
from fleet.protocol import (PROTOCOL_VERSION, BadMessage, Hello, Op, Request, Response, Snapshot, Subscribe, parse_agent,
                            version_problem)

# The protocol's version, operations and messages live in fleet/protocol.py (Op and PROTOCOL_VERSION are
# imported from here too, by older callers).


def _operator() -> str:
    """Who is asking, for the node's audit trail: this dashboard's user@host."""
    import getpass
    import os
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


OPERATOR = _operator()
DEFAULT_AGENT = ["fleetdeck", "agent", "--stdio"]  # a node whose PATH has fleetdeck needs no agent_command
# An agent's answer is at most a few megabytes (a log tail, every job's recent steps); a longer line is not
# an agent's, and is dropped rather than held whole in memory.
MAX_AGENT_LINE = 64 << 20


class AgentError(Exception):
    """A request to a remote agent failed; the message says where and why."""


def snapshot_to_json(snap: NodeSnapshot) -> dict[str, Any]:
    return snap.to_json()


def snapshot_from_json(d: dict[str, Any]) -> NodeSnapshot:
    gpus = []
    for g in d.get("gpus", []):
        g = dict(g)
        g["processes"] = [GpuProcess(**p) for p in g.get("processes", [])]
        g["mig_devices"] = [MigDevice(**m) for m in g.get("mig_devices", [])]
        gpus.append(GpuSnapshot(**g))
    host_doc = dict(d["host"]) if d.get("host") else {}
    if host_doc.get("load_avg") is not None:  # JSON has no tuples: the three averages come back as a list
        host_doc["load_avg"] = tuple(host_doc["load_avg"])
    host = HostInfo(**host_doc)
    fields = {k: d[k] for k in ("node", "taken_at", "nvml")}  # a snapshot without these is malformed
    fields.update({k: d.get(k) for k in ("reason", "driver_version", "cuda_driver_version")})
    return NodeSnapshot(**fields, simulated=bool(d.get("simulated")), gpus=gpus, host=host)


@dataclass
class LinkState:
    status: str = "connecting"  # connecting | connected | unreachable | incompatible
    error: str | None = None
    since: float = 0.0
    last_seen: float | None = None
    agent_version: str | None = None
    agent_protocol: int | None = None  # the `v` of the agent's hello (also when it is not ours)
    bad_messages: int = 0


def ssh_command(dest: str, ssh_options: list[str] | None, remote: list[str]) -> list[str]:
    """The system OpenSSH reaching a node as the fleet config says (aliases, jump hosts, keys in its own
    config), running `remote` there. BatchMode: never hang on a password prompt; the error says what to fix.
    ssh hands the command to the remote shell as one string, so each argument is quoted to arrive intact."""
    import shlex

    return ["ssh", "-T", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=10", "-o", "ConnectTimeout=10",
            *(ssh_options or []), dest, "--", *(shlex.quote(a) for a in remote)]


class RemoteNode:
    """A NodeSource for a node reached through `ssh -T DEST fleetdeck agent --stdio`."""

    simulated = False

    def __init__(self, name: str, command: list[str], interval_s: float = 1.0, hello_timeout_s: float = 20.0,
                 backoff_s: tuple[float, float] = (1.0, 60.0), clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.command = command
        self.interval_s = interval_s
        self.hello_timeout_s = hello_timeout_s
        self.backoff_min, self.backoff_max = backoff_s
        self._clock = clock
        self.link = LinkState(since=clock())
        self._latest: NodeSnapshot | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._pending: dict[int, Future[Any]] = {}
        # Request ids count up for the life of this object, across reconnects: an agent refuses an id it has seen
        # (engine/nodes/agent.py), so none is ever sent twice. Taken and written under one lock, so they also
        # reach the agent in the order they were counted (and one request's line never interleaves another's).
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"remote-{name}", daemon=True)
        self._thread.start()

    @classmethod
    def over_ssh(cls, name: str, dest: str, ssh_options: list[str] | None = None,
                 agent_command: list[str] | None = None, read_only: bool = False, **kw: Any) -> "RemoteNode":
        # read_only: a read-only dashboard or command asks for a read-only agent, whose listings then record nothing
        # in the node's store either (a node whose authorized_keys forces the agent's command runs that instead).
        agent = [*(agent_command or DEFAULT_AGENT), *(["--read-only"] if read_only else [])]
        return cls(name, ssh_command(dest, ssh_options, agent), **kw)

    # -- the source interface -------------------------------------------------------------------
    def snapshot(self) -> NodeSnapshot:
        with self._lock:
            link = self.link
            latest = self._latest
        if link.status == "connected" and latest is not None:
            latest.link = "connected"
            return latest
        seen = time.strftime("%H:%M", time.localtime(link.last_seen)) if link.last_seen else "never"
        since = time.strftime("%H:%M", time.localtime(link.since))
        if link.status == "connecting":
            reason = f"connecting over SSH (last seen {seen})"
        elif link.status == "incompatible":
            reason = link.error or "agent protocol mismatch"
        else:
            reason = f"unreachable since {since} (last seen {seen}): {link.error}"
        # Keep the GPUs on screen, marked stale, rather than letting them vanish.
        stale = [replace(g, error=f"stale: node {link.status}") for g in latest.gpus] if latest is not None else []
        snap = NodeSnapshot(node=self.name, taken_at=self._clock(), nvml="unavailable", reason=reason, gpus=stale,
                            link=link.status)
        snap.simulated = latest.simulated if latest is not None else False
        return snap

    def close(self) -> None:
        self._stop.set()
        if self._proc is not None:
            stop_child(self._proc)

    # -- requests -------------------------------------------------------------------------------
    def request(self, op: Op | str, args: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
        op = Op(op).value  # an operation the protocol does not have is a bug here, not a request to send
        with self._lock:
            proc = self._proc
            connected = self.link.status == "connected"
        if proc is None or proc.stdin is None or not connected:
            raise AgentError(f"{self.name}: not connected ({self.link.error or self.link.status})")
        fut: Future[Any] = Future()
        rid: int | None = None
        try:
            with self._send_lock:
                rid = next(self._ids)
                self._pending[rid] = fut
                proc.stdin.write(Request(id=rid, op=Op(op), args=args or {}, operator=OPERATOR).line().encode())
                proc.stdin.flush()
            return fut.result(timeout=timeout)
        except TimeoutError as exc:
            raise AgentError(f"{self.name}: no answer to {op} within {timeout:g} s") from exc
        except (BrokenPipeError, OSError) as exc:
            raise AgentError(f"{self.name}: connection lost while sending {op}: {exc}") from exc
        finally:
            if rid is not None:
                self._pending.pop(rid, None)

    # -- the connection loop --------------------------------------------------------------------
    def _set(self, status: str, error: str | None = None) -> None:
        with self._lock:
            if status != self.link.status:
                self.link.since = self._clock()
            self.link.status = status
            self.link.error = error

    def _run(self) -> None:
        backoff = self.backoff_min
        while not self._stop.is_set():
            self._set("connecting", self.link.error)
            started = self._clock()
            error = self._session()
            if self._stop.is_set():
                return
            if self.link.status != "incompatible":
                self._set("unreachable", error)
            for fut in list(self._pending.values()):
                try:
                    fut.set_exception(AgentError(f"{self.name}: connection lost ({error})"))
                except InvalidStateError:
                    pass  # answered (or given up on) in the meantime: nothing to fail
            # A session that lasted a while resets the backoff; a failing one doubles it.
            backoff = self.backoff_min if self._clock() - started > 30 else min(self.backoff_max, backoff * 2)
            self._stop.wait(backoff)

    def _session(self) -> str:
        try:
            # Bytes, decoded a line at a time: a byte that is not UTF-8 (a login script's banner in latin-1, an
            # agent gone wrong) is one bad line, not an exception that would end this thread for good.
            proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            return f"cannot run {self.command[0]}: {exc}"
        self._proc = proc
        self._hello_missed = False
        bad_hello: str | None = None  # why a hello that came did not count, for the error when none does
        stderr_tail: list[str] = []
        threading.Thread(target=self._drain_stderr, args=(proc, stderr_tail), daemon=True).start()
        watchdog = threading.Timer(self.hello_timeout_s, self._hello_timeout, args=(proc,))
        watchdog.start()
        try:
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(Subscribe(interval=self.interval_s).line().encode())
                proc.stdin.flush()
            except OSError:
                pass  # ssh already gone (a refused connection): its stdout ends and its stderr says why
            hello = False
            for line in _lines(proc.stdout):
                if self._stop.is_set():
                    break
                try:
                    if line is None:
                        raise ValueError(f"longer than {MAX_AGENT_LINE} bytes")
                    msg = json.loads(line)  # bytes: json decodes UTF-8 itself, strictly
                    if not isinstance(msg, dict):
                        raise ValueError("not an object")
                except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
                    self.link.bad_messages += 1
                    continue
                if msg.get("type") == "hello" and version_problem(msg) is not None:
                    watchdog.cancel()
                    with self._lock:  # what the other side runs, for `nodes ls` and its upgrade hint
                        self.link.agent_version = msg["fleetdeck"] if isinstance(msg.get("fleetdeck"), str) else None
                        self.link.agent_protocol = msg["v"] if isinstance(msg.get("v"), int) else None
                    self._set("incompatible", f"agent on {self.name} speaks protocol v{msg.get('v')!r}, this dashboard "
                                              f"v{PROTOCOL_VERSION}: install the same fleetdeck version on both "
                                              f"(fleetdeck nodes install {self.name} --bundle DIR)")
                    proc.terminate()
                    break
                try:
                    typed = parse_agent(msg)
                except BadMessage as exc:
                    self.link.bad_messages += 1
                    if msg.get("type") == "hello" and not hello:
                        bad_hello = str(exc)
                    continue
                if isinstance(typed, Hello):
                    hello = True
                    watchdog.cancel()
                    with self._lock:
                        self.link.agent_version = typed.fleetdeck
                        self.link.agent_protocol = typed.v
                        self.link.last_seen = self._clock()
                    self._set("connected")
                elif not hello:
                    self.link.bad_messages += 1  # out of order: nothing counts before the hello
                elif isinstance(typed, Snapshot):
                    try:
                        snap = snapshot_from_json(typed.snapshot)
                    except (KeyError, TypeError, ValueError):
                        self.link.bad_messages += 1
                        continue
                    snap.node = self.name
                    for g in snap.gpus:
                        g.node = self.name
                    with self._lock:
                        self._latest = snap
                        self.link.last_seen = self._clock()
                elif isinstance(typed, Response):
                    fut = self._pending.get(typed.id) if typed.id is not None else None
                    if fut is None or fut.done():
                        self.link.bad_messages += 1  # an answer to nothing we asked
                        continue
                    try:
                        if typed.ok:
                            fut.set_result(typed.result)
                        else:
                            fut.set_exception(AgentError(f"{self.name}: {typed.error}"))
                    except InvalidStateError:
                        self.link.bad_messages += 1  # the request timed out as the answer came
        finally:
            watchdog.cancel()
            code = stop_child(proc)
        tail = " ".join(stderr_tail[-3:]).strip()
        if self.link.status == "incompatible":
            return self.link.error or "incompatible"
        if self._hello_missed:
            why = f"; its hello did not fit the protocol ({bad_hello})" if bad_hello else ""
            return f"no hello from the agent within {self.hello_timeout_s:g} s{why}" + (f" ({tail})" if tail else "")
        return tail or f"the agent exited with code {code}"

    def _hello_timeout(self, proc: subprocess.Popen[bytes]) -> None:
        self._hello_missed = True
        proc.terminate()

    @staticmethod
    def _drain_stderr(proc: subprocess.Popen[bytes], tail: list[str]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            tail.append(raw.decode("utf-8", "backslashreplace").strip())  # ssh's or a shell's words, any bytes
            del tail[:-10]


def _lines(stream: Any) -> Iterator[bytes | None]:
    """A binary stream's lines, each at most MAX_AGENT_LINE bytes; None for a longer one (its rest is read
    and dropped). Ends at EOF."""
    while True:
        line = stream.readline(MAX_AGENT_LINE + 1)
        if not line:
            return
        if len(line) > MAX_AGENT_LINE:
            while line and not line.endswith(b"\n"):
                line = stream.readline(MAX_AGENT_LINE)
            yield None
            continue
        yield line
