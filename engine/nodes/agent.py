"""The node agent: `fleetdeck agent --stdio`, run by the dashboard as `ssh -T NODE fleetdeck agent --stdio`.

It says hello (protocol version, fleetdeck version, hostname, NVML state), sends a snapshot of this
node's GPUs every interval the dashboard asks for, and answers requests with the same functions the
local host uses (servers, jobs, adapters, logs). One JSON object per line both ways; a malformed line
gets an error response, never a crash. It ends when its stdin closes (the SSH session ended).

A request is input, never a command: it names profiles and job specs that this node's own folders hold,
servers and jobs this node's store knows, by exact id, and GPUs this node has, by index. Nothing in a
request is run or written as a path. Its id names it once on this connection: a request whose id was
used before is not run. An agent started read-only (`--read-only`, or `read_only = true` in this node's fleet
config) refuses every request that changes the node.
"""

from __future__ import annotations

import fcntl
import heapq
import io
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator, TextIO

from engine.adapters.registry import AdapterError
from engine.audit import trail as audit
from engine.finetune.jobs import JobError
from engine.host.folders import Folders
from engine.nodes.local import LocalOps, NotConfigured
from engine.nodes.ops import JobProgress
from engine.nodes.processes import KillError
from engine.slurm.client import SlurmError
from engine.vllm.command import LaunchError
from fleet.protocol import (MAX_INTERVAL_S, MIN_INTERVAL_S, OPS, BadMessage, Hello, Op, Request, Response, RestartServer,
                            Snapshot, StartJob, StartServer, Subscribe, parse_args, parse_client, result_of,
                            version_problem)
from fleet.remote import snapshot_to_json
from store.config_files import ConfigError
from store.db import StoreError

if TYPE_CHECKING:
    from store.db import Store


# Requests that change the node, and the audit action each is: an agent started read-only refuses them.
MUTATING_OPS = {Op.START_SERVER.value: "server.start", Op.STOP_SERVER.value: "server.stop",
                Op.START_JOB.value: "job.start", Op.CANCEL_JOB.value: "job.cancel", Op.RESUME_JOB.value: "job.resume",
                Op.LOAD_ADAPTER.value: "adapter.load", Op.UNLOAD_ADAPTER.value: "adapter.unload",
                Op.SWAP_ADAPTER.value: "adapter.swap",
                Op.RESTART_SERVER.value: "server.stop"}  # a restart stops first (then the engine records the start)


class BadRequest(ValueError):
    """A request that names nothing this node defines, or carries a value of the wrong kind."""


# The engine's refusals, whose text is already the one line an operator reads (`no server 'x'`): sent as
# it is, like the node's own CLI prints it. Any other exception goes with its type, which says more there.
_OWN_WORDS: tuple[type[Exception], ...] = (LaunchError, JobError, AdapterError, KillError, SlurmError, ConfigError,
                                          StoreError)


def _target(args: dict[str, Any]) -> str:
    for key in ("id", "profile", "spec", "adapter", "name"):
        if isinstance(args.get(key), str):
            return str(args[key])  # stored escaped and cut where it must be (engine/audit_text.py)
    return "?"


# A request's argument names, as the audit action's parameter names (the rest are not recorded).
_PARAM_OF = {Op.STOP_SERVER.value: {"id": "server"}, Op.RESTART_SERVER.value: {"id": "server"},
             Op.CANCEL_JOB.value: {"id": "job"},
             Op.RESUME_JOB.value: {"id": "job"}}


def _params(op: str, args: dict[str, Any]) -> dict[str, Any]:
    names = _PARAM_OF.get(op, {})
    return {names.get(k, k): (v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v))
            for k, v in args.items()}


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, (BadRequest, BadMessage)) else f"{type(exc).__name__}: {exc}"


