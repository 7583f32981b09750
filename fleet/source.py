"""What the dashboard polls: any object with a name that returns a NodeSnapshot."""

from __future__ import annotations

from typing import Protocol

from fleet.model import NodeSnapshot


class NodeSource(Protocol):
    name: str
    simulated: bool

    def snapshot(self) -> NodeSnapshot: ...

    def close(self) -> None: ...


class LocalNode:
    """This host, read through NVML."""

    simulated = False

    def __init__(self, name: str | None = None) -> None:
        from fleet.nvml import NvmlCollector

        self._collector = NvmlCollector(node=name)
        self.name = self._collector.node

    def snapshot(self) -> NodeSnapshot:
        return self._collector.snapshot()

    def close(self) -> None:
        self._collector.close()
