"""Router analytics on ledgers whose answers were worked out by hand: report, drift, calibration, what-if."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from engine.router.calibrate import (
    EvalSetError,
    analyse,
    auroc,
    expected_calibration_error,
    load_eval_set,
    what_if,
)
from engine.router.config import load_router_config, set_task_threshold
from fleetdeck.cli import main
from store.analytics import CostFigures, TaskPolicy, drift_status, month_report, monthly_history, split_window, totals_by_task
from store.db import open_store
from store.ledger import LedgerRow, write_rows

SEP_2026 = datetime(2026, 9, 1, tzinfo=timezone.utc).timestamp()
NOV_2026 = datetime(2026, 11, 1, tzinfo=timezone.utc).timestamp()
HOUR, DAY = 3600, 86400


def rows_for(task: str, ts: float, slm: int, frontier: int, slm_allf: float, frontier_cost: float, start: int = 0) -> list[LedgerRow]:
    out = []
    for i in range(slm):
        out.append(LedgerRow(id=f"{task}-s{start + i}", ts=ts + i, task=task, route="slm", escalated=False,
                             reason="confident", status=200, confidence=0.95, all_frontier_cost_usd=slm_allf, latency_ms=20))
    for i in range(frontier):
        out.append(LedgerRow(id=f"{task}-f{start + i}", ts=ts + slm + i, task=task, route="frontier", escalated=True,
                             reason="low_confidence", status=200, confidence=0.3, cost_usd=frontier_cost,
                             all_frontier_cost_usd=frontier_cost, latency_ms=900))
    return out


@pytest.fixture
def september(tmp_path):
    store = open_store(tmp_path / "fd.db")
    # Spread over the month so every rollup level is involved.
    write_rows(store, rows_for("A", SEP_2026 + 3 * DAY + 5 * HOUR + 17, 8, 2, 1.00, 2.00))
    write_rows(store, rows_for("B", SEP_2026 + 20 * DAY + 61, 2, 0, 0.50, 0.0))
    return store


def test_a_past_months_report_matches_the_hand_computed_figures(september):
    # 720 h x $0.01 x 1 GPU = $7.20 of local SLM; frontier 2 x $2 = $4; all-frontier 8 x $1 + $4 + 2 x $0.50 = $13.
    doc = month_report(september, "2026-09", now=NOV_2026, gpu_hour_usd=0.01, gpus=1)
    assert doc.hours_elapsed == 720
    assert (doc.requests, doc.escalated) == (12, 2)
    assert doc.escalation_rate == pytest.approx(2 / 12)
    assert doc.slm_cost_usd == pytest.approx(7.20)
    assert doc.frontier_cost_usd == pytest.approx(4.00)
    assert doc.total_cost_usd == pytest.approx(11.20)
    assert doc.all_frontier_cost_usd == pytest.approx(13.00)
    assert doc.savings_usd == pytest.approx(1.80)
    assert doc.savings_pct == pytest.approx(100 * 1.8 / 13, abs=1e-3)
    assert doc.cost_per_million_requests_usd == pytest.approx(11.20 / 12 * 1e6, abs=0.01)
    assert doc.projected_total_cost_usd == pytest.approx(11.20)  # a past month projects to itself
    a, b = doc.tasks
    # The fixed SLM cost is shared by SLM-answered requests: A answered 8 of the 10.
    assert a.name == "A" and a.slm_cost_usd == pytest.approx(5.76) and a.total_cost_usd == pytest.approx(9.76)
    assert a.savings_usd == pytest.approx(2.24)
    assert b.slm_cost_usd == pytest.approx(1.44) and b.savings_usd == pytest.approx(-0.44)


def test_month_to_date_projects_to_month_end(tmp_path):
    store = open_store(tmp_path / "fd.db")
    write_rows(store, rows_for("A", NOV_2026 + DAY, 10, 2, 1.0, 2.0))
    now = NOV_2026 + 15 * DAY  # 360 of 720 hours
    doc = month_report(store, "2026-11", now=now, gpu_hour_usd=0.01, gpus=1)
    assert doc.slm_cost_usd == pytest.approx(3.60)
    # the fixed fleet for the whole month + frontier spend at the same pace
    assert doc.projected_total_cost_usd == pytest.approx(7.20 + 4.00 * 2)


def test_windows_are_split_into_days_hours_and_minutes():
    start = SEP_2026 + 2 * DAY + 3 * HOUR + 5 * 60
    pieces = split_window(start, start + 3 * DAY)
    tables = [p[0] for p in pieces]
    assert "rollup_day" in tables and "rollup_hour" in tables and "rollup_minute" in tables
    covered = sorted((lo, hi) for _, lo, hi in pieces)
    assert covered[0][0] == start and covered[-1][1] == start + 3 * DAY
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # no gap, no overlap


def test_totals_agree_across_rollup_levels(september):
    t = totals_by_task(september, SEP_2026, SEP_2026 + 30 * DAY)
    assert t["A"].requests == 10 and t["A"].escalated == 2 and t["B"].requests == 2
    assert t["A"].latency_pct("slm", 0.5) == 25 and t["A"].latency_pct("frontier", 0.95) == 1000
    assert t["A"].confidence_hist[9] == 8 and t["A"].confidence_hist[3] == 2


def drift_store(tmp_path, recent_escalated: int, recent_total: int = 40):
    store = open_store(tmp_path / "drift.db")
    now = NOV_2026 + 10 * DAY
    # Baseline: 100 requests a day for 7 days, 10% escalated.
    rows = []
    for d in range(7):
        rows += rows_for("t", now - HOUR - (d + 1) * DAY + 600, 90, 10, 0.01, 0.02, start=d * 1000)
    rows += rows_for("t", now - HOUR + 60, recent_total - recent_escalated, recent_escalated, 0.01, 0.02, start=99000)
    write_rows(store, rows)
    return store, now


@pytest.mark.parametrize("escalated, alert", [(8, False), (9, True), (4, False)])
def test_drift_fires_above_the_threshold_and_not_at_it(tmp_path, escalated, alert):
    store, now = drift_store(tmp_path, escalated)
    d = drift_status(store, "t", now, TaskPolicy(baseline_days=7, recent_hours=1, drift_threshold_pp=10))
    assert d.baseline_rate == pytest.approx(0.10)
    assert d.recent_rate == pytest.approx(escalated / 40)
    assert d.alert is alert  # 8/40 = 20% is exactly +10 pp: no alert; 9/40 = 22.5%: alert


def test_drift_needs_enough_recent_requests(tmp_path):
    store, now = drift_store(tmp_path, recent_escalated=10, recent_total=10)
    assert drift_status(store, "t", now).alert is False


def router_toml(tmp_path, slm_url="http://127.0.0.1:9/v1", threshold=0.85):
    p = tmp_path / "router.toml"
    p.write_text(f"""# my router
