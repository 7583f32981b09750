"""The proxy's Prometheus metrics: per-request counters fed from each ledger row, and the ledger writer's own
counts read at scrape time."""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from store.ledger import LedgerWriter
from store.ledger_row import LedgerRow


class _LedgerCollector(Collector):
    """The ledger writer's own counts, read at scrape time: a row held, made safe or lost is never silent.
    Every row the proxy recorded is in exactly one of stored, journaled, unjournaled (memory only), lost."""

    def __init__(self, ledger: LedgerWriter) -> None:
        self.ledger = ledger

    def collect(self) -> Iterator[Metric]:
        w = self.ledger
        c = w.counts()
        yield CounterMetricFamily("fleetdeck_ledger_rows_recorded", "Ledger rows this run recorded (answered requests)",
                                  value=c.recorded)
        yield CounterMetricFamily("fleetdeck_ledger_rows_written", "Ledger rows of this run stored", value=c.stored)
        yield GaugeMetricFamily("fleetdeck_ledger_rows_journaled",
                                "Rows not yet stored whose whole line is in the journal", value=c.journaled)
        yield GaugeMetricFamily("fleetdeck_ledger_rows_unjournaled",
                                "Rows not yet stored and not in the journal (memory only)", value=c.unjournaled)
        yield CounterMetricFamily("fleetdeck_ledger_rows_lost", "Rows in neither the store nor the journal",
                                  value=c.lost)
        yield CounterMetricFamily("fleetdeck_ledger_rows_sanitized", "Rows stored with unstorable fields made safe",
                                  value=w.sanitized)
        yield CounterMetricFamily("fleetdeck_ledger_rows_replayed", "Rows written from an earlier run's journal",
                                  value=c.replayed)
        yield CounterMetricFamily("fleetdeck_ledger_journal_lines_unreadable",
                                  "Lines of an earlier run's journal that were not a row (torn), skipped",
                                  value=c.unreadable)
        yield CounterMetricFamily("fleetdeck_ledger_write_failures", "Failed ledger writes", value=w.write_failures)
        yield CounterMetricFamily("fleetdeck_ledger_journal_failures", "Failed journal writes, truncates and syncs",
                                  value=w.journal_failures)
        yield GaugeMetricFamily("fleetdeck_ledger_rows_pending", "Rows held while the store cannot be written",
                                value=c.pending)


class ProxyMetrics:
    def __init__(self, ledger: LedgerWriter | None = None) -> None:
        self.registry = CollectorRegistry()
        if ledger is not None:
            self.registry.register(_LedgerCollector(ledger))
        self.requests = Counter("fleetdeck_requests", "Requests by task and route", ["task", "route"], registry=self.registry)
        self.escalations = Counter("fleetdeck_escalations", "Escalations by task and reason", ["task", "reason"], registry=self.registry)
        self.cost = Counter("fleetdeck_cost_usd", "Frontier spend in USD", ["task", "route"], registry=self.registry)
        self.errors = Counter("fleetdeck_errors", "Requests answered with an error status", ["task", "status"], registry=self.registry)
        self.latency = Histogram(
            "fleetdeck_request_latency_seconds", "End-to-end latency", ["task", "route"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )

    def observe(self, row: LedgerRow) -> None:
        self.requests.labels(row.task, row.route).inc()
        if row.escalated:
            self.escalations.labels(row.task, row.reason).inc()
        if row.cost_usd:
            self.cost.labels(row.task, row.route).inc(row.cost_usd)
        if row.status >= 400:
            self.errors.labels(row.task, str(row.status)).inc()
        if row.latency_ms is not None:
            self.latency.labels(row.task, row.route).observe(row.latency_ms / 1000.0)
