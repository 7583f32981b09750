"""Evaluating an adapter version: a labelled set (the calibrate format) through a server with that version
loaded, recorded with the version's content hash and the eval file's hash, so a promotion gate can tell
an evaluation of these exact weights on this exact file from any other."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.adapters import registry as adapters
from engine.adapters.registry import Adapter, AdapterError, integrity_problem
from engine.audit import trail as audit
from engine.io.http_auth import bearer
from engine.router.calibrate import analyse, EvalSetError, load_eval_set, score_eval_set
from engine.vllm.launcher import list_servers, refresh
from engine.vllm.record import ServerState

if TYPE_CHECKING:
    from store.db import Store


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


def compatible_servers(store: Store, adapter: Adapter) -> list[Any]:
    """Ready servers fleetdeck runs that could serve this adapter (LoRA on, same base, rank that fits)."""
    found = []
    for rec in list_servers(store, include_ended=False):
        rec = refresh(store, rec)
        lora = rec.spec.get("lora", {})
        if rec.state == ServerState.READY and not adapters.compatibility_problems(
                adapter, rec.spec.get("model", ""), lora.get("enable", False), lora.get("max_lora_rank", 16)):
            found.append(rec)
    return found


def ensure_loaded(server: Any, adapter: Adapter) -> bool:
    """Load the version into the server unless it is there already; True when it was loaded now."""
    if adapter.name in {m["id"] for m in adapters.loaded(server.base_url, server.api_key)}:
        return False
    adapters.load_into(server, adapter)
    return True


def evaluate(store: Store, adapter: Adapter, server: Any, eval_path: Path, *, confidence: str = "mean_token",
             target_accuracy: float = 0.95) -> dict[str, Any]:
    """Run the eval set through `server` with the version loaded; store and return the result.
    AdapterError for an unusable version or server; EvalSetError for a bad file; ConnectionError when
    the server stops answering."""
    with audit.audited("adapter.eval", adapter.name, refusals=(AdapterError, EvalSetError), server=server.id,
                       eval=str(eval_path)) as entry:
        if adapter.version is None:
            raise AdapterError(f"{adapter.name} is not a registered version: `fleetdeck adapters import` it first, so "
                               "the result belongs to weights that cannot change")
        problem = integrity_problem(adapter)
        if problem:
            raise AdapterError(problem)
        load_eval_set(Path(eval_path))  # a bad file is refused before anything is loaded
        ensure_loaded(server, adapter)
        row = _score(store, server, adapter.name, (adapter.metadata or {})["content_sha256"], Path(eval_path),
                     confidence, target_accuracy)
        entry.params.update(eval_sha256=row["eval_sha256"], accuracy=round(row["accuracy"], 4))
        return row


def model_fingerprint(folder: Path) -> str:
    """What identifies a served model folder without reading gigabytes: its fleetdeck-model.json (merge and
    quantize write one, naming their inputs) or else its config.json, with the weight files' names and sizes."""
    h = hashlib.sha256()
    for name in ("fleetdeck-model.json", "config.json"):
        if (folder / name).is_file():
            h.update((folder / name).read_bytes())
            break
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def evaluate_served_model(store: Store, server: Any, eval_path: Path, *, confidence: str = "mean_token",
                          target_accuracy: float = 0.95) -> dict[str, Any]:
    """The same evaluation of the model a server serves itself (a merged or quantized model, no adapter);
    recorded under `model:SERVED_NAME` with the folder's fingerprint."""
    with audit.audited("adapter.eval", f"model:{server.served_name}", refusals=(AdapterError,), server=server.id,
                       eval=str(eval_path)) as entry:
        if server.state != ServerState.READY:
            raise AdapterError(f"{server.id} is {server.state}, not ready")
        folder = Path(str(server.spec.get("model", "")))
        fingerprint = model_fingerprint(folder) if folder.is_dir() else hashlib.sha256(str(folder).encode()).hexdigest()
        row = _score(store, server, server.served_name, fingerprint, Path(eval_path), confidence, target_accuracy,
                     label=f"model:{server.served_name}")
        entry.params.update(eval_sha256=row["eval_sha256"], accuracy=round(row["accuracy"], 4))
        return row


def _score(store: Store, server: Any, model: str, content_sha256: str, eval_path: Path, confidence: str,
           target_accuracy: float, label: str | None = None) -> dict[str, Any]:
    items = load_eval_set(eval_path)
    latencies: list[float] = []
    target = EvalTarget(f"{server.base_url}/v1", model, confidence)
    scored = score_eval_set(target, items, headers=bearer(server.api_key), latencies_ms=latencies)
    cal = analyse(scored, target_accuracy)
    row = {
        "ts": time.time(), "adapter": label or model, "content_sha256": content_sha256,
        "eval_path": str(eval_path.resolve()), "eval_sha256": file_sha256(eval_path), "server": server.id,
        "confidence": confidence, "items": cal.items, "accuracy": cal.accuracy, "target_accuracy": target_accuracy,
        "threshold": cal.threshold, "escalation_rate": cal.escalation_rate, "ece": cal.ece, "auroc": cal.auroc,
        "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
    }
    row["id"] = store.insert("adapter_evals", row)
    return row


def compare(model_row: dict[str, Any], adapter_row: dict[str, Any] | None, gate_target: float | None) -> tuple[bool, str]:
    """Whether a merged or quantized model may replace the adapter it came from, and why, in one line."""
    acc = model_row["accuracy"]
    parts = [f"{model_row['adapter']} {acc * 100:.1f}%"]
    ok = True
    if adapter_row is not None:
        delta = (acc - adapter_row["accuracy"]) * 100
        parts.append(f"{adapter_row['adapter']} {adapter_row['accuracy'] * 100:.1f}% ({delta:+.1f} pp)")
    if gate_target is not None:
        ok = acc + 1e-12 >= gate_target
        parts.append(f"gate {gate_target * 100:.1f}%: " + ("meets it" if ok else "LOSES ACCURACY PAST THE GATE"))
    elif adapter_row is not None:
        ok = acc + 1e-12 >= adapter_row["accuracy"]
        parts.append("no loss" if ok else "loses accuracy against the adapter (no gate given)")
    return ok, "; ".join(parts)


def evals_of(store: Store, adapter: str | None = None) -> list[dict[str, Any]]:
    """Evaluations, newest first (of one version, or all)."""
    if adapter is None:
        return store.query("SELECT * FROM adapter_evals ORDER BY ts DESC, id DESC")
    return store.query("SELECT * FROM adapter_evals WHERE adapter = ? ORDER BY ts DESC, id DESC", (adapter,))
