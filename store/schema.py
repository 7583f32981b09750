"""Forward migrations. Each entry takes the store from version N-1 to N; never edit a released one."""

from __future__ import annotations

from typing import Callable

import sqlite_utils

from store.rollup import ROLLUP_TABLES, rollup_column_sql, rollup_columns_sql

__all__ = ["MIGRATIONS", "ROLLUP_TABLES", "SCHEMA_VERSION"]


def _v1_gpu_history(db: sqlite_utils.Database) -> None:
    # res: seconds one row stands for (0 = a raw sample); rows are averaged into coarser ones with age.
    db.execute(
        """
        CREATE TABLE gpu_samples (
            ts REAL NOT NULL,
            node TEXT NOT NULL,
            uuid TEXT NOT NULL,
            idx INTEGER NOT NULL,
            res INTEGER NOT NULL DEFAULT 0,
            util_pct REAL,
            mem_used_bytes INTEGER,
            mem_total_bytes INTEGER,
            temp_c REAL,
            power_w REAL
        )
        """
    )
    db.execute("CREATE INDEX gpu_samples_gpu_ts ON gpu_samples (node, uuid, ts)")
    db.execute("CREATE INDEX gpu_samples_res_ts ON gpu_samples (res, ts)")


def _v2_router_ledger(db: sqlite_utils.Database) -> None:
    # One row per proxied request, answered or failed. Text only when the task opts in.
    db.execute(
        """
        CREATE TABLE requests (
            id TEXT PRIMARY KEY,
            ts REAL NOT NULL,
            task TEXT NOT NULL,
            route TEXT NOT NULL,             -- slm | frontier | none (failed)
            escalated INTEGER NOT NULL,
            reason TEXT NOT NULL,            -- confident | low_confidence | slm_timeout | slm_error | no_logprobs | forced_frontier | forced_slm
            forced INTEGER NOT NULL DEFAULT 0,
            status INTEGER NOT NULL,
            error TEXT,
            confidence REAL,
            slm_model TEXT,
            frontier_model TEXT,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            slm_prompt_tokens INTEGER,
            slm_completion_tokens INTEGER,
            frontier_prompt_tokens INTEGER,
            frontier_completion_tokens INTEGER,
            slm_latency_ms REAL,
            frontier_latency_ms REAL,
            latency_ms REAL,
            cost_usd REAL NOT NULL DEFAULT 0,           -- frontier spend of this request
            all_frontier_cost_usd REAL NOT NULL DEFAULT 0,  -- had it gone to the frontier model
            stream INTEGER NOT NULL DEFAULT 0,
            prompt_text TEXT,
            completion_text TEXT
        )
        """
    )
    db.execute("CREATE INDEX requests_ts ON requests (ts)")
    db.execute("CREATE INDEX requests_task_ts ON requests (task, ts)")
    # Rollups per task and route at three resolutions, written together with the rows: charts of the
    # last hour read minutes, of the last month hours, of the last year days, so no query scans more
    # than a few tens of thousands of rows however busy the proxy is.
    # The value columns come from the one rollup definition (store/rollup.py), as they were at this version.
    columns = ",\n                ".join(rollup_columns_sql(2))
    for table in ROLLUP_TABLES.values():
        db.execute(
            f"""
            CREATE TABLE {table} (
                bucket INTEGER NOT NULL,          -- unix time of the bucket's start, UTC
                task TEXT NOT NULL,
                route TEXT NOT NULL,
                {columns},
                PRIMARY KEY (bucket, task, route)
            ) WITHOUT ROWID
            """
        )
        db.execute(f"CREATE INDEX {table}_task ON {table} (task, bucket)")


def _v3_calibrations(db: sqlite_utils.Database) -> None:
    db.execute(
        """
        CREATE TABLE calibrations (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            task TEXT NOT NULL,
            eval_path TEXT NOT NULL,
            items INTEGER NOT NULL,
            accuracy REAL,              -- the small model alone, every item
            target_accuracy REAL NOT NULL,
            threshold REAL,             -- recommended; NULL when no threshold meets the target
            escalation_rate REAL,
            ece REAL,
            auroc REAL,
            curve TEXT NOT NULL         -- JSON: [[threshold, escalation_rate, accuracy], ...]
        )
        """
    )
    db.execute("CREATE INDEX calibrations_task ON calibrations (task, ts)")


