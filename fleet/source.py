"""What the dashboard polls: any object with a name that returns a NodeSnapshot."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import replace
from typing import Protocol

from fleet.model import NodeSnapshot


class NodeSource(Protocol):
    name: str
    simulated: bool

    def snapshot(self) -> NodeSnapshot: ...

    def close(self) -> None: ...


class LocalNode:
    """This host, read through NVML, each read with a time limit.

    A driver can hang an NVML call for good (`nvidia-smi` stuck in uninterruptible sleep is the known
    case). The read runs in its own thread; past `timeout_s` the node answers at once with its last
    GPUs marked stale and the reason, and starts no second read while the first is still stuck, so
    neither the dashboard nor the agent ever freezes. When the stuck call returns, reading resumes.
    """

    simulated = False

    def __init__(self, name: str | None = None, timeout_s: float = 5.0) -> None:
        from fleet.nvml import NvmlCollector

        self._collector = NvmlCollector(node=name)
        self.name = self._collector.node
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._reading: Future[NodeSnapshot] | None = None
        self._since = 0.0
        self._last: NodeSnapshot | None = None

    def snapshot(self) -> NodeSnapshot:
        with self._lock:
            # A read that has finished is never answered again as new: its thread clears it only after
            # handing over the result, and a caller can be back before that on a busy machine.
            if self._reading is None or self._reading.done():
                self._reading = Future()
                self._since = time.time()
                threading.Thread(target=self._read, args=(self._reading,), name=f"nvml-{self.name}", daemon=True).start()
            reading = self._reading
        try:
            snap = reading.result(timeout=self.timeout_s)
        except FuturesTimeout:
            return self._stale()
        with self._lock:
            self._last = snap
        return snap

    def _read(self, fut: Future[NodeSnapshot]) -> None:
        try:
            snap = self._collector.snapshot()
        except BaseException as exc:  # the collector handles NVML errors; anything else is reported, not raised
            snap = NodeSnapshot(node=self.name, taken_at=time.time(), nvml="unavailable",
                                reason=f"reading NVML failed: {type(exc).__name__}: {exc}")
        # The read is over before anyone hears its result: a snapshot() right after this one's returned
        # starts a new read rather than being handed this finished one again.
        with self._lock:
            if self._reading is fut:
                self._reading = None
        fut.set_result(snap)

    def _stale(self) -> NodeSnapshot:
        stuck = time.time() - self._since
        reason = (f"NVML has not answered for {stuck:.0f} s (a hung driver? check `nvidia-smi` and dmesg); "
                  "showing the last readings")
        last = self._last
        gpus = [replace(g, error=f"stale: {reason}") for g in last.gpus] if last is not None else []
        return NodeSnapshot(node=self.name, taken_at=time.time(), nvml="unavailable", reason=reason, gpus=gpus,
                            driver_version=last.driver_version if last else None,
                            host=last.host if last else NodeSnapshot(node=self.name, taken_at=0, nvml="unavailable").host)

    def close(self) -> None:
        self._collector.close()


def snapshot_here() -> NodeSnapshot:
    """One look at this host's GPUs, NVML opened and closed around it (for one-shot CLI commands)."""
    node = LocalNode()
    try:
        return node.snapshot()
    finally:
        node.close()
