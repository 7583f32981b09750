"""The node agent: `fleetdeck agent --stdio`, run by the dashboard as `ssh -T NODE fleetdeck agent --stdio`.

It says hello (protocol version, fleetdeck version, hostname, NVML state), sends a snapshot of this
node's GPUs every interval the dashboard asks for, and answers requests with the same functions the
local host uses (servers, jobs, adapters, logs). One JSON object per line both ways; a malformed line
gets an error response, never a crash. It ends when its stdin closes (the SSH session ended).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from fleet.remote import PROTOCOL_VERSION, snapshot_to_json


class Agent:
    def __init__(self, source: Any, store_path: Path | None, adapter_roots: list[Path], version: str,
                 interval_s: float = 1.0) -> None:
        self.source = source
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
        from engine.vllm.profile import Profile

        profile = Profile.model_validate(a["profile"])
        gpus = [int(g) for g in a["gpus"]]
        snap = self.source.snapshot()
        by_index = {g.index: g for g in snap.gpus}
        snaps = [by_index[g] for g in gpus if g in by_index] if snap.nvml == "ok" else None
        if snaps is not None and len(snaps) != len(gpus):
            raise ValueError(f"no GPU {gpus} on {snap.node} (it has {sorted(by_index)})")
        rec, verdict = launcher.start(self.store, profile, gpus, gpu_snapshots=snaps, port=a.get("port"),
                                      force=bool(a.get("force")), adapter_roots=self.adapter_roots)
        return {"server": rec.to_json(), "verdict": verdict.to_json() if verdict is not None else None}

    def _stop_server(self, a: dict[str, Any]) -> Any:
        from engine.vllm import launcher

        return launcher.stop(self.store, launcher.get(self.store, a["id"])).to_json()

    def _list_jobs(self, a: dict[str, Any]) -> Any:
        from engine.finetune import jobs

        return [jobs.refresh(self.store, r).to_json() for r in jobs.list_jobs(self.store)]

    def _start_job(self, a: dict[str, Any]) -> Any:
        from engine.finetune import jobs
        from engine.finetune.spec import JobSpec

        spec = JobSpec.model_validate(a["spec"])
        gpus = [int(g) for g in a.get("gpus") or []] or None
        snap = self.source.snapshot()
        snaps = [g for g in snap.gpus if gpus and g.index in gpus] or None
        return jobs.start(self.store, spec, gpus, gpu_snapshots=snaps, force=bool(a.get("force"))).to_json()

    def _cancel_job(self, a: dict[str, Any]) -> Any:
        from engine.finetune import jobs

        return jobs.cancel(self.store, jobs.get(self.store, a["id"])).to_json()

    def _list_adapters(self, a: dict[str, Any]) -> Any:
        from engine import adapters

        found, problems = adapters.scan(self.adapter_roots)
        return {"adapters": [x.to_json() for x in found], "problems": problems}

    def _tail_log(self, a: dict[str, Any]) -> Any:
        from engine.vllm.diagnose import tail

        if a.get("kind") == "job":
            from engine.finetune import jobs

            path = jobs.get(self.store, a["id"]).log_path
        else:
            from engine.vllm import launcher

            path = launcher.get(self.store, a["id"]).log_path
        return tail(path, int(a.get("n", 60)))

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
        try:
            result = fn(msg.get("args") or {})
            self.send(out, {"type": "response", "id": rid, "ok": True, "result": result})
        except Exception as exc:  # every failure goes back to the dashboard as text
            self.send(out, {"type": "response", "id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"})

    def _read(self, inp: TextIO, out: TextIO) -> None:
        for line in inp:
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
                if not isinstance(msg, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                self.send(out, {"type": "response", "id": None, "ok": False, "error": f"malformed message: {exc}"})
                continue
            if msg.get("v") != PROTOCOL_VERSION:
                self.send(out, {"type": "response", "id": msg.get("id"), "ok": False,
                                "error": f"protocol v{msg.get('v')} not supported; this agent speaks v{PROTOCOL_VERSION}"})
                continue
            if msg.get("type") == "subscribe":
                try:
                    self.interval_s = max(0.2, float(msg.get("interval", self.interval_s)))
                except (TypeError, ValueError):
                    pass
            elif msg.get("type") == "request":
                threading.Thread(target=self._handle, args=(out, msg), daemon=True).start()
            else:
                self.send(out, {"type": "response", "id": msg.get("id"), "ok": False, "error": f"unknown type {msg.get('type')!r}"})
        self._stop.set()  # stdin closed: the SSH session is over

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
