"""One ledger row and the words it is written in: the route a request took and the reason for it.

The router decides and the ledger stores, so both spell a reason through `Reason`; the stored text is the
enum's value, unchanged from the strings earlier stores hold (a StrEnum is equal to, and hashes as, its text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import StrEnum


class Route(StrEnum):
    """Who answered: the small model, the frontier model, or nobody (the request failed or was refused)."""

    SLM = "slm"
    FRONTIER = "frontier"
    NONE = "none"


class Reason(StrEnum):
    """Why a request went where it did; one per ledger row."""

    CONFIDENT = "confident"  # the small model's confidence met the task's threshold
    LOW_CONFIDENCE = "low_confidence"  # it did not: escalated
    FORCED_SLM = "forced_slm"  # X-Fleetdeck-Escalate: never
    FORCED_FRONTIER = "forced_frontier"  # X-Fleetdeck-Escalate: always
    SLM_ERROR = "slm_error"  # the small model answered with an error or not at all
    SLM_TIMEOUT = "slm_timeout"  # stores written before the two named bounds
    SLM_FIRST_TOKEN_TIMEOUT = "slm_first_token_timeout"
    SLM_TOTAL_TIMEOUT = "slm_total_timeout"
    NO_LOGPROBS = "no_logprobs"  # an answer without the log-probabilities confidence is read from
    CLIENT_ERROR = "client_error"  # the upstream refused the request itself (4xx): not the model's fault
    BAD_REQUEST = "bad_request"  # refused at the proxy's front door
    SHUTDOWN = "shutdown"  # arrived while the proxy was stopping
    CLIENT_DISCONNECTED = "client_disconnected"  # the client left before its answer began (status 499)
    INTERNAL_ERROR = "internal_error"


# The reasons that count as "the small model failed" in the rollups (esc_slm_error).
SLM_ERROR_REASONS = frozenset({Reason.SLM_TIMEOUT, Reason.SLM_FIRST_TOKEN_TIMEOUT, Reason.SLM_TOTAL_TIMEOUT,
                               Reason.SLM_ERROR, Reason.NO_LOGPROBS})


@dataclass(slots=True)
class LedgerRow:
    id: str
    ts: float
    task: str
    route: str  # a Route
    escalated: bool
    reason: str  # a Reason
    status: int
    forced: bool = False
    error: str | None = None
    confidence: float | None = None
    slm_model: str | None = None
    frontier_model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    slm_prompt_tokens: int | None = None
    slm_completion_tokens: int | None = None
    frontier_prompt_tokens: int | None = None
    frontier_completion_tokens: int | None = None
    slm_latency_ms: float | None = None
    frontier_latency_ms: float | None = None
    latency_ms: float | None = None
    cost_usd: float = 0.0
    all_frontier_cost_usd: float = 0.0
    stream: bool = False
    prompt_text: str | None = None
    completion_text: str | None = None
    sanitized: bool = False  # a field could not be stored as given and was made safe
    slm_ttft_ms: float | None = None  # streamed: the small model's first token, ms after it was asked
    decision_window: str | None = None  # streamed: first_token | first_N_tokens | whole_answer
    slm_bound: str | None = None  # the small model's bound that fired: first_token | total
    cost_estimated: bool = False  # cost_usd is estimated from the prompt: the frontier's usage never came back


# The latest time a row may carry: 9999-12-31T23:59:59Z, the last second a date can show. A time past it (or
# before 1970, or not a number) cannot be bucketed into the rollups: such a row is not a row.
MAX_TS = 253402300799.0
INT64 = (-(2**63), 2**63)


def unstorable_number(name: str, value: object) -> str | None:
    """Why a row's number cannot go into the store or its rollups (None when it can): NaN and the
    infinities (the rollups' buckets and histograms are integers made from them), an integer past
    SQLite's 64 bits, a time outside 1970..9999."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name} is {value!r}"
    if isinstance(value, int) and not INT64[0] <= value < INT64[1]:
        return f"{name} is an integer past 64 bits"
    if name == "ts" and not 0 <= value <= MAX_TS:
        return f"ts {value!r} is not a time between 1970 and 9999"
    return None


def unstorable(row: LedgerRow) -> str | None:
    """The first of a row's numbers the store cannot take (see `unstorable_number`), or None."""
    for f in fields(row):
        why = unstorable_number(f.name, getattr(row, f.name))
        if why is not None:
            return why
    return None
