"""The one rollup definition (store/rollup.py): the tables it derives are the ones stores already have, and the
fold and the queries derived from it add up to what the rows say, however the rows are batched."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store.analytics import Totals, totals_by_task
from store.db import open_store
from store.ledger import write_rows
from store.ledger_row import LedgerRow, Reason, Route
from store.rollup import COUNT_NAMES, ROLLUP_FIELDS, ROLLUP_TABLES, Rollup

# The rollup tables as every store since schema version 2 has them (PRAGMA table_info: name, type, notnull,
# default, pk). The definition must derive exactly this, or a migration must add what it adds.
HISTORICAL = [
    ("bucket", "INTEGER", 1, None, 1), ("task", "TEXT", 1, None, 2), ("route", "TEXT", 1, None, 3),
    ("requests", "INTEGER", 1, "0", 0), ("escalated", "INTEGER", 1, "0", 0),
    ("esc_low_confidence", "INTEGER", 1, "0", 0), ("esc_slm_error", "INTEGER", 1, "0", 0),
    ("esc_forced", "INTEGER", 1, "0", 0), ("errors", "INTEGER", 1, "0", 0), ("prompt_tokens", "INTEGER", 1, "0", 0),
    ("completion_tokens", "INTEGER", 1, "0", 0), ("cost_usd", "REAL", 1, "0", 0),
    ("all_frontier_cost_usd", "REAL", 1, "0", 0), ("latency_ms_sum", "REAL", 1, "0", 0),
    ("latency_hist", "TEXT", 1, "'[]'", 0), ("confidence_hist", "TEXT", 1, "'[]'", 0),
    ("cost_estimated_usd", "REAL", 1, "0", 0),  # migration 11 (`since`), appended after the version-2 columns
]


def test_the_tables_derived_from_the_definition_are_the_ones_stores_already_have(tmp_path):
    store = open_store(tmp_path / "fd.db")
    for table in ROLLUP_TABLES.values():
        info = [tuple(r[1:]) for r in store.execute(f"PRAGMA table_info({table})")]
        assert info == HISTORICAL
    assert sorted(ROLLUP_FIELDS) == sorted(c[0] for c in HISTORICAL)  # written by name: the order is free
    # Every count the fold keeps is one the screens' totals add up.
    assert set(COUNT_NAMES) <= {f.name for f in fields(Totals)}


ROWS = st.builds(
    LedgerRow,
    id=st.just(""),
    ts=st.floats(min_value=1_790_000_000, max_value=1_790_000_000 + 3 * 86400),
    task=st.sampled_from(["a", "b"]),
    route=st.sampled_from(list(Route)),
    escalated=st.booleans(),
    reason=st.sampled_from(list(Reason)),
    status=st.sampled_from([200, 400, 502]),
    forced=st.booleans(),
    confidence=st.none() | st.floats(min_value=0, max_value=1),
    prompt_tokens=st.none() | st.integers(0, 5000),
    completion_tokens=st.none() | st.integers(0, 5000),
    latency_ms=st.none() | st.floats(min_value=0, max_value=60_000),
    cost_usd=st.floats(min_value=0, max_value=1),
    all_frontier_cost_usd=st.floats(min_value=0, max_value=1),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(ROWS, min_size=1, max_size=40), cut=st.integers(0, 40))
def test_folded_rollups_add_up_to_the_rows_however_they_are_batched(tmp_path_factory, rows, cut):
    rows = [LedgerRow(**{**{f.name: getattr(r, f.name) for f in fields(LedgerRow)}, "id": f"r{i}"})
            for i, r in enumerate(rows)]
    store = open_store(tmp_path_factory.mktemp("roll") / "fd.db")
    for batch in (rows[:cut], rows[cut:]):
        if batch:
            write_rows(store, batch)
    expected: dict[str, Rollup] = {}
    for r in rows:
        expected.setdefault(r.task, Rollup()).add(r)
    since, until = rows[0].ts - 4 * 86400, max(r.ts for r in rows) + 60
    got = totals_by_task(store, since, until)
    assert set(got) == set(expected)
    for task, want in expected.items():
        for name in COUNT_NAMES:
            assert getattr(got[task], name) == pytest.approx(getattr(want, name)), name
        assert got[task].slm_answered == sum(1 for r in rows if r.task == task and r.route == Route.SLM)
        assert sum(got[task].confidence_hist) == sum(want.confidence_hist)
        assert sum(sum(h) for h in got[task].latency_hist.values()) == sum(want.latency_hist)
    # Each resolution holds every row once.
    for table in ROLLUP_TABLES.values():
        stored = store.query(f"SELECT * FROM {table}")
        assert sum(r["requests"] for r in stored) == len(rows)
        assert sum(sum(json.loads(r["latency_hist"])) for r in stored) == sum(r.latency_ms is not None for r in rows)
