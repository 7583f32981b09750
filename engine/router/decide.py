"""Where a request goes, decided from what the small model produced: a pure function, no I/O, no clock.

`decide` is called once per request (streamed or not), after the small model was asked (or not: forced to the
frontier). It answers with the route, whether that is an escalation, the ledger's `Reason`, and, for a request
that fails here, what the client is told and what the ledger keeps. `after_frontier_failure` is the one
decision left for after the frontier call: the frontier failed, so the small model's answer stands or the
request fails. The Router does the I/O either side of these; the branching lives only here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from engine.router.config import Task
from store.ledger_row import Reason, Route

CLIENT_ERRORS = (400, 422)  # an upstream saying the request itself is wrong


class Force(StrEnum):
    """The X-Fleetdeck-Escalate header: `always` skips the small model, `never` forbids escalating."""

    ALWAYS = "always"
    NEVER = "never"


class SlmAnswer(Protocol):
    """What `decide` reads of the small model's outcome (engine/router/slm_client.py's SlmOutcome)."""

    @property
    def confidence(self) -> float | None: ...
    @property
    def error_reason(self) -> Reason | None: ...
    @property
    def status(self) -> int | None: ...
    @property
    def error(self) -> str | None: ...
    @property
    def has_answer(self) -> bool: ...
    @property
    def full_error(self) -> str | None: ...


@dataclass(frozen=True)
class Failure:
    """A request answered with an error: `message` goes to the client, `stored` to the ledger row."""

    status: int
    message: str
    stored: str
    client_error: bool = False  # the upstream refused the request itself: the client's 4xx

    @property
    def type(self) -> str:
        return "invalid_request_error" if self.client_error else "server_error"

    @property
    def code(self) -> str:
        if self.client_error:
            return "upstream_rejected"
        return "upstream_unavailable" if self.status == 503 else "upstream_error"


@dataclass(frozen=True)
class Decision:
    """Route SLM: the small model's answer is sent; FRONTIER: the frontier is asked; NONE: `failure` is sent."""

    route: Route
    reason: Reason
    escalated: bool = False
    forced: bool = False
    error: str | None = None  # the ledger's note on an SLM answer that stands (e.g. no frontier configured)
    failure: Failure | None = None


def _failure(task: Task, status: int, message: str, summary: str, client_error: bool = False) -> Failure:
    # The ledger keeps fleetdeck's summary (no upstream text: it can quote the prompt) unless the task stores text.
    return Failure(status, message, message if task.store_text else summary, client_error)


def decide(task: Task, slm: SlmAnswer, force: Force | None) -> Decision:
    """The route for one request. `slm` is empty (no answer, no error) when the small model was not asked."""
    if slm.error_reason == Reason.CLIENT_ERROR:
        return Decision(Route.NONE, Reason.CLIENT_ERROR, failure=_failure(
            task, slm.status or 400, f"the small model refused the request ({slm.full_error})",
            f"the small model refused the request ({slm.error})", client_error=True))
    if force == Force.NEVER:
        if not slm.has_answer:
            why = "and X-Fleetdeck-Escalate: never forbids escalation"
            return Decision(Route.NONE, slm.error_reason or Reason.SLM_ERROR, forced=True, failure=_failure(
                task, 502, f"the small model failed ({slm.full_error}) {why}", f"the small model failed ({slm.error}) {why}"))
        return Decision(Route.SLM, Reason.FORCED_SLM, forced=True)
    if force is None and slm.has_answer and slm.confidence is not None and slm.confidence >= task.threshold:
        return Decision(Route.SLM, Reason.CONFIDENT)

    if force == Force.ALWAYS:
        reason = Reason.FORCED_FRONTIER
    else:
        reason = slm.error_reason or (Reason.LOW_CONFIDENCE if slm.has_answer else Reason.SLM_ERROR)
    forced = force == Force.ALWAYS
    if not task.frontier_model:
        if slm.has_answer:  # nothing to escalate to: the small model's answer stands
            return Decision(Route.SLM, reason, forced=forced, error="no frontier model configured")
        if forced:  # the small model was not asked: say what was asked for, not "unavailable (None)"
            msg = (f"X-Fleetdeck-Escalate: always asks for the frontier model, and task {task.name!r} "
                   "has no frontier_model")
            return Decision(Route.NONE, reason, forced=True, failure=_failure(task, 503, msg, msg))
        why = f"and task {task.name!r} has no frontier_model to escalate to"
        return Decision(Route.NONE, reason, failure=_failure(
            task, 503, f"the small model is unavailable ({slm.full_error}) {why}",
            f"the small model is unavailable ({slm.error}) {why}"))
    return Decision(Route.FRONTIER, reason, escalated=True, forced=forced)


def after_frontier_failure(task: Task, slm: SlmAnswer, reason: Reason, error: str, summary: str,
                           status: int | None = None) -> Decision:
    """The frontier was asked (`reason` is why) and failed: `error` in full, `summary` without upstream text,
    `status` the frontier's HTTP status when it gave one. A forced escalation stays counted as forced
    whatever the frontier did (the rollups' esc_forced)."""
    forced = reason == Reason.FORCED_FRONTIER
    if slm.has_answer:
        # The frontier failed after a low-confidence answer: the small model's answer is returned.
        return Decision(Route.SLM, reason, escalated=True, forced=forced,
                        error=f"frontier failed: {error if task.store_text else summary}")
    if status in CLIENT_ERRORS:
        # The frontier refused the request itself: the client's 4xx, not a gateway failure.
        return Decision(Route.NONE, reason, escalated=True, forced=forced, failure=_failure(
            task, 400, f"the frontier model refused the request ({error})",
            f"the frontier model refused the request ({summary})", client_error=True))
    return Decision(Route.NONE, reason, escalated=True, forced=forced, failure=_failure(
        task, 502, f"both the small model ({slm.full_error or 'not asked'}) and the frontier model ({error}) failed",
        f"both the small model ({slm.error or 'not asked'}) and the frontier model ({summary}) failed"))
