"""The node agent: `fleetdeck agent --stdio`, run by the dashboard as `ssh -T NODE fleetdeck agent --stdio`.

It says hello (protocol version, fleetdeck version, hostname, NVML state), sends a snapshot of this
node's GPUs every interval the dashboard asks for, and answers requests with the same functions the
local host uses (servers, jobs, adapters, logs). One JSON object per line both ways; a malformed line
gets an error response, never a crash. It ends when its stdin closes (the SSH session ended).

A request is input, never a command: it names profiles and job specs that this node's own folders hold,
servers and jobs this node's store knows, by exact id, and GPUs by index. Nothing in a request is run or
written as a path. An agent started read-only (`--read-only`, or `read_only = true` in this node's fleet
config) refuses every request that changes the node.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from engine import audit
from fleet.remote import PROTOCOL_VERSION, snapshot_to_json


# Requests that change the node, and the audit action each is: an agent started read-only refuses them.
MUTATING_OPS = {"start_server": "server.start", "stop_server": "server.stop", "start_job": "job.start",
                "cancel_job": "job.cancel"}


class BadRequest(ValueError):
    """A request that names nothing this node defines, or carries a value of the wrong kind."""


def _target(args: dict[str, Any]) -> str:
    for key in ("id", "profile", "spec"):
        if isinstance(args.get(key), str):
            return str(args[key])[:100]
    return "?"
MAX_LINE = 1 << 20  # a request is a few hundred bytes; a megabyte is a mistake or an attack
MIN_INTERVAL_S, MAX_INTERVAL_S = 0.2, 60.0


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{what} must be a non-empty string, got {value!r}")
    return value


def _gpu_indices(value: object, required: bool) -> list[int]:
    if value is None and not required:
        return []
    if (not isinstance(value, list) or not value or len(value) > 64
            or not all(isinstance(g, int) and not isinstance(g, bool) and 0 <= g < 1024 for g in value)
            or len(set(value)) != len(value)):
        raise BadRequest(f"gpus must be a list of distinct GPU indices, got {value!r}")
    return list(value)


def _port(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1024 <= value <= 65535:
        raise BadRequest(f"port must be from 1024 to 65535, got {value!r}")
    return value


class Agent:
    def __init__(self, source: Any, store_path: Path | None, adapter_roots: list[Path], version: str,
                 interval_s: float = 1.0, read_only: bool = False) -> None:
        self.source = source
        self.read_only = read_only
        self.store_path = store_path
        self.adapter_roots = adapter_roots
        self.version = version
        self.interval_s = interval_s
        self._store: Any = None
        self._out_lock = threading.Lock()
        self._stop = threading.Event()
        self.ops: dict[str, Callable[[dict[str, Any]], Any]] = {
            "ping": lambda a: {"pong": time.time()},
            "list_servers": self._list_servers, "start_server": self._start_server, "stop_server": self._stop_server,
            "list_jobs": self._list_jobs, "start_job": self._start_job, "cancel_job": self._cancel_job,
            "list_adapters": self._list_adapters, "tail_log": self._tail_log,
        }

    @property
    def store(self) -> Any:
        if self._store is None:
            from store.db import open_store
            from store.paths import default_store_path

            self._store = open_store(self.store_path or default_store_path())
        return self._store

    # -- ops ------------------------------------------------------------------------------------
    def _list_servers(self, a: dict[str, Any]) -> Any:
        from engine.vllm import launcher

        return [launcher.refresh(self.store, r).to_json() for r in launcher.list_servers(self.store)]

    def _start_server(self, a: dict[str, Any]) -> Any:
        from engine.vllm import launcher
        from engine.vllm.profile import load_profile, profile_roots
        from fleet.config import toml_by_name

        try:
            profile = load_profile(toml_by_name("profile", a.get("profile"), profile_roots()))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        gpus = _gpu_indices(a.get("gpus"), required=True)
        snap = self.source.snapshot()
        by_index = {g.index: g for g in snap.gpus}
        snaps = [by_index[g] for g in gpus if g in by_index] if snap.nvml == "ok" else None
        if snaps is not None and len(snaps) != len(gpus):
            raise ValueError(f"no GPU {gpus} on {snap.node} (it has {sorted(by_index)})")
        rec, verdict = launcher.start(self.store, profile, gpus, gpu_snapshots=snaps, port=_port(a.get("port")),
                                      force=a.get("force") is True, adapter_roots=self.adapter_roots)
        return {"server": rec.to_json(), "verdict": verdict.to_json() if verdict is not None else None}

    def _stop_server(self, a: dict[str, Any]) -> Any:
        from engine.vllm import launcher

        return launcher.stop(self.store, launcher.get(self.store, _text(a.get("id"), "id"))).to_json()

    def _list_jobs(self, a: dict[str, Any]) -> Any:
        from engine.finetune import jobs

        return [jobs.refresh(self.store, r).to_json() for r in jobs.list_jobs(self.store)]

    def _start_job(self, a: dict[str, Any]) -> Any:
        from engine.finetune import jobs
        from engine.finetune.spec import load_spec, spec_roots
        from fleet.config import toml_by_name

        try:
            spec = load_spec(toml_by_name("job spec", a.get("spec"), spec_roots()))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        gpus = _gpu_indices(a.get("gpus"), required=False) or None
        snap = self.source.snapshot()
        snaps = [g for g in snap.gpus if gpus and g.index in gpus] or None
        return jobs.start(self.store, spec, gpus, gpu_snapshots=snaps, force=a.get("force") is True).to_json()

    def _cancel_job(self, a: dict[str, Any]) -> Any:
        from engine.finetune import jobs

        return jobs.cancel(self.store, jobs.get(self.store, _text(a.get("id"), "id"))).to_json()

    def _list_adapters(self, a: dict[str, Any]) -> Any:
        from engine import adapters

        found, problems = adapters.scan(self.adapter_roots)
        return {"adapters": [x.to_json() for x in found], "problems": problems}

    def _tail_log(self, a: dict[str, Any]) -> Any:
        from engine.vllm.diagnose import tail

        if a.get("kind") == "job":
            from engine.finetune import jobs

            path = jobs.get(self.store, _text(a.get("id"), "id")).log_path
        else:
            from engine.vllm import launcher

            path = launcher.get(self.store, _text(a.get("id"), "id")).log_path
        n = a.get("n", 60)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10_000:
            raise BadRequest(f"n must be a line count from 1 to 10000, got {n!r}")
        return tail(path, n)

    # -- the wire -------------------------------------------------------------------------------
    def send(self, out: TextIO, msg: dict[str, Any]) -> None:
        line = json.dumps({"v": PROTOCOL_VERSION, **msg}, default=str)
        with self._out_lock:
            out.write(line + "\n")
            out.flush()

    def _handle(self, out: TextIO, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        op = msg.get("op")
        fn = self.ops.get(str(op))
        if fn is None:
            self.send(out, {"type": "response", "id": rid, "ok": False, "error": f"unknown op {op!r}; known: {sorted(self.ops)}"})
            return
        args = msg.get("args") or {}
        if not isinstance(args, dict):
            self.send(out, {"type": "response", "id": rid, "ok": False, "error": "args must be a JSON object"})
            return
        action = MUTATING_OPS.get(str(op))
        operator = msg.get("operator")
        behalf = {"source": "agent", "on_behalf_of": operator if isinstance(operator, str) else None}
        with audit.on_behalf_of(behalf):
            if self.read_only and action is not None:
                error = f"{op}: refused, this node's agent is read-only"
                audit.record(action, _target(args), "refused", "this node's agent is read-only")
                self.send(out, {"type": "response", "id": rid, "ok": False, "error": error})
                return
            try:
                result = fn(args)
                self.send(out, {"type": "response", "id": rid, "ok": True, "result": result})
            except Exception as exc:  # every failure goes back to the dashboard as text
                if action is not None and isinstance(exc, BadRequest):
                    audit.record(action, _target(args), "refused", str(exc))  # the engine never saw it
                self.send(out, {"type": "response", "id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"})

    def _read(self, inp: TextIO, out: TextIO) -> None:
        while True:
            line = inp.readline(MAX_LINE + 1)
            if not line:
                break
            if len(line) > MAX_LINE:
                while line and not line.endswith("\n"):  # drop the rest of the oversized line
                    line = inp.readline(MAX_LINE)
                self.send(out, {"type": "response", "id": None, "ok": False,
                                "error": f"malformed message: longer than {MAX_LINE} characters"})
                continue
            try:
                self._take(line, out)
            except (BrokenPipeError, OSError):
                break
            except Exception as exc:  # one bad line never deafens the agent
                self.send(out, {"type": "response", "id": None, "ok": False, "error": f"malformed message: {type(exc).__name__}"})
        self._stop.set()  # stdin closed: the SSH session is over

    def _take(self, line: str, out: TextIO) -> None:
        if not line.strip():
            return
        try:
            msg = json.loads(line)
            if not isinstance(msg, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError) as exc:
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            self.send(out, {"type": "response", "id": None, "ok": False, "error": f"malformed message: {why}"})
            return
        if msg.get("v") != PROTOCOL_VERSION:
            self.send(out, {"type": "response", "id": msg.get("id"), "ok": False,
                            "error": f"protocol v{msg.get('v')} not supported; this agent speaks v{PROTOCOL_VERSION}"})
            return
        if msg.get("type") == "subscribe":
            interval = msg.get("interval", self.interval_s)
            if isinstance(interval, (int, float)) and not isinstance(interval, bool) and math.isfinite(interval):
                self.interval_s = min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, float(interval)))
            else:
                self.send(out, {"type": "response", "id": msg.get("id"), "ok": False,
                                "error": f"interval must be seconds from {MIN_INTERVAL_S} to {MAX_INTERVAL_S}, got {interval!r}"})
        elif msg.get("type") == "request":
            threading.Thread(target=self._handle, args=(out, msg), daemon=True).start()
        else:
            self.send(out, {"type": "response", "id": msg.get("id"), "ok": False, "error": f"unknown type {msg.get('type')!r}"})

    def serve(self, inp: TextIO, out: TextIO) -> int:
        first = self.source.snapshot()
        self.send(out, {"type": "hello", "fleetdeck": self.version, "host": socket.gethostname(), "node": first.node,
                        "nvml": first.nvml, "reason": first.reason})
        threading.Thread(target=self._read, args=(inp, out), daemon=True).start()
        snap = first
        while not self._stop.is_set():
            try:
                self.send(out, {"type": "snapshot", "snapshot": snapshot_to_json(snap)})
            except (BrokenPipeError, OSError):
                return 0
            self._stop.wait(self.interval_s)
            if not self._stop.is_set():
                snap = self.source.snapshot()
        return 0
