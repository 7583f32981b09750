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

import io
import json
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, TextIO

from engine.audit import trail as audit
from engine.vllm.command import LaunchError
from fleet.protocol import (MAX_INTERVAL_S, MIN_INTERVAL_S, PROTOCOL_VERSION, BadMessage, Hello, Op, Request, Response,
                            Snapshot, Subscribe, parse_client)
from fleet.remote import snapshot_to_json

if TYPE_CHECKING:
    from store.db import Store


# Requests that change the node, and the audit action each is: an agent started read-only refuses them.
MUTATING_OPS = {Op.START_SERVER.value: "server.start", Op.STOP_SERVER.value: "server.stop",
                Op.START_JOB.value: "job.start", Op.CANCEL_JOB.value: "job.cancel", Op.RESUME_JOB.value: "job.resume",
                Op.LOAD_ADAPTER.value: "adapter.load", Op.UNLOAD_ADAPTER.value: "adapter.unload",
                Op.SWAP_ADAPTER.value: "adapter.swap"}


class BadRequest(ValueError):
    """A request that names nothing this node defines, or carries a value of the wrong kind."""


def _target(args: dict[str, Any]) -> str:
    for key in ("id", "profile", "spec", "adapter", "name"):
        if isinstance(args.get(key), str):
            return str(args[key])  # stored escaped and cut where it must be (engine/audit/text.py)
    return "?"


# A request's argument names, as the audit action's parameter names (the rest are not recorded).
_PARAM_OF = {Op.STOP_SERVER.value: {"id": "server"}, Op.CANCEL_JOB.value: {"id": "job"},
             Op.RESUME_JOB.value: {"id": "job"}}


def _params(op: str, args: dict[str, Any]) -> dict[str, Any]:
    names = _PARAM_OF.get(op, {})
    return {names.get(k, k): (v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v))
            for k, v in args.items()}


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, BadRequest) else f"{type(exc).__name__}: {exc}"


