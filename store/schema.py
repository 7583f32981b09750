"""Forward migrations. Each entry takes the store from version N-1 to N; never edit a released one."""

from __future__ import annotations

from typing import Callable

import sqlite_utils


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


MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {
    1: _v1_gpu_history,
}
SCHEMA_VERSION = max(MIGRATIONS)
