"""The small model's confidence from its token log-probabilities (OpenAI chat `logprobs` shape).

first_token: probability of the first generated token (classification-style tasks answer in one);
mean_token: geometric mean probability over the answer (exp of the mean log-probability);
min_token: probability of the least likely token (one shaky token sinks the answer).
"""

from __future__ import annotations

import math
from typing import Any


def token_logprobs(choice: dict[str, Any]) -> list[float] | None:
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None
    content = lp.get("content")
    if not isinstance(content, list) or not content:
        return None
    values = []
    for item in content:
        v = item.get("logprob") if isinstance(item, dict) else None
        if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
            return None
        values.append(float(v))
    return values


def confidence(method: str, logprobs: list[float]) -> float:
    if not logprobs:
        raise ValueError("no token log-probabilities")
    if method == "first_token":
        lp = logprobs[0]
    elif method == "mean_token":
        lp = sum(logprobs) / len(logprobs)
    elif method == "min_token":
        lp = min(logprobs)
    else:
        raise ValueError(f"unknown confidence method {method!r}")
    if math.isnan(lp):
        return 0.0
    # A log-probability is at most 0; an upstream's 5.0 or 1e308 is clamped (exp would overflow past 709).
    return math.exp(min(0.0, max(lp, -700.0)))


def slm_request(task: Any, messages: list[Any], params: dict[str, Any] | None = None, top_logprobs: int = 1) -> dict[str, Any]:
    """The chat request a task's small model gets, from the proxy and from calibration alike: the
    client's parameters, the task's model, and the log-probabilities confidence is computed from."""
    return {**(params or {}), "model": task.slm_model, "messages": messages, "logprobs": True,
            "top_logprobs": max(1, top_logprobs)}


def answer_confidence(task: Any, answer: Any) -> tuple[dict[str, Any], float | None]:
    """The answer's first choice and the task's confidence in it (None: no log-probabilities in it).
    ValueError when the answer is not a chat completion."""
    try:
        choice = answer["choices"][0]
        if not isinstance(choice, dict):
            raise TypeError
    except (KeyError, IndexError, TypeError):
        raise ValueError("the small model's answer is not a chat completion") from None
    lps = token_logprobs(choice)
    return choice, (confidence(task.confidence, lps) if lps is not None else None)
