"""The batched ledger writer: nothing lost on close, a full store or SIGKILL, a bad row stored made safe,
rollups add up, old raw rows pruned."""

from __future__ import annotations

import json
import time

import pytest

from store.db import open_store
from store.ledger import LATENCY_BUCKETS_MS, LedgerRow, LedgerWriter, journal_path, write_rows
from tests.helpers import kill_a_writer_with_queued_rows, wait_for


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


# --- no row lost silently ------------------------------------------------------------------------------
def test_one_unstorable_row_is_stored_made_safe_and_takes_no_neighbour_with_it(tmp_path):
    store = open_store(tmp_path / "fd.db")
    writer = LedgerWriter(store, flush_every_s=0.05)
    now = time.time()
    for i in range(22):
        # A lone surrogate (a streamed answer cut mid-character, stored with store_text) and a huge integer.
        writer.put(row(i, now, completion_text="ok \ud800 cut" if i == 7 else "ok",
                       prompt_tokens=2**70 if i == 11 else 10))
    writer.close()
    rows = {r["id"]: r for r in store.query("SELECT id, completion_text, prompt_tokens, sanitized FROM requests")}
    assert len(rows) == 22
    assert rows["r7"]["sanitized"] == 1 and rows["r7"]["completion_text"] == "ok \\ud800 cut"
    assert rows["r11"]["sanitized"] == 1 and rows["r11"]["prompt_tokens"] is None
    assert sum(r["sanitized"] for r in rows.values()) == 2 and writer.sanitized == 2
    assert store.execute("SELECT SUM(requests) FROM rollup_minute")[0][0] == 22


def test_a_full_store_holds_rows_and_writes_them_when_space_returns(tmp_path, caplog):
    """SQLite's own "database or disk is full" (max_page_count caps the file as a full disk would)."""
    store = open_store(tmp_path / "fd.db")
    pages = store.execute("PRAGMA page_count")[0][0]
    store.execute(f"PRAGMA max_page_count = {pages}")
    writer = LedgerWriter(store, flush_every_s=0.02, retry_every_s=0.05)
    now = time.time()
    with caplog.at_level("WARNING", logger="fleetdeck.ledger"):
        for i in range(1500):
            writer.put(row(i, now, completion_text="x" * 200))
        assert wait_for(lambda: writer.pending == 1500 and writer.write_failures > 0)
        assert "full" in (writer.last_error or "")
        assert sum("ledger write failed" in r.getMessage() for r in caplog.records) == 1  # logged once, not per retry
        store.execute("PRAGMA max_page_count = 1073741823")  # space returns
        assert wait_for(lambda: writer.pending == 0)
    writer.close()
    assert store.execute("SELECT count(DISTINCT id) FROM requests")[0][0] == 1500
    assert store.execute("SELECT SUM(requests) FROM rollup_minute")[0][0] == 1500
    assert writer.lost == 0 and writer.last_error is None


def test_rows_of_a_killed_writer_are_written_once_by_the_next_one(tmp_path):
    db = tmp_path / "fd.db"
    kill_a_writer_with_queued_rows(db, 50)
    store = open_store(db)
    assert store.execute("SELECT count(*) FROM requests")[0][0] == 0
    writer = LedgerWriter(store)
    assert writer.replayed == 50
    writer.close()
    again = LedgerWriter(store)  # the journal was consumed: nothing is written twice
    again.close()
    assert again.replayed == 0
    assert store.execute("SELECT count(*) FROM requests")[0][0] == 50
    assert store.execute("SELECT SUM(requests) FROM rollup_minute")[0][0] == 50
    assert not journal_path(store).exists()
