"""The batched ledger writer: nothing lost on close, rollups add up, old raw rows pruned."""

from __future__ import annotations

import json
import time

import pytest

from store.db import open_store
from store.ledger import LATENCY_BUCKETS_MS, LedgerRow, LedgerWriter, write_rows


def row(i: int, ts: float, **kw) -> LedgerRow:
    base = dict(id=f"r{i}", ts=ts, task="t", route="slm", escalated=False, reason="confident", status=200,
                confidence=0.95, prompt_tokens=10, completion_tokens=2, latency_ms=12.0, all_frontier_cost_usd=0.001)
    base.update(kw)
    return LedgerRow(**base)


def test_a_burst_is_written_whole_when_the_writer_closes(tmp_path):
    store = open_store(tmp_path / "fd.db")
    writer = LedgerWriter(store, batch_size=500, flush_every_s=0.05)
    now = time.time()
    for i in range(5000):
        writer.put(row(i, now + i * 0.01))
    writer.close()
    assert store.execute("SELECT count(*) FROM requests")[0][0] == 5000
    assert store.execute("SELECT SUM(requests) FROM rollup_minute")[0][0] == 5000


def test_rollups_fold_counts_costs_and_histograms(tmp_path):
    store = open_store(tmp_path / "fd.db")
    minute = 1_790_000_040.0
    write_rows(store, [row(1, minute + 1), row(2, minute + 2, escalated=True, route="frontier", reason="low_confidence",
                                                confidence=0.3, cost_usd=0.004, all_frontier_cost_usd=0.004, latency_ms=800.0)])
    write_rows(store, [row(3, minute + 3, escalated=True, route="frontier", reason="slm_timeout", confidence=None,
                           cost_usd=0.002, all_frontier_cost_usd=0.002, latency_ms=3000.0, status=200)])
    (f,) = store.query("SELECT * FROM rollup_minute WHERE route = 'frontier'")
    assert f["bucket"] == int(minute) and f["requests"] == 2 and f["escalated"] == 2
    assert f["esc_low_confidence"] == 1 and f["esc_slm_error"] == 1
    assert f["cost_usd"] == pytest.approx(0.006) and f["latency_ms_sum"] == pytest.approx(3800.0)
    hist = json.loads(f["latency_hist"])
    assert len(hist) == len(LATENCY_BUCKETS_MS) and sum(hist) == 2
    assert json.loads(f["confidence_hist"])[3] == 1


def test_raw_rows_past_retention_are_pruned_and_rollups_kept(tmp_path):
    store = open_store(tmp_path / "fd.db")
    old = time.time() - 40 * 86400
    write_rows(store, [row(1, old), row(2, time.time())])
    writer = LedgerWriter(store, retention_days=30, prune_every_s=0)
    writer.put(row(3, time.time()))
    writer.close()
    assert {r["id"] for r in store.query("SELECT id FROM requests")} == {"r2", "r3"}
    assert store.execute("SELECT SUM(requests) FROM rollup_minute")[0][0] == 3
