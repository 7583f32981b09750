"""decide(): the proxy's routing decision as a pure function (engine/router/decide.py).

The HTTP tests (test_proxy*.py) hold the Router to what it sends and records; these hold the decision itself
to its table and to the properties every decision has, whatever the confidence, threshold and header.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.router.config import Task
from engine.router.decide import Decision, Force, after_frontier_failure, decide
from engine.router.slm_client import SlmOutcome
from store.ledger_row import Reason, Route

ANSWER: dict[str, Any] = {"choices": [{"message": {"role": "assistant", "content": "ok"}}]}


def task(frontier: bool = True, threshold: float = 0.8, store_text: bool = False) -> Task:
    return Task(name="t", slm_base_url="http://127.0.0.1:9/v1", slm_model="m", threshold=threshold,
                frontier_model="openai/gpt-4o" if frontier else None, store_text=store_text)


def answered(conf: float | None, reason: Reason | None = None) -> SlmOutcome:
    return SlmOutcome(answer=ANSWER, confidence=conf, error_reason=reason,
                      error="no token log-probabilities in the answer" if reason == Reason.NO_LOGPROBS else None)


def failed(reason: Reason, status: int | None = None, detail: str | None = None) -> SlmOutcome:
    return SlmOutcome(error_reason=reason, error="HTTP 400" if status else "boom", status=status, detail=detail)


NOT_ASKED = SlmOutcome()

# (case, frontier configured, slm outcome, force) -> (route, reason, escalated, forced, failure status)
CASES = [
    ("confident", True, answered(0.9), None, (Route.SLM, Reason.CONFIDENT, False, False, None)),
    ("at the threshold is confident", True, answered(0.8), None, (Route.SLM, Reason.CONFIDENT, False, False, None)),
    ("low confidence escalates", True, answered(0.5), None, (Route.FRONTIER, Reason.LOW_CONFIDENCE, True, False, None)),
    ("no logprobs escalates", True, answered(None, Reason.NO_LOGPROBS), None,
     (Route.FRONTIER, Reason.NO_LOGPROBS, True, False, None)),
    ("slm error escalates", True, failed(Reason.SLM_ERROR), None, (Route.FRONTIER, Reason.SLM_ERROR, True, False, None)),
    ("first-token bound escalates", True, failed(Reason.SLM_FIRST_TOKEN_TIMEOUT), None,
     (Route.FRONTIER, Reason.SLM_FIRST_TOKEN_TIMEOUT, True, False, None)),
    ("forced frontier", True, NOT_ASKED, Force.ALWAYS, (Route.FRONTIER, Reason.FORCED_FRONTIER, True, True, None)),
    ("forced slm keeps a low answer", True, answered(0.1), Force.NEVER, (Route.SLM, Reason.FORCED_SLM, False, True, None)),
    ("forced slm without an answer fails", True, failed(Reason.SLM_TOTAL_TIMEOUT), Force.NEVER,
     (Route.NONE, Reason.SLM_TOTAL_TIMEOUT, False, True, 502)),
    ("the slm refused the request", True, failed(Reason.CLIENT_ERROR, 422, "bad tool"), None,
     (Route.NONE, Reason.CLIENT_ERROR, False, False, 422)),
    ("a refusal wins over never", True, failed(Reason.CLIENT_ERROR, 400), Force.NEVER,
     (Route.NONE, Reason.CLIENT_ERROR, False, False, 400)),
    ("no frontier: a low answer stands", False, answered(0.5), None, (Route.SLM, Reason.LOW_CONFIDENCE, False, False, None)),
    ("no frontier, no answer: 503", False, failed(Reason.SLM_ERROR), None, (Route.NONE, Reason.SLM_ERROR, False, False, 503)),
    ("no frontier, forced to it: 503", False, NOT_ASKED, Force.ALWAYS,
     (Route.NONE, Reason.FORCED_FRONTIER, False, True, 503)),
]


@pytest.mark.parametrize("frontier,slm,force,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_decision_table(frontier: bool, slm: SlmOutcome, force: Force | None, expected: tuple[Any, ...]) -> None:
    d = decide(task(frontier), slm, force)
    assert (d.route, d.reason, d.escalated, d.forced, d.failure and d.failure.status) == expected
    assert (d.failure is None) == (d.route != Route.NONE)


def test_what_the_client_is_told_and_what_the_ledger_keeps() -> None:
    refused = failed(Reason.CLIENT_ERROR, 422, "tool 'x' is not defined: <the prompt's words>")
    f = decide(task(), refused, None).failure
    assert f is not None and f.client_error and (f.type, f.code) == ("invalid_request_error", "upstream_rejected")
    assert "<the prompt's words>" in f.message and "<the prompt's words>" not in f.stored  # upstream text: client only
    kept = decide(task(store_text=True), refused, None).failure
    assert kept is not None and kept.stored == kept.message  # a task that stores text keeps it all
    f = decide(task(frontier=False), failed(Reason.SLM_ERROR), None).failure
    assert f is not None and (f.type, f.code) == ("server_error", "upstream_unavailable")
    assert "has no frontier_model to escalate to" in f.message
    assert decide(task(frontier=False), answered(0.1), None).error == "no frontier model configured"


def test_after_the_frontier_fails_the_small_models_answer_stands_or_the_request_fails() -> None:
    low = answered(0.2)
    d = after_frontier_failure(task(), low, Reason.LOW_CONFIDENCE, "APIError: quota <text>", "APIError")
    assert (d.route, d.escalated, d.failure, d.error) == (Route.SLM, True, None, "frontier failed: APIError")
    d = after_frontier_failure(task(store_text=True), low, Reason.LOW_CONFIDENCE, "APIError: quota <text>", "APIError")
    assert d.error == "frontier failed: APIError: quota <text>"
    d = after_frontier_failure(task(), NOT_ASKED, Reason.FORCED_FRONTIER, "BadRequestError: no", "BadRequestError", 400)
    assert d.route == Route.NONE and d.failure is not None and d.failure.status == 400 and d.failure.client_error
    d = after_frontier_failure(task(), failed(Reason.SLM_ERROR), Reason.SLM_ERROR, "Timeout: x", "Timeout", 504)
    assert d.failure is not None and (d.failure.status, d.failure.code) == (502, "upstream_error")
    assert d.failure.stored == "both the small model (boom) and the frontier model (Timeout) failed"


def test_a_forced_escalation_stays_forced_whatever_the_frontier_does() -> None:
    # The rollups count esc_forced from the row's flag: a forced request whose frontier failed is still forced.
    for status in (400, 504, None):
        d = after_frontier_failure(task(), NOT_ASKED, Reason.FORCED_FRONTIER, "E: x", "E", status)
        assert d.forced and d.escalated
    assert not after_frontier_failure(task(), answered(0.2), Reason.LOW_CONFIDENCE, "E", "E").forced


def test_forced_to_a_missing_frontier_says_so_not_that_the_small_model_is_unavailable() -> None:
    d = decide(task(frontier=False), NOT_ASKED, Force.ALWAYS)
    assert d.failure is not None and d.forced
    assert "None" not in d.failure.message and "X-Fleetdeck-Escalate: always" in d.failure.message
    assert "no frontier_model" in d.failure.stored


confidences = st.one_of(st.none(), st.floats(min_value=0.0, max_value=1.0))
outcomes = st.one_of(
    st.just(NOT_ASKED),
    st.builds(answered, confidences),
    st.builds(answered, st.none(), st.just(Reason.NO_LOGPROBS)),
    st.builds(failed, st.sampled_from([Reason.SLM_ERROR, Reason.SLM_FIRST_TOKEN_TIMEOUT, Reason.SLM_TOTAL_TIMEOUT])),
)


@settings(max_examples=300, deadline=None)
@given(slm=outcomes, threshold=st.floats(min_value=0.0, max_value=1.0), force=st.sampled_from([None, *Force]),
       frontier=st.booleans())
def test_every_decision_follows_the_rules(slm: SlmOutcome, threshold: float, force: Force | None,
                                          frontier: bool) -> None:
    t = task(frontier, threshold)
    if force == Force.ALWAYS:
        slm = NOT_ASKED  # as the Router does: a request forced to the frontier never asks the small model
    d: Decision = decide(t, slm, force)
    confident = slm.has_answer and slm.confidence is not None and slm.confidence >= threshold
    # Never a frontier route without a frontier; a failure exactly when nobody answers; escalated iff frontier.
    assert frontier or d.route != Route.FRONTIER
    assert (d.failure is None) == (d.route != Route.NONE)
    assert d.escalated == (d.route == Route.FRONTIER)
    if force == Force.ALWAYS:  # forcing always wins: the frontier, or 503 when there is none
        assert d.reason == Reason.FORCED_FRONTIER
        assert d.route == (Route.FRONTIER if frontier else Route.NONE)
        assert d.failure is None or d.failure.status == 503
        assert d.forced
    elif force == Force.NEVER:  # never escalated: the small model's answer, whatever its confidence, or 502
        assert d.route == (Route.SLM if slm.has_answer else Route.NONE) and d.forced
        assert d.failure is None or d.failure.status == 502
    elif frontier:  # the small model answers iff it is confident
        assert (d.route == Route.SLM) == confident
        assert (d.reason == Reason.CONFIDENT) == confident
    else:  # no frontier: the small model's answer stands, or 503
        assert d.route == (Route.SLM if slm.has_answer else Route.NONE)
        assert d.failure is None or d.failure.status == 503
