"""Calibration: how the small model's confidence predicts correctness, and the threshold to use.

A labelled evaluation set (JSONL: `messages` and `expected`) goes through the task's SLM; each answer
gets its confidence (the task's method) and whether it matched. Raising the threshold escalates more
and, if confidence means anything, leaves fewer wrong answers. Routed accuracy at a threshold counts
escalated items as answered correctly by the frontier model (`frontier_accuracy`, 1.0 by default).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from engine.io.http_auth import bearer_from_env
from engine.router.confidence import answer_confidence, slm_request
from store.files import read_regular
from store.json_text import JsonTextError, jsonl_lines, parse_json

if TYPE_CHECKING:  # types only: the store is handed in by the caller
    from store.analytics import CostFigures
    from store.db import Store


class EvalSetError(ValueError):
    """The evaluation file has bad lines; the message lists them."""


@dataclass
class EvalItem:
    line: int
    messages: list[dict[str, Any]]
    expected: list[str]


def load_eval_set(path: Path) -> list[EvalItem]:
    try:
        text = read_regular(path).decode("utf-8")  # a regular file only: a pipe would block the calibration
    except OSError as exc:
        raise EvalSetError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise EvalSetError(f"{path}: cannot read: not UTF-8 text (byte {exc.start})") from None
    items, bad = [], []
    for n, raw in jsonl_lines(text):
        try:
            obj = parse_json(raw)
        except JsonTextError as exc:
            bad.append(f"line {n}: invalid JSON ({exc})")
            continue
        if not isinstance(obj, dict):
            bad.append(f"line {n}: expected a JSON object")
            continue
        msgs, expected = obj.get("messages"), obj.get("expected")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            bad.append(f"line {n}: `messages` must be a non-empty list of {{role, content}} objects")
            continue
        if isinstance(expected, str):
            expected = [expected]
        if not isinstance(expected, list) or not expected or not all(isinstance(e, str) and e.strip() for e in expected):
            bad.append(f"line {n}: `expected` must be a non-empty string (or a list of accepted strings)")
            continue
        items.append(EvalItem(n, msgs, expected))
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise EvalSetError(f"{path}: {len(bad)} bad line(s), nothing was sent:\n  {shown}")
    if not items:
        raise EvalSetError(f"{path}: no evaluation items")
    return items


def normalise(text: str) -> str:
    return " ".join(text.strip().strip(".").casefold().split())


def is_correct(answer: str | None, expected: list[str]) -> bool:
    return answer is not None and normalise(answer) in {normalise(e) for e in expected}


@dataclass
class Calibration:
    items: int
    accuracy: float
    target_accuracy: float
    threshold: float | None
    escalation_rate: float | None
    routed_accuracy: float | None
    ece: float
    auroc: float | None
    curve: list[tuple[float, float, float]] = field(default_factory=list)  # (threshold, escalation, accuracy)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def expected_calibration_error(scored: list[tuple[float, bool]], bins: int = 10) -> float:
    total = len(scored)
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [(c, ok) for c, ok in scored if (lo <= c < hi) or (b == bins - 1 and c == 1.0)]
        if members:
            conf = sum(c for c, _ in members) / len(members)
            acc = sum(ok for _, ok in members) / len(members)
            ece += abs(acc - conf) * len(members) / total
    return ece


def auroc(scored: list[tuple[float, bool]]) -> float | None:
    """Probability that a correct answer is more confident than a wrong one (ties count half)."""
    pos = [c for c, ok in scored if ok]
    neg = [c for c, ok in scored if not ok]
    if not pos or not neg:
        return None
    ranked = sorted(scored, key=lambda x: x[0])
    # Mann-Whitney U with average ranks for ties.
    ranks: list[float] = [0.0] * len(ranked)
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, (_, ok) in zip(ranks, ranked) if ok)
    u = rank_sum - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def analyse(scored: list[tuple[float, bool]], target_accuracy: float, frontier_accuracy: float = 1.0) -> Calibration:
    """The accuracy/escalation curve over every distinct threshold, and the cheapest one meeting the target."""
    n = len(scored)
    thresholds = sorted({c for c, _ in scored} | {0.0})
    curve = []
    for t in thresholds:
        kept = [ok for c, ok in scored if c >= t]
        escalated = n - len(kept)
        acc = (sum(kept) + frontier_accuracy * escalated) / n
        curve.append((t, escalated / n, acc))
    # Escalating everything (threshold above every confidence) is the last point.
    curve.append((min(1.0, max(c for c, _ in scored) + 1e-9) if scored else 1.0, 1.0, frontier_accuracy))
    meeting = [p for p in curve if p[2] + 1e-12 >= target_accuracy]
    best = min(meeting, key=lambda p: (p[1], p[0])) if meeting else None
    return Calibration(
        items=n,
        accuracy=sum(ok for _, ok in scored) / n,
        target_accuracy=target_accuracy,
        threshold=best[0] if best else None,
        escalation_rate=best[1] if best else None,
        routed_accuracy=best[2] if best else None,
        ece=expected_calibration_error(scored),
        auroc=auroc(scored),
        curve=curve,
    )


def score_eval_set(task: Any, items: list[EvalItem], timeout_s: float = 60.0, headers: dict[str, str] | None = None,
                   latencies_ms: list[float] | None = None) -> list[tuple[float, bool]]:
    """Ask the task's SLM each item, with log-probabilities; (confidence, correct) per item. `task` needs
    slm_base_url, slm_model and confidence (and slm_api_key_env unless `headers` are given); each
    request's latency is appended to `latencies_ms` when one is given."""
    if headers is None:
        headers = bearer_from_env(task.slm_api_key_env)
    scored = []
    with httpx.Client(timeout=timeout_s, trust_env=False) as client:
        for item in items:
            payload = slm_request(task, item.messages, {"temperature": 0})
            t0 = time.perf_counter()
            try:
                resp = client.post(f"{task.slm_base_url}/chat/completions", json=payload, headers=headers)
            except httpx.HTTPError as exc:
                raise ConnectionError(f"the small model at {task.slm_base_url} did not answer: {exc}") from exc
            if latencies_ms is not None:
                latencies_ms.append((time.perf_counter() - t0) * 1000.0)
            if resp.status_code != 200:
                raise ConnectionError(f"the small model answered HTTP {resp.status_code} on line {item.line}: {resp.text[:200]}")
            try:
                choice, conf = answer_confidence(task, resp.json())
            except ValueError as exc:
                raise ConnectionError(f"line {item.line}: {exc}") from exc
            answer = (choice.get("message") or {}).get("content")
            scored.append((conf or 0.0, is_correct(answer, item.expected)))
    return scored


