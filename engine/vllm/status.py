"""A server's state with its live figures: what the Servers screen shows, `serve ls --json` and `serve show`.

Rates need two scrapes: the screen keeps the previous scrape between refreshes; the command line
scrapes twice, `interval` seconds apart. Latency quantiles fall back to the server's lifetime
distribution when nothing finished between the two scrapes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from engine.io.http_auth import bearer
from engine.vllm.metrics import Scrape, ServerFigures, figures, parse
from engine.vllm.record import ServerState

if TYPE_CHECKING:
    from engine.vllm.record import ServerRecord
    from store.db import Store


@dataclass
class ServerStatus:
    rec: ServerRecord
    figures: ServerFigures | None = None
    scrape: Scrape | None = None
    loaded_adapters: list[str] = field(default_factory=list)
    error: str | None = None  # why the figures are missing although the server is ready

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "ServerStatus":
        """A status as a node's agent sends it (its figures read on that node)."""
        from engine.vllm.record import ServerRecord

        fig = doc.get("figures")
        known = {k: v for k, v in (fig or {}).items() if k in ServerFigures.__dataclass_fields__}
        return cls(ServerRecord.from_json(doc), ServerFigures(**known) if fig else None,
                   loaded_adapters=list(doc.get("loaded_adapters") or []), error=doc.get("figures_error"))

    def to_json(self) -> dict[str, Any]:
        doc = self.rec.to_json()
        doc["figures"] = asdict(self.figures) if self.figures is not None else None
        doc["predicted_kv_tokens"] = self.rec.predicted_kv_tokens
        allocated = self.figures.kv_tokens if self.figures is not None else None
        doc["kv_plan_disagreement"] = kv_disagreement(allocated, self.rec.predicted_kv_tokens)
        doc["loaded_adapters"] = self.loaded_adapters
        doc["figures_error"] = self.error
        return doc


# Allocated and planned KV capacity further apart than this factor (either way) is marked: the planner's model
# no longer describes this server (another vLLM version, other settings, another process on the GPU).
KV_DISAGREEMENT_FACTOR = 1.5


def kv_disagreement(allocated: int | None, planned: int | None) -> float | None:
    """How far vLLM's allocated KV tokens and the plan's are apart (>= 1, either direction) when that is more
    than KV_DISAGREEMENT_FACTOR; None when they agree or either is unknown."""
    if not allocated or not planned:
        return None
    ratio = max(allocated, planned) / min(allocated, planned)
    return ratio if ratio > KV_DISAGREEMENT_FACTOR else None


def scrape_server(rec: ServerRecord, timeout: float = 1.5) -> Scrape:
    r = httpx.get(f"{rec.base_url}/metrics", timeout=timeout, headers=bearer(rec.api_key), trust_env=False)
    r.raise_for_status()
    return parse(r.text, time.time())


def status_of(rec: ServerRecord, previous: Scrape | None = None, adapters: bool = False) -> ServerStatus:
    """Figures for a ready local server (from its /metrics, against the previous scrape)."""

    st = ServerStatus(rec)
    if rec.state != ServerState.READY:
        return st
    try:
        st.scrape = scrape_server(rec)
        st.figures = figures(st.scrape, previous)
    except (httpx.HTTPError, ValueError) as exc:
        st.error = f"cannot read {rec.base_url}/metrics: {exc}"
    if adapters:
        from engine.adapters.registry import loaded

        try:
            st.loaded_adapters = [m["id"] for m in loaded(rec.base_url, rec.api_key)]
        except (httpx.HTTPError, ValueError) as exc:
            st.error = st.error or f"cannot list loaded adapters: {exc}"
    return st


def statuses(store: Store, interval: float = 1.0, ids: list[str] | None = None) -> list[ServerStatus]:
    """Every recorded server (or those named), refreshed, with figures over `interval` seconds."""
    from engine.vllm import launcher

    recs = [launcher.refresh(store, r) for r in launcher.list_servers(store)]
    if ids is not None:
        recs = [r for r in recs if r.id in ids]
    first = {r.id: status_of(r).scrape for r in recs if r.state == ServerState.READY}
    if first and interval > 0:
        time.sleep(interval)
    return [status_of(r, first.get(r.id), adapters=True) for r in recs]