def _v4_managed_processes(db: sqlite_utils.Database) -> None:
    # Servers and jobs fleetdeck started, so a restarted dashboard re-attaches. A pid whose process
    # create time differs from the recorded one is not ours.
    db.execute(
        """
        CREATE TABLE managed (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,            -- server | job
            name TEXT NOT NULL,            -- profile or job name
            node TEXT NOT NULL,
            pid INTEGER,
            create_time REAL,
            argv TEXT NOT NULL,            -- JSON list
            env TEXT NOT NULL DEFAULT '{}',-- JSON: the variables fleetdeck set
            gpus TEXT NOT NULL DEFAULT '', -- comma-separated indices
            port INTEGER,
            log_path TEXT NOT NULL,
            spec TEXT NOT NULL DEFAULT '{}',  -- JSON: the profile or job spec
            state TEXT NOT NULL,           -- starting | ready | crashed | stopped | running | finished | failed | cancelled
            reason TEXT,
            started_at REAL NOT NULL,
            ended_at REAL,
            exit_code INTEGER,
            predicted_kv_tokens INTEGER
        )
        """
    )
    db.execute("CREATE INDEX managed_kind ON managed (kind, started_at)")


def _v5_engine_process(db: sqlite_utils.Database) -> None:
    # vLLM's API server can outlive its engine process; the engine's pid and create time let a refresh
    # tell a server that answers /health from one that can still serve.
    db.execute("ALTER TABLE managed ADD COLUMN engine_pid INTEGER")
    db.execute("ALTER TABLE managed ADD COLUMN engine_create_time REAL")


def _v6_sanitized_rows(db: sqlite_utils.Database) -> None:
    # A ledger row with a field SQLite could not take as given is stored made safe, and says so.
    db.execute("ALTER TABLE requests ADD COLUMN sanitized INTEGER NOT NULL DEFAULT 0")


