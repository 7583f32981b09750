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
        if not isinstance(v, (int, float)) or math.isnan(v):
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
    return math.exp(max(lp, -700.0))
