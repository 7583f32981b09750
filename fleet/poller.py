"""The fleet poll: what the dashboard runs each refresh, in a worker thread.

One call of `FleetPoller.poll()` reads every node source, keeps the last snapshot of each, appends
to the per-GPU history rings that the sparklines draw, and writes a history sample to the store
every ``history_every_s``. A node source that raises is turned into an "unavailable" snapshot with
the error, so one bad node never stops the others.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from fleet.model import NodeSnapshot
from fleet.source import NodeSource

if TYPE_CHECKING:
    from store.db import Store

HISTORY_POINTS = 300  # five minutes at the default 1 s refresh


@dataclass
class GpuHistory:
    util: deque[float | None] = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))
    mem_pct: deque[float | None] = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))


class FleetPoller:
    def __init__(
        self,
        sources: Sequence[NodeSource],
        store: "Store | None" = None,
        history_every_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        record_history: bool = True,
    ) -> None:
        self.sources = list(sources)
        self.store = store
        self.history_every_s = history_every_s
        # A read-only dashboard reads the store's history (the sparklines' seed) and writes none to it.
        self.record_history = record_history
        self._clock = clock
        self._last_history = -1e18
        self.latest: dict[str, NodeSnapshot] = {}
        self.history: dict[str, GpuHistory] = {}
        self.store_error: str | None = None

    @property
    def simulated(self) -> bool:
        return any(getattr(s, "simulated", False) for s in self.sources)

    def poll(self) -> dict[str, NodeSnapshot]:
        now = self._clock()
        for source in self.sources:
            try:
                snap = source.snapshot()
            except Exception as exc:  # a broken node must not take the dashboard down
                snap = NodeSnapshot(
                    node=source.name,
                    taken_at=now,
                    nvml="unavailable",
                    reason=f"reading this node failed: {type(exc).__name__}: {exc}",
                    simulated=getattr(source, "simulated", False),
                )
            self.latest[snap.node] = snap
            for gpu in snap.gpus:
                hist = self.history.setdefault(gpu.key, GpuHistory())
                hist.util.append(gpu.utilization_gpu_pct)
                total, used = gpu.memory_total_bytes, gpu.memory_used_bytes
                hist.mem_pct.append(100.0 * used / total if total and used is not None else None)
        if self.store is not None and self.record_history and now - self._last_history >= self.history_every_s:
            self._last_history = now
            self._write_history(self.store, now)
        return self.latest

    def seed_history(self, since_s: float = 300.0) -> None:
        """Fill the sparklines from the store, so a restarted dashboard shows the last minutes."""
        if self.store is None:
            return
        from store.gpu_history import history

        now = self._clock()
        rows = self.store.query(
            "SELECT DISTINCT node, uuid FROM gpu_samples WHERE ts >= ?", (now - since_s,)
        )
        for row in rows:
            hist = self.history.setdefault(f"{row['node']}/{row['uuid']}", GpuHistory())
            for sample in history(self.store, row["node"], row["uuid"], now - since_s):
                hist.util.append(sample.util_pct)
                total = sample.mem_total_bytes
                used = sample.mem_used_bytes
                hist.mem_pct.append(100.0 * used / total if total and used is not None else None)

    def _write_history(self, store: "Store", now: float) -> None:
        from store.gpu_history import record_samples

        gpus = [g for snap in self.latest.values() for g in snap.gpus]
        try:
            record_samples(store, now, gpus)
            self.store_error = None
        except Exception as exc:  # a full disk or a locked file: keep the live view going
            self.store_error = f"GPU history not saved: {exc}"

    def close(self) -> None:
        for source in self.sources:
            try:
                source.close()
            except Exception:
                pass