[pricing]
slm_gpu_hour_usd = 0.01
slm_gpus = 1

[[task]]
name = "t"
slm_base_url = "{slm_url}"
slm_model = "m"
threshold = {threshold}  # tuned in May
recent_hours = 1
baseline_days = 7
drift_threshold_pp = 10

[[task]]
name = "other"
slm_base_url = "{slm_url}"
slm_model = "m2"
threshold = 0.5
""")
    return p


def test_report_command_exits_3_on_drift_and_0_when_clear(tmp_path, capsys, monkeypatch):
    store, now = drift_store(tmp_path, recent_escalated=12)
    monkeypatch.setattr("time.time", lambda: now)
    cfg = router_toml(tmp_path)
    code = main(["report", "--json", "--config", str(cfg), "--store", str(tmp_path / "drift.db")])
    doc = json.loads(capsys.readouterr().out)
    assert code == 3 and doc["drift_alert"] is True
    task = next(t for t in doc["tasks"] if t["name"] == "t")
    assert task["drift_alert"] is True and task["recent_escalation_rate"] == pytest.approx(0.3)
    for key in ("month", "requests", "escalated", "escalation_rate", "slm_cost_usd", "frontier_cost_usd", "total_cost_usd",
                "all_frontier_cost_usd", "savings_usd", "savings_pct", "cost_per_million_requests_usd", "tasks"):
        assert key in doc
    (tmp_path / "x").mkdir()
    _, now2 = drift_store(tmp_path / "x", recent_escalated=4)
    monkeypatch.setattr("time.time", lambda: now2)
    assert main(["report", "--config", str(cfg), "--store", str(tmp_path / "x" / "drift.db")]) == 0
    assert "DRIFT" not in capsys.readouterr().out


def test_report_bad_month_and_missing_store(tmp_path, capsys):
    open_store(tmp_path / "fd.db").close()
    assert main(["report", "--month", "2026-13", "--store", str(tmp_path / "fd.db"), "--config", str(router_toml(tmp_path))]) == 2
    assert "YYYY-MM" in capsys.readouterr().err
    assert main(["report", "--store", str(tmp_path / "none.db")]) == 2


def test_monthly_history_covers_twelve_months(september):
    hist = monthly_history(september, NOV_2026 + DAY, 12, 0.01, 1)
    assert len(hist) == 12 and hist[-1]["month"] == "2026-11" and hist[0]["month"] == "2025-12"
    sep = next(h for h in hist if h["month"] == "2026-09")
    assert sep["requests"] == 12 and sep["frontier_cost_usd"] == pytest.approx(4.0)
    assert next(h for h in hist if h["month"] == "2026-10")["requests"] == 0


def test_calibration_recommends_the_known_best_threshold():
    # Confidence separates perfectly above 0.7: every answer at or above it is right, below it wrong.
    scored = [(0.95, True)] * 60 + [(0.8, True)] * 20 + [(0.7, True)] * 10 + [(0.6, False)] * 5 + [(0.3, False)] * 5
    cal = analyse(scored, target_accuracy=1.0)
    assert cal.threshold == 0.7 and cal.escalation_rate == pytest.approx(0.10) and cal.routed_accuracy == 1.0
    assert cal.accuracy == pytest.approx(0.90)
    assert cal.auroc == 1.0
    cal95 = analyse(scored, target_accuracy=0.95)
    assert cal95.threshold == 0.6 and cal95.escalation_rate == pytest.approx(0.05)


def test_ece_and_auroc_arithmetic():
    assert expected_calibration_error([(0.9, True)] * 9 + [(0.9, False)]) == pytest.approx(0.0)
    assert expected_calibration_error([(0.9, False)] * 10) == pytest.approx(0.9)
    assert auroc([(0.2, True), (0.8, False)]) == 0.0
    assert auroc([(0.5, True), (0.5, False)]) == 0.5
    assert auroc([(0.5, True)]) is None


def test_eval_set_bad_lines_are_listed_with_line_numbers(tmp_path):
    f = tmp_path / "eval.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "a"}], "expected": "x"}\n{oops\n'
                 '{"messages": [], "expected": "x"}\n{"messages": [{"role": "user", "content": "b"}]}\n')
    with pytest.raises(EvalSetError) as exc:
        load_eval_set(f)
    text = str(exc.value)
    assert "3 bad line(s)" in text and "line 2: invalid JSON" in text and "line 3" in text and "line 4: `expected`" in text


def test_calibrate_command_against_a_live_slm_and_apply(tmp_path, capsys):
    from tests.fakes.fake_openai import ServerThread, slm_app

    server = ServerThread(slm_app()).start()
    try:
        cfg = router_toml(tmp_path, slm_url=f"{server.url}/v1")
        ev = tmp_path / "eval.jsonl"
        lines = [{"messages": [{"role": "user", "content": "q lp=-0.01"}], "expected": "slm answer"}] * 8
        lines += [{"messages": [{"role": "user", "content": "q lp=-2.0"}], "expected": "something else"}] * 2
        ev.write_text("\n".join(json.dumps(x) for x in lines))
        code = main(["calibrate", "t", "--eval", str(ev), "--target-accuracy", "1.0", "--apply", "--json",
                     "--config", str(cfg), "--store", str(tmp_path / "fd.db")])
        doc = json.loads(capsys.readouterr().out)
        assert code == 0 and doc["applied"] is True
        assert doc["threshold"] == pytest.approx(0.99005, abs=1e-4) and doc["escalation_rate"] == pytest.approx(0.2)
        text = cfg.read_text()
        assert "threshold = 0.99  # tuned in May" in text and "# my router" in text  # comments kept
        assert load_router_config(cfg).task_by_name("other").threshold == 0.5
    finally:
        server.stop()


def test_set_threshold_refuses_unknown_task_and_bad_values(tmp_path):
    cfg = router_toml(tmp_path)
    with pytest.raises(KeyError):
        set_task_threshold(cfg, "nope", 0.5)
    with pytest.raises(ValueError):
        set_task_threshold(cfg, "t", 1.5)


def test_what_if_halved_frontier_prices():
    monthly = CostFigures(**CostFigures.of(requests=1000, escalated=100, slm=100.0, frontier=50.0, all_frontier=400.0))
    curve = [[0.5, 0.05, 0.90], [0.7, 0.10, 0.96], [0.9, 0.30, 0.99]]
    r = what_if(monthly, curve, current_threshold=0.7, target_accuracy=0.95, price_factor=0.5)
    assert r["monthly_cost_usd"] == pytest.approx(100 + 1000 * 0.1 * 0.25)  # $0.50 per escalation, halved
    assert r["best"]["threshold"] == 0.7
    r2 = what_if(monthly, curve, 0.7, 0.95, volume_factor=2.0)
    assert r2["monthly_cost_usd"] == pytest.approx(100 + 2000 * 0.1 * 0.5)
