"""One request on its way through the proxy: what the ledger row is made from."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from engine.router.config import Task
from engine.router.decide import Decision, Force
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
    size: int = 0  # the client's body in bytes (a large one is encoded for the upstream off the event loop)
    decision: Decision | None = None  # where it was routed, once decided
    # time.perf_counter() when the frontier was asked, until its answer (or failure) came: a request cancelled
    # meanwhile (the client left, the proxy stopped) was sent to the frontier, which may bill it.
    frontier_asked: float | None = None
    # A whole answer's frontier call, shielded from the request's cancel: when the client leaves it goes on (the
    # frontier generates and bills the whole answer anyway) and its usage makes the row's cost.
    frontier_call: asyncio.Task[dict[str, Any]] | None = None