MAX_LINE = 1 << 20  # a request is a few hundred bytes; a megabyte is a mistake or an attack
MAX_ERROR = 2000  # characters of an error reply


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
                 interval_s: float = 1.0, read_only: bool = False, slurm: Any = None,
                 model_roots: list[Path] | None = None) -> None:
        self.source = source
        self.model_roots = model_roots  # None: the node's fleet config's [models] roots
        self.slurm = slurm  # the node's own [slurm] settings: a login node submits for the dashboard
        self.read_only = read_only
        self.store_path = store_path
        self.adapter_roots = adapter_roots
        self.version = version
        self.interval_s = interval_s
        self._store: Store = None
        self._out_lock = threading.Lock()
        self._stop = threading.Event()
        self._scrapes: dict[str, Any] = {}  # each server's previous /metrics scrape, for rates
        handlers: dict[Op, Callable[[dict[str, Any]], Any]] = {
            Op.PING: lambda a: {"pong": time.time()},
            Op.LIST_SERVERS: self._list_servers, Op.START_SERVER: self._start_server, Op.STOP_SERVER: self._stop_server,
            Op.LIST_JOBS: self._list_jobs, Op.START_JOB: self._start_job, Op.CANCEL_JOB: self._cancel_job,
            Op.RESUME_JOB: self._resume_job,
            Op.LIST_ADAPTERS: self._list_adapters, Op.LIST_PROFILES: self._list_profiles, Op.TAIL_LOG: self._tail_log,
            Op.LOAD_ADAPTER: self._load_adapter, Op.UNLOAD_ADAPTER: self._unload_adapter, Op.SWAP_ADAPTER: self._swap_adapter,
            Op.SLURM_VIEW: self._slurm_view, Op.LIST_MODELS: self._list_models,
        }
        if set(handlers) != set(Op):
            raise RuntimeError(f"agent has no handler for {sorted(set(Op) - set(handlers))}")
        self.ops: dict[str, Callable[[dict[str, Any]], Any]] = {op.value: fn for op, fn in handlers.items()}

    @property
    def store(self) -> Any:
        if self._store is None:
            from store.db import open_store
            from store.paths import default_store_path

            self._store = open_store(self.store_path or default_store_path())
        return self._store

    # -- ops ------------------------------------------------------------------------------------
    def _list_servers(self, a: dict[str, Any]) -> Any:
        """Each server with the live figures read here, on its own node: its port never opens to the dashboard."""
        from engine.vllm import launcher
        from engine.vllm.status import status_of

        out = []
        for rec in launcher.list_servers(self.store):
            rec = launcher.refresh(self.store, rec)
            status = status_of(rec, self._scrapes.get(rec.id))
            if status.scrape is not None:
                self._scrapes[rec.id] = status.scrape
            out.append(status.to_json())
        return out

    def _list_models(self, a: dict[str, Any]) -> Any:
        """The models on this node's disks, where its vLLM finds them (hub cache, [models] roots)."""
        from engine.kvfit.local_models import configured_roots, list_local

        roots = configured_roots() if self.model_roots is None else self.model_roots
        return [m.to_json() for m in list_local(roots)]

    def _list_profiles(self, a: dict[str, Any]) -> Any:
        from engine.vllm.profile import named_profiles

        return sorted(named_profiles())

    def _start_server(self, a: dict[str, Any]) -> Any:
        from engine.vllm import launcher
        from engine.vllm.profile import load_profile, profile_roots
        from store.config_files import toml_by_name

        from engine.kvfit.local_models import configured_roots, list_local
        from engine.node_ops import with_model

        try:
            profile = load_profile(toml_by_name("profile", a.get("profile"), profile_roots()))
            if a.get("model") is not None:  # a model this node lists (list_models), instead of the profile's
                roots = configured_roots() if self.model_roots is None else self.model_roots
                profile = with_model(profile, _text(a["model"], "model"), list_local(roots))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        gpus = _gpu_indices(a.get("gpus"), required=True)
        snap = self.source.snapshot()
        try:
            snaps = snap.gpus_at(gpus) if snap.nvml == "ok" else None
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        rec, verdict = launcher.start(self.store, profile, gpus, gpu_snapshots=snaps, port=_port(a.get("port")),
                                      force=a.get("force") is True, adapter_roots=self.adapter_roots)
        return {"server": rec.to_json(), "verdict": verdict.to_json() if verdict is not None else None}

    def _stop_server(self, a: dict[str, Any]) -> Any:
        from engine.vllm import launcher

        return launcher.stop(self.store, launcher.get(self.store, _text(a.get("id"), "id"))).to_json()

    def _list_jobs(self, a: dict[str, Any]) -> Any:
        """Each job with its recent progress events (the Jobs screen charts the loss from them)."""
        from engine.finetune import jobs

        out = []
        for r in jobs.list_jobs(self.store):
            doc = jobs.refresh(self.store, r).to_json()
            doc["events"] = [e for e in jobs.read_events(r.progress_path) if e.get("event") == "step"][-500:]
            out.append(doc)
        return out

    def _start_job(self, a: dict[str, Any]) -> Any:
        from engine.finetune import jobs
        from engine.finetune.spec import load_spec, spec_roots
        from store.config_files import toml_by_name

        try:
            spec = load_spec(toml_by_name("job spec", a.get("spec"), spec_roots()))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        if a.get("slurm") is not None:
            return jobs.start(self.store, spec, None, force=a.get("force") is True, slurm=self._slurm_request(a["slurm"]),
                              adapter_root=self.adapter_roots[0] if self.adapter_roots else None).to_json()
        gpus = _gpu_indices(a.get("gpus"), required=False) or None
        snap = self.source.snapshot()
        try:
            snaps = snap.gpus_at(gpus) if gpus and snap.nvml == "ok" else None
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return jobs.start(self.store, spec, gpus, gpu_snapshots=snaps, force=a.get("force") is True).to_json()

    def _slurm_settings(self) -> Any:
        if self.slurm is None or not self.slurm.enabled:
            raise BadRequest("Slurm is not configured on this node ([slurm] enabled = true in its fleet config)")
        return self.slurm

    def _slurm_request(self, req: object) -> Any:
        """What a dashboard may ask of this node's Slurm: a GPU count, a partition name, a time limit."""
        import re

        from engine.finetune.jobs import SlurmRequest
        from engine.slurm.client import check_time

        settings = self._slurm_settings()
        if not isinstance(req, dict) or set(req) - {"gpus", "partition", "time"}:
            raise BadRequest("slurm must be an object with gpus, partition and time only")
        gpus, part, limit = req.get("gpus", 1), req.get("partition"), req.get("time")
        if not isinstance(gpus, int) or isinstance(gpus, bool) or not 1 <= gpus <= 64:
            raise BadRequest(f"slurm.gpus must be a count 1-64, got {gpus!r}")
        if part is not None and (not isinstance(part, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", part)):
            raise BadRequest(f"slurm.partition must be a partition name, got {part!r}")
        if limit is not None:
            try:
                limit = check_time(_text(limit, "slurm.time"))
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
        return SlurmRequest(settings, gpus, part, limit)

    def _slurm_view(self, a: dict[str, Any]) -> Any:
        from engine.slurm import client as slurm

        return slurm.cluster(self._slurm_settings()).to_json()

    def _resume_job(self, a: dict[str, Any]) -> Any:
        from engine.finetune import jobs

        return jobs.resume(self.store, jobs.get(self.store, _text(a.get("id"), "id"))).to_json()

    def _cancel_job(self, a: dict[str, Any]) -> Any:
        from engine.finetune import jobs

        return jobs.cancel(self.store, jobs.get(self.store, _text(a.get("id"), "id"))).to_json()

    def _list_adapters(self, a: dict[str, Any]) -> Any:
        from engine.node_ops import list_adapters
        from engine.vllm import launcher

        sid = _text(a["server"], "server") if a.get("server") is not None else None
        try:
            return list_adapters(self.store, self.adapter_roots, sid).to_json()
        except LaunchError as exc:
            raise BadRequest(str(exc)) from None

    def _server(self, a: dict[str, Any]) -> Any:
        from engine.vllm import launcher

        try:
            return launcher.refresh(self.store, launcher.get(self.store, _text(a.get("server"), "server")))
        except LaunchError as exc:
            raise BadRequest(str(exc)) from None

    def _adapter(self, a: dict[str, Any]) -> Any:
        from engine.adapters import registry as adapters

        try:
            return adapters.by_name(self.adapter_roots, a.get("adapter"))
        except adapters.AdapterError as exc:
            raise BadRequest(str(exc)) from None

    def _name(self, a: dict[str, Any], key: str = "name") -> str | None:
        import re

        value = a.get(key)
        if value is not None and (not isinstance(value, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._@:-]*$", value)):
            raise BadRequest(f"{key} must be an adapter name, got {value!r}")
        return value

    def _load_adapter(self, a: dict[str, Any]) -> Any:
        from engine.adapters import registry as adapters

        server, adapter = self._server(a), self._adapter(a)
        return adapters.load_into(server, adapter, self._name(a))

    def _swap_adapter(self, a: dict[str, Any]) -> Any:
        from engine.adapters import registry as adapters

        server, adapter, old = self._server(a), self._adapter(a), self._name(a, "old")
        if old is None:
            raise BadRequest("old must name the loaded adapter to replace")
        return adapters.load_into(server, adapter, self._name(a), old)

    def _unload_adapter(self, a: dict[str, Any]) -> Any:
        from engine.adapters import registry as adapters

        server, name = self._server(a), self._name(a)
        if name is None:
            raise BadRequest("name must name the loaded adapter to unload")
        return adapters.unload(server.base_url, name, server.api_key, server=server.id)

    def _tail_log(self, a: dict[str, Any]) -> Any:
        from engine.io.logs import tail

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
    def send(self, out: TextIO, msg: Hello | Snapshot | Response) -> None:
        line = msg.model_dump_json() if msg.type != "response" else json.dumps(msg.model_dump(), default=str)
        with self._out_lock:
            out.write(line + "\n")
            out.flush()

    def _fail(self, out: TextIO, rid: Any, error: str) -> None:
        # An error quotes what it refused; a megabyte of someone's input is not worth echoing back whole.
        if len(error) > MAX_ERROR:
            error = error[:MAX_ERROR] + "... (cut)"
        self.send(out, Response(id=rid if isinstance(rid, int) and not isinstance(rid, bool) else None, ok=False,
                                error=error))

    def _handle(self, out: TextIO, req: Request) -> None:
        rid, op, args = req.id, req.op.value, req.args
        fn = self.ops[op]
        action = MUTATING_OPS.get(op)
        behalf = {"source": "agent", "on_behalf_of": req.operator}
        with audit.on_behalf_of(behalf), audit.counting() as written:
            if self.read_only and action is not None:
                error = f"{op}: refused, this node's agent is read-only"
                audit.record(action, _target(args), "refused", "this node's agent is read-only", **_params(op, args))
                self._fail(out, rid, error)
                return
            try:
                result = fn(args)
                self.send(out, Response(id=rid, ok=True, result=result))
            except Exception as exc:  # every failure goes back to the dashboard as text
                if action is not None and written[0] == 0:
                    # Refused before the engine recorded it (a bad name, an unknown id, a boundary, the
                    # trail itself unavailable): recorded here, so no refusal goes unrecorded.
                    outcome = "failed" if isinstance(exc, (OSError, RuntimeError)) else "refused"
                    audit.record(action, _target(args), outcome, _reason(exc), **_params(op, args))
                self._fail(out, rid, self._error_text(exc))

    def _error_text(self, exc: Exception) -> str:
        from store.db import corrupt_message, is_corrupt

        if is_corrupt(exc):  # a damaged page met mid-request: say which file and what to do, as the CLI does
            return corrupt_message(getattr(self._store, "path", None) or self.store_path or "the store", exc)
        return f"{type(exc).__name__}: {exc}"

    def _read(self, inp: BinaryIO | TextIO, out: TextIO) -> None:
        """Read lines as bytes and decode each one itself: a text stream in a strict locale raises on one
        invalid byte inside readline(), which would end this thread and leave the agent deaf."""
        newline: bytes | str = b"\n" if not isinstance(inp, io.TextIOBase) else "\n"
        while True:
            try:
                line = inp.readline(MAX_LINE + 1)
            except UnicodeDecodeError:  # only a text stream without a byte buffer gets here
                self._fail(out, None, "malformed message: not UTF-8")
                continue
            except (OSError, ValueError):  # stdin gone or closed under us
                break
            if not line:
                break
            try:
                if len(line) > MAX_LINE:
                    while line and not line.endswith(newline):  # drop the rest of the oversized line
                        line = inp.readline(MAX_LINE)
                    self._fail(out, None, f"malformed message: longer than {MAX_LINE} bytes")
                    continue
                if isinstance(line, bytes):
                    try:
                        text = line.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        self._fail(out, None, f"malformed message: not UTF-8 (byte 0x{line[exc.start]:02x} at offset {exc.start})")
                        continue
                else:
                    text = line
                self._take(text, out)
            except (BrokenPipeError, OSError):
                break
            except Exception as exc:  # one bad line never deafens the agent
                try:
                    self._fail(out, None, f"malformed message: {type(exc).__name__}")
                except OSError:
                    break
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
            self._fail(out, None, f"malformed message: {why}")
            return
        if msg.get("v") != PROTOCOL_VERSION:
            self._fail(out, msg.get("id"), f"protocol v{msg.get('v')} not supported; this agent speaks v{PROTOCOL_VERSION}")
            return
        try:
            typed = parse_client(msg)
        except BadMessage as exc:
            self._fail(out, msg.get("id"), str(exc))
            return
        if isinstance(typed, Subscribe):
            if typed.interval is not None:
                self.interval_s = min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, typed.interval))
        else:
            threading.Thread(target=self._handle, args=(out, typed), daemon=True).start()

    def serve(self, inp: TextIO | BinaryIO, out: TextIO) -> int:
        first = self.source.snapshot()
        self.send(out, Hello(fleetdeck=self.version, host=socket.gethostname(), node=first.node, nvml=first.nvml,
                             reason=first.reason))
        # The bytes under a text stream (sys.stdin.buffer): the reader decodes each line itself.
        raw = inp.buffer if isinstance(inp, io.TextIOWrapper) else inp
        threading.Thread(target=self._read, args=(raw, out), daemon=True).start()
        snap = first
        while not self._stop.is_set():
            try:
                self.send(out, Snapshot(snapshot=snapshot_to_json(snap)))
            except (BrokenPipeError, OSError):
                return 0
            self._stop.wait(self.interval_s)
            if not self._stop.is_set():
                snap = self.source.snapshot()
        return 0
