"""Evaluating an adapter version: a labelled set (the calibrate format) through a server with that version
loaded, recorded with the version's content hash and the eval file's hash, so a promotion gate can tell
an evaluation of these exact weights on this exact file from any other."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import adapters
from engine.adapters import Adapter, AdapterError


@dataclass
class EvalTarget:
    """What calibration's scorer needs of a task, for one served adapter."""

    slm_base_url: str
    slm_model: str
    confidence: str = "mean_token"
    slm_api_key_env: str | None = None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 100)) - 1))
    return ordered[k]


def compatible_servers(store: Any, adapter: Adapter) -> list[Any]:
    """Ready servers fleetdeck runs that could serve this adapter (LoRA on, same base, rank that fits)."""
    from engine.vllm.launcher import list_servers, refresh

    found = []
    for rec in list_servers(store, include_ended=False):
        rec = refresh(store, rec)
        lora = rec.spec.get("lora", {})
        if rec.state == "ready" and not adapters.compatibility_problems(
                adapter, rec.spec.get("model", ""), lora.get("enable", False), lora.get("max_lora_rank", 16)):
            found.append(rec)
    return found


def ensure_loaded(server: Any, adapter: Adapter) -> bool:
    """Load the version into the server unless it is there already; True when it was loaded now."""
    if adapter.name in {m["id"] for m in adapters.loaded(server.base_url, server.api_key)}:
        return False
    adapters.load_into(server, adapter)
    return True


def evaluate(store: Any, adapter: Adapter, server: Any, eval_path: Path, *, confidence: str = "mean_token",
             target_accuracy: float = 0.95) -> dict[str, Any]:
    """Run the eval set through `server` with the version loaded; store and return the result.
    AdapterError for an unusable version or server; EvalSetError for a bad file; ConnectionError when
    the server stops answering."""
    from engine import audit
    from engine.adapter_versions import integrity_problem
    from engine.http_auth import bearer
    from engine.router.calibrate import EvalSetError, analyse, load_eval_set, score_eval_set

    with audit.audited("adapter.eval", adapter.name, refusals=(AdapterError, EvalSetError), server=server.id,
                       eval=str(eval_path)) as entry:
        if adapter.version is None:
            raise AdapterError(f"{adapter.name} is not a registered version: `fleetdeck adapters import` it first, so "
                               "the result belongs to weights that cannot change")
        problem = integrity_problem(adapter)
        if problem:
            raise AdapterError(problem)
        items = load_eval_set(Path(eval_path))
        ensure_loaded(server, adapter)
        latencies: list[float] = []
        target = EvalTarget(f"{server.base_url}/v1", adapter.name, confidence)
        scored = score_eval_set(target, items, headers=bearer(server.api_key), latencies_ms=latencies)
        cal = analyse(scored, target_accuracy)
        row = {
            "ts": time.time(), "adapter": adapter.name, "content_sha256": (adapter.metadata or {})["content_sha256"],
            "eval_path": str(Path(eval_path).resolve()), "eval_sha256": file_sha256(Path(eval_path)),
            "server": server.id, "confidence": confidence, "items": cal.items, "accuracy": cal.accuracy,
            "target_accuracy": target_accuracy, "threshold": cal.threshold, "escalation_rate": cal.escalation_rate,
            "ece": cal.ece, "auroc": cal.auroc, "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
        }
        with store.transaction() as conn:
            cur = conn.execute(f"INSERT INTO adapter_evals ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                               tuple(row.values()))
            row["id"] = cur.lastrowid
        entry.params.update(eval_sha256=row["eval_sha256"], accuracy=round(cal.accuracy, 4))
        return row


def evals_of(store: Any, adapter: str | None = None) -> list[dict[str, Any]]:
    """Evaluations, newest first (of one version, or all)."""
    if adapter is None:
        return store.query("SELECT * FROM adapter_evals ORDER BY ts DESC, id DESC")
    return store.query("SELECT * FROM adapter_evals WHERE adapter = ? ORDER BY ts DESC, id DESC", (adapter,))