MAX_LINE = 1 << 20  # a request is a few hundred bytes; a megabyte is a mistake or an attack
# Requests handled at once. A dashboard asks a handful at a time; a flood of lines waits for a free handler
# (the reader stops reading, so the pipe pushes back on the sender) instead of starting a thread per line.
MAX_HANDLERS = 16
MAX_ERROR = 2000  # characters of an error reply
# Request ids this agent remembers, to refuse one used again (below). Past this many, the lowest is forgotten and
# every id at or below it is refused too: memory stays bounded, and no id can come round again. A dashboard's ids
# count up (fleet/remote.py), so it never meets this floor.
ID_WINDOW = 4096

# What the engine raises for a request that names something this node does not have, or cannot do:
# answered as the request's fault (BadRequest), not the node's.
_REFUSALS: tuple[type[Exception], ...] = (ValueError, LookupError, NotConfigured)


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
        self._store: Store | None = None
        self._local: LocalOps | None = None
        self._local_lock = threading.Lock()
        self._out_lock = threading.Lock()
        self._stop = threading.Event()
        self._handlers = threading.BoundedSemaphore(MAX_HANDLERS)
        # Changes to this node happen one at a time: two starts at once would both plan against the same free
        # memory and pick the same free port (one of them then crashes on it). Reads never wait for this.
        self._changing = threading.Lock()
        self._gone = False  # stdout broke: the dashboard has gone
        # The request ids of this session (one agent answers one SSH session). A reused id is refused: its answer
        # could not be told from the first one's, and a change sent twice must not happen twice. Read and written
        # by the reader thread only, in the order the lines came.
        self._ids_seen: set[int] = set()
        self._ids_heap: list[int] = []
        self._ids_floor: int | None = None  # every id at or below this one counts as used
        # Each op: its request model in, one LocalOps call, its response model out (fleet/protocol.py's OPS).
        handlers: dict[Op, Callable[[Any], Any]] = {
            Op.PING: lambda a: {"pong": time.time()},
            Op.LIST_SERVERS: lambda a: [st.to_json() for st in self.local.servers()],
            Op.START_SERVER: self._start_server,
            Op.STOP_SERVER: lambda a: self.local.stop_server(a.id).to_json(),
            Op.RESTART_SERVER: self._restart_server,
            Op.LIST_JOBS: lambda a: [self._job_doc(p) for p in self.local.jobs()],
            Op.START_JOB: self._start_job,
            Op.CANCEL_JOB: lambda a: self.local.cancel_job(a.id).to_json(),
            Op.RESUME_JOB: lambda a: self.local.resume_job(a.id).to_json(),
            Op.LIST_ADAPTERS: lambda a: self.local.adapters(a.server).to_json(),
            Op.LIST_PROFILES: lambda a: self.local.profiles(),
            Op.LIST_SPECS: lambda a: self.local.specs(),
            Op.TAIL_LOG: lambda a: self.local.tail_log(a.kind, a.id, a.n),
            Op.LOAD_ADAPTER: lambda a: self.local.load_adapter(a.server, a.adapter, a.name),
            Op.UNLOAD_ADAPTER: lambda a: self.local.unload_adapter(a.server, a.name),
            Op.SWAP_ADAPTER: lambda a: self.local.swap_adapter(a.server, a.old, a.adapter, a.name),
            Op.SLURM_VIEW: lambda a: self.local.slurm_view().to_json(),
            Op.LIST_MODELS: lambda a: [m.to_json() for m in self.local.models()],
            # Read-only (not in MUTATING_OPS): a read-only agent plans too, and nothing is recorded.
            Op.PLAN_SERVER: lambda a: {"verdict": self.local.plan_server(a.profile, list(a.gpus),
                                                                         model=a.model).verdict.to_json()},
        }
        if set(handlers) != set(Op) or set(OPS) != set(Op):
            raise RuntimeError(f"agent has no handler for {sorted(set(Op) - set(handlers) - set(OPS))}")
        self.ops: dict[str, Callable[[Any], Any]] = {op.value: fn for op, fn in handlers.items()}

    @property
    def store(self) -> Store:
        if self._store is None:
            from store.db import open_store
            from store.paths import default_store_path

            path = self.store_path or default_store_path()
            if self.read_only:  # read as it is, followed, never created or written (an absent one reads as empty)
                from store.readview import open_read_view

                self._store = open_read_view(path)
            else:
                self._store = open_store(path)
        return self._store

    @property
    def local(self) -> LocalOps:
        """This node, as the one LocalOps every op goes through (made on the first request: the store
        opens then, not when the agent says hello)."""
        with self._local_lock:
            if self._local is None:
                self._local = LocalOps(self.store, list(self.adapter_roots), folders=Folders(),
                                       model_roots=self.model_roots, slurm_settings=self.slurm, source=self.source,
                                       scrapes={}, confined=True)
            return self._local

    @contextmanager
    def _one_change(self) -> Iterator[None]:
        """One change at a time on this node, from this agent and from any other agent on its store (two dashboards
        are two SSH sessions, two agent processes): a lock file beside the store, held while the change runs.
        Without it two starts from two dashboards planned against the same free memory and took the same port."""
        from store.paths import default_store_path

        store = Path(self.store_path or default_store_path())
        with self._changing:
            fd = os.open(f"{store}.changes.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # an open file's lock: another agent, or this one's other handle, waits
                yield
            finally:
                os.close(fd)  # and with it the lock

    # -- ops that take more than one call --------------------------------------------------------
    def _start_server(self, a: StartServer) -> Any:
        started = self.local.start_server(a.profile, list(a.gpus or []), port=a.port, force=a.force, model=a.model,
                                          slurm=a.slurm)
        return {"server": started.rec.to_json(), "verdict": started.verdict}

    def _restart_server(self, a: RestartServer) -> Any:
        """From the node's own record: the spec it was started with (a model picked for it included), on the same
        GPUs or Slurm ask, planned against this node's GPUs when it had ended: what `serve restart` does here."""
        done = self.local.restart_server(a.id)
        return {"old": done.old.to_json(), "new": done.new.to_json()}

    def _start_job(self, a: StartJob) -> Any:
        return self.local.start_job(a.spec, list(a.gpus) if a.gpus else None, force=a.force, slurm=a.slurm).to_json()

    @staticmethod
    def _job_doc(p: JobProgress) -> dict[str, Any]:
        """A job with its recent step events (the Jobs screen charts the loss from them)."""
        doc = p.rec.to_json()
        doc["events"] = [e for e in p.events if e.get("event") == "step"][-500:]
        return doc

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
        behalf = {"source": "agent", **({"on_behalf_of": req.operator} if req.operator else {})}
        with audit.on_behalf_of(behalf), audit.counting() as written:
            if self.read_only and action is not None:
                error = f"{op}: refused, this node's agent is read-only"
                audit.record(action, _target(args), "refused", "this node's agent is read-only", **_params(op, args))
                self._fail(out, rid, error)
                return
            try:
                typed = parse_args(req.op, args)  # BadMessage: one line naming the field
                try:
                    if action is None:
                        answer = fn(typed)
                    else:
                        with self._one_change():
                            answer = fn(typed)
                except _REFUSALS as exc:
                    raise BadRequest(str(exc)) from None
                result = result_of(req.op, answer)  # through the op's response model: a misfit is a bug here
                self.send(out, Response(id=rid, ok=True, result=result))
            except Exception as exc:  # every failure goes back to the dashboard as text
                if action is not None and written[0] == 0 and not isinstance(exc, audit.AuditUnavailable):
                    # Refused before the engine recorded it (a bad name, an unknown id, a boundary): recorded
                    # here, so no refusal goes unrecorded. (AuditUnavailable: the trail has tried already, and
                    # said on stderr that it could not.)
                    outcome = "failed" if isinstance(exc, (OSError, RuntimeError)) else "refused"
                    audit.record(action, _target(args), outcome, _reason(exc), **_params(op, args))
                self._fail(out, rid, self._error_text(exc))

    def _refuse_reused(self, out: TextIO, req: Request, why: str) -> None:
        """A request whose id was used before: not run. A change is recorded as refused (it is one the node did not
        make). The answer carries no id: under the reused one it would read as the answer to the first request."""
        action = MUTATING_OPS.get(req.op.value)
        if action is not None:
            behalf = {"source": "agent", **({"on_behalf_of": req.operator} if req.operator else {})}
            with audit.on_behalf_of(behalf):
                audit.record(action, _target(req.args), "refused", why, **_params(req.op.value, req.args))
        self._fail(out, None, f"{req.op.value}: {why}")

    def _error_text(self, exc: Exception) -> str:
        from store.db import corrupt_message, is_corrupt

        if isinstance(exc, (BadMessage, BadRequest, audit.ReadOnlyError, *_OWN_WORDS)):
            return str(exc)  # already one line that names the problem, as the node's own CLI prints it
        if is_corrupt(exc):  # a damaged page met mid-request: say which file and what to do, as the CLI does
            return corrupt_message(getattr(self._store, "path", None) or self.store_path or "the store", exc)
        return f"{type(exc).__name__}: {exc}"

    def _read(self, inp: BinaryIO | TextIO, out: TextIO) -> None:
        """Read lines as bytes and decode each one itself: a text stream in a strict locale raises on one
        invalid byte inside readline(), which would end this thread and leave the agent deaf."""
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
                    # drop the rest of the oversized line
                    while line and not (line.endswith(b"\n") if isinstance(line, bytes) else line.endswith("\n")):
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
        wrong_version = version_problem(msg)
        if wrong_version is not None:
            self._fail(out, msg.get("id"), wrong_version)
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
            reused = self._reused(typed.id)
            self._handlers.acquire()  # released by the handler's thread when it has answered
            if self._stop.is_set() and self._gone:  # the dashboard's end of stdout is closed: no one to answer
                self._handlers.release()
                return
            try:
                threading.Thread(target=self._handle_one, args=(out, typed, reused), daemon=True).start()
            except BaseException:
                self._handlers.release()
                raise

    def _reused(self, rid: int) -> str | None:
        """Why request id `rid` cannot be taken (used before in this session), or None, taking it."""
        if rid in self._ids_seen:
            return (f"request id {rid} was already used on this connection: this request was not run (each request "
                    "needs an id of its own)")
        if self._ids_floor is not None and rid <= self._ids_floor:
            return (f"request id {rid} is not above {self._ids_floor}, the highest id this agent has forgotten: it may "
                    "have been used on this connection, so this request was not run (ids must be new; a dashboard "
                    "counts them up)")
        self._ids_seen.add(rid)
        heapq.heappush(self._ids_heap, rid)
        if len(self._ids_heap) > ID_WINDOW:  # forget the lowest: the floor rises to it, so it stays refused
            lowest = heapq.heappop(self._ids_heap)
            self._ids_seen.discard(lowest)
            self._ids_floor = lowest if self._ids_floor is None else max(self._ids_floor, lowest)
        return None

    def _handle_one(self, out: TextIO, req: Request, reused: str | None = None) -> None:
        try:
            if reused is not None:
                self._refuse_reused(out, req, reused)
                return
            self._handle(out, req)
        except OSError:
            pass  # the dashboard is gone: the reader sees its stdin close and ends the agent
        finally:
            self._handlers.release()

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
                self._gone = True
                self._stop.set()
                break
            self._stop.wait(self.interval_s)
            if not self._stop.is_set():
                snap = self.source.snapshot()
        self._drain()
        return 0

    def _drain(self) -> None:
        """Wait for the requests in hand to end (each holds a handler until it has answered): the process
        ends after this, and a change cut off there would be half done and unrecorded. Requests sent just
        before stdin closed are still answered."""
        for _ in range(MAX_HANDLERS):
            self._handlers.acquire()
        for _ in range(MAX_HANDLERS):
            self._handlers.release()
