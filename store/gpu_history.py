"""GPU sample history: written every few seconds, averaged into coarser rows as it ages.

Tiers (age -> resolution): under 1 h raw; then 1 min; after 1 day 10 min; after 7 days 1 h; gone
after 90 days. Sampled every 5 s, a GPU's month is about 720 raw + 1,380 + 864 + 552 rows instead of
518,400, so a month of a 64-GPU fleet stays a few MB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

from store.db import Store

TIERS: tuple[tuple[float, int], ...] = (
    (3600.0, 60),
    (86400.0, 600),
    (7 * 86400.0, 3600),
)
RETENTION_S = 90 * 86400.0


class _GpuLike(Protocol):
    node: str
    uuid: str
    index: int
    utilization_gpu_pct: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    temperature_c: float | None
    power_draw_w: float | None
    lost: bool


@dataclass(slots=True, frozen=True)
class Sample:
    ts: float
    util_pct: float | None
    mem_used_bytes: int | None
    mem_total_bytes: int | None


def record_samples(store: Store, ts: float, gpus: Iterable[_GpuLike]) -> int:
    rows = [
        (
            ts,
            g.node,
            g.uuid,
            g.index,
            g.utilization_gpu_pct,
            g.memory_used_bytes,
            g.memory_total_bytes,
            g.temperature_c,
            g.power_draw_w,
        )
        for g in gpus
        if not g.lost
    ]
    if rows:
        with store.transaction() as conn:
            conn.executemany(
                "INSERT INTO gpu_samples (ts, node, uuid, idx, util_pct, mem_used_bytes,"
                " mem_total_bytes, temp_c, power_w) VALUES (?,?,?,?,?,?,?,?,?)",
                rows,
            )
    return len(rows)


def history(store: Store, node: str, uuid: str, since: float) -> list[Sample]:
    rows = store.execute(
        "SELECT ts, util_pct, mem_used_bytes, mem_total_bytes FROM gpu_samples"
        " WHERE node = ? AND uuid = ? AND ts >= ? ORDER BY ts",
        (node, uuid, since),
    )
    return [Sample(*r) for r in rows]


def downsample(store: Store, now: float) -> int:
    """Average rows older than each tier's age into that tier's buckets. Returns rows removed."""
    removed = 0
    with store.transaction() as conn:
        conn.execute("DELETE FROM gpu_samples WHERE ts < ?", (now - RETENTION_S,))
        for age, res in TIERS:
            cutoff = now - age
            # Only whole buckets that lie entirely before the cutoff, so a bucket is averaged once.
            cutoff = (cutoff // res) * res
            before = conn.execute(
                "SELECT count(*) FROM gpu_samples WHERE res < ? AND ts < ?", (res, cutoff)
            ).fetchone()[0]
            if not before:
                continue
            inserted = conn.execute(
                """
                INSERT INTO gpu_samples (ts, node, uuid, idx, res, util_pct, mem_used_bytes,
                                         mem_total_bytes, temp_c, power_w)
                SELECT CAST(ts / ? AS INTEGER) * ?, node, uuid, MAX(idx), ?, AVG(util_pct),
                       CAST(AVG(mem_used_bytes) AS INTEGER), MAX(mem_total_bytes), AVG(temp_c),
                       AVG(power_w)
                FROM gpu_samples WHERE res < ? AND ts < ?
                GROUP BY node, uuid, CAST(ts / ? AS INTEGER)
                """,
                (res, res, res, res, cutoff, res),
            ).rowcount
            conn.execute("DELETE FROM gpu_samples WHERE res < ? AND ts < ?", (res, cutoff))
            removed += before - inserted
    return removed
