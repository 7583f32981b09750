"""One request on its way through the proxy: what the ledger row is made from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.router.config import Task
from engine.router.decide import Force
from engine.router.slm_client import SlmOutcome


@dataclass
class Call:
    """What one request learned on its way through, for the ledger row."""

    rid: str
    task: Task
    t0: float  # time.perf_counter() when the request arrived: the row's end-to-end latency
    stream: bool
    force: Force | None
    body: dict[str, Any]  # the checked request's own dump (ChatRequest.forwarded()), never the client's dict
    slm: SlmOutcome = field(default_factory=SlmOutcome)