def _v7_audit(db: sqlite_utils.Database) -> None:
    # The operators' audit trail (engine/audit/trail.py): append-only, hash-chained. The triggers refuse
    # changes through SQLite; the chain shows any made around it. Pruning may delete only records
    # older than a cut-off it first records in audit_prune (itself append-only).
    db.execute(
        """
        CREATE TABLE audit (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            utc TEXT NOT NULL,
            actor TEXT,
            origin TEXT,
            key_fingerprint TEXT,
            on_behalf_of TEXT,
            source TEXT NOT NULL,
            node TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            params TEXT NOT NULL,
            outcome TEXT NOT NULL,
            reason TEXT,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX audit_ts ON audit (ts)")
    db.execute("CREATE TABLE audit_prune (cutoff REAL NOT NULL, at REAL NOT NULL)")
    db.execute("CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN "
               "SELECT RAISE(ABORT, 'audit records are append-only'); END")
    db.execute("CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit "
               "WHEN old.ts >= (SELECT COALESCE(MAX(cutoff), 0) FROM audit_prune) BEGIN "
               "SELECT RAISE(ABORT, 'audit records are append-only (only retention removes old ones)'); END")
    db.execute("CREATE TRIGGER audit_prune_no_update BEFORE UPDATE ON audit_prune BEGIN "
               "SELECT RAISE(ABORT, 'audit records are append-only'); END")
    db.execute("CREATE TRIGGER audit_prune_no_delete BEFORE DELETE ON audit_prune BEGIN "
               "SELECT RAISE(ABORT, 'audit records are append-only'); END")


def _v8_adapter_lifecycle(db: sqlite_utils.Database) -> None:
    # An adapter version's evaluations (bound to its content hash and the eval file's hash, so a gate
    # never passes on another file or other weights), and each task's promotions and rollbacks.
    db.execute(
        """
        CREATE TABLE adapter_evals (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            adapter TEXT NOT NULL,          -- NAME@vN, the served name
            content_sha256 TEXT NOT NULL,
            eval_path TEXT NOT NULL,
            eval_sha256 TEXT NOT NULL,
            server TEXT,
            confidence TEXT NOT NULL,       -- the confidence method scored
            items INTEGER NOT NULL,
            accuracy REAL NOT NULL,
            target_accuracy REAL NOT NULL,
            threshold REAL,                 -- the cheapest meeting the target when escalating; NULL if none
            escalation_rate REAL,
            ece REAL,
            auroc REAL,
            p50_ms REAL,
            p95_ms REAL
        )
        """
    )
    db.execute("CREATE INDEX adapter_evals_adapter ON adapter_evals (adapter, ts)")
    db.execute(
        """
        CREATE TABLE promotions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            task TEXT NOT NULL,
            kind TEXT NOT NULL,             -- promote | rollback
            from_model TEXT,
            to_model TEXT NOT NULL,
            eval_id INTEGER,
            actor TEXT
        )
        """
    )
    db.execute("CREATE INDEX promotions_task ON promotions (task, ts)")


RUNTIME_KEYS = ("_workdir", "_slurm", "_adapter_path", "_output_path", "_final_loss", "_gpu_peak_reserved_bytes",
                "_gpu_peak_allocated_bytes")


def _v9_runtime_apart_from_spec(db: sqlite_utils.Database) -> None:
    # What a run has (its folder, Slurm's hold on it, what a job produced) was kept inside its spec under
    # underscore keys; it moves to columns of its own and the spec is again only what was asked.
    for column in ("workdir", "slurm", "outputs"):
        db["managed"].add_column(column, str)  # type: ignore[union-attr]
    db.execute(
        """
        UPDATE managed SET
            workdir = json_extract(spec, '$._workdir'),
            slurm = json_extract(spec, '$._slurm'),
            outputs = CASE WHEN kind = 'job' THEN json_object(
                'adapter_path', json_extract(spec, '$._adapter_path'),
                'output_path', json_extract(spec, '$._output_path'),
                'final_loss', json_extract(spec, '$._final_loss'),
                'gpu_peak_reserved_bytes', json_extract(spec, '$._gpu_peak_reserved_bytes'),
                'gpu_peak_allocated_bytes', json_extract(spec, '$._gpu_peak_allocated_bytes')) END
        """
    )
    paths = ", ".join(f"'$.{k}'" for k in RUNTIME_KEYS)
    db.execute(f"UPDATE managed SET spec = json_remove(spec, {paths})")


def _v10_streamed_slm(db: sqlite_utils.Database) -> None:
    # A streamed request's small-model timing (issue 28): when its first token came (ms after the request
    # was sent upstream), the window its confidence was decided on (first_token | first_N_tokens |
    # whole_answer), and which SLM bound fired, if one did (first_token | total).
    db["requests"].add_column("slm_ttft_ms", float)  # type: ignore[union-attr]
    db["requests"].add_column("decision_window", str)  # type: ignore[union-attr]
    db["requests"].add_column("slm_bound", str)  # type: ignore[union-attr]


def _v11_estimated_cost(db: sqlite_utils.Database) -> None:
    # A frontier call whose usage never came back (the client left and the answer never arrived, a stream cut
    # before its usage chunk): its cost is estimated from the prompt and marked, and the rollups keep how much
    # of the frontier spend is estimated.
    db.execute("ALTER TABLE requests ADD COLUMN cost_estimated INTEGER NOT NULL DEFAULT 0")
    for table in ROLLUP_TABLES.values():
        db.execute(f"ALTER TABLE {table} ADD COLUMN {rollup_column_sql('cost_estimated_usd')}")


MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {
    1: _v1_gpu_history,
    2: _v2_router_ledger,
    3: _v3_calibrations,
    4: _v4_managed_processes,
    5: _v5_engine_process,
    6: _v6_sanitized_rows,
    7: _v7_audit,
    8: _v8_adapter_lifecycle,
    9: _v9_runtime_apart_from_spec,
    10: _v10_streamed_slm,
    11: _v11_estimated_cost,
}
SCHEMA_VERSION = max(MIGRATIONS)