def save_calibration(store: Store, task: str, eval_path: str, cal: Calibration, ts: float) -> None:
    store.insert("calibrations", {
        "ts": ts, "task": task, "eval_path": eval_path, "items": cal.items, "accuracy": cal.accuracy,
        "target_accuracy": cal.target_accuracy, "threshold": cal.threshold, "escalation_rate": cal.escalation_rate,
        "ece": cal.ece, "auroc": cal.auroc, "curve": cal.curve})


def latest_calibration(store: Store, task: str) -> dict[str, Any] | None:
    rows = store.query("SELECT * FROM calibrations WHERE task = ? ORDER BY ts DESC, id DESC LIMIT 1", (task,))
    if not rows:
        return None
    row = rows[0]
    row["curve"] = json.loads(row["curve"])
    return row


def what_if(monthly: CostFigures, curve: list[list[float]] | None, current_threshold: float, target_accuracy: float,
            price_factor: float = 1.0, volume_factor: float = 1.0, recent_rate: float | None = None) -> dict[str, Any]:
    """A task's monthly cost under a frontier price or volume change, and the cheapest threshold at the target.

    `monthly` is the task's entry of a month report (projected to a full month by the caller). The local
    fleet is a fixed cost; frontier spend scales with volume, price and the escalation rate. The month is
    priced at its escalation rate so far; `recent_rate` (a drifting task's recent rate) adds the month priced at
    that rate instead, so a drift is not averaged away unsaid.
    """
    requests = monthly.requests * volume_factor
    rate_now = monthly.escalation_rate or 0.0
    escalated_now = monthly.escalated or 0
    per_escalation = (monthly.frontier_cost_usd / escalated_now) if escalated_now else (
        monthly.all_frontier_cost_usd / monthly.requests if monthly.requests else 0.0)
    per_escalation *= price_factor
    slm = monthly.slm_cost_usd

    def cost_at(rate: float) -> float:
        return slm + requests * rate * per_escalation

    options = []
    if curve:
        for t, esc, acc in curve:
            if acc + 1e-12 >= target_accuracy:
                options.append({"threshold": t, "escalation_rate": esc, "accuracy": acc, "monthly_cost_usd": cost_at(esc)})
    best = min(options, key=lambda o: (o["monthly_cost_usd"], o["threshold"])) if options else None
    return {
        "price_factor": price_factor,
        "volume_factor": volume_factor,
        "requests": requests,
        "current_threshold": current_threshold,
        "current_escalation_rate": rate_now,
        "monthly_cost_usd": cost_at(rate_now),
        "all_frontier_cost_usd": monthly.all_frontier_cost_usd * volume_factor * price_factor,
        "best": best,
        "priced_at": "the month-to-date escalation rate",
        "recent_escalation_rate": recent_rate,
        "monthly_cost_at_recent_rate_usd": cost_at(recent_rate) if recent_rate is not None else None,
    }
