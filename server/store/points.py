"""Points: bulk idempotent ingest and the per-bucket rollups that make long reads cheap.

The hot path talks to the DB-API cursor through ``exec_driver_sql``: building an ORM object
or a parameter dict per point would cost more than the database insert itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import Connection

#: Rollup levels: a bucket at level L holds steps [b << L, (b + 1) << L). 64, 1024 and 16384
#: steps: a read picks the coarsest level finer than its output buckets, so it touches at most
#: ~16x as many rollup rows as it returns, whatever the series length.
ROLLUP_LEVELS = (6, 10, 14)


@dataclass(frozen=True, slots=True)
class SeriesBatch:
    """Validated points of one series: steps unique within the batch, values as floats."""

    name: str
    steps: list[int]
    values: list[float]
    walls: list[float]


class _Bucket:
    __slots__ = ("min_v", "min_s", "max_v", "max_s", "nan_s", "first", "last")

    def __init__(self, step: int) -> None:
        self.min_v = self.max_v = None
        self.min_s = self.max_s = self.nan_s = None
        self.first = self.last = step


def _better_min(v, s, cur_v, cur_s) -> bool:
    return cur_v is None or v < cur_v or (v == cur_v and s < cur_s)


def _better_max(v, s, cur_v, cur_s) -> bool:
    return cur_v is None or v > cur_v or (v == cur_v and s < cur_s)


def rollup_rows(series_id: int, steps: list[int], values: list[float]) -> list[tuple]:
    """Rollup rows (one per touched bucket and level) for newly stored points."""
    finest = ROLLUP_LEVELS[0]
    buckets: dict[int, _Bucket] = {}
    for s, v in zip(steps, values):
        b = s >> finest
        bk = buckets.get(b)
        if bk is None:
            bk = buckets[b] = _Bucket(s)
        if s < bk.first:
            bk.first = s
        if s > bk.last:
            bk.last = s
        if v != v:
            if bk.nan_s is None or s < bk.nan_s:
                bk.nan_s = s
            continue
        if _better_min(v, s, bk.min_v, bk.min_s):
            bk.min_v, bk.min_s = v, s
        if _better_max(v, s, bk.max_v, bk.max_s):
            bk.max_v, bk.max_s = v, s
    rows = []
    level_buckets = buckets
    prev = finest
    for level in ROLLUP_LEVELS:
        if level != finest:
            coarse: dict[int, _Bucket] = {}
            shift = level - prev
            for b, fb in level_buckets.items():
                cb = coarse.get(b >> shift)
                if cb is None:
                    cb = coarse[b >> shift] = _Bucket(fb.first)
                cb.first = min(cb.first, fb.first)
                cb.last = max(cb.last, fb.last)
                if fb.nan_s is not None and (cb.nan_s is None or fb.nan_s < cb.nan_s):
                    cb.nan_s = fb.nan_s
                if fb.min_v is not None and _better_min(fb.min_v, fb.min_s, cb.min_v, cb.min_s):
                    cb.min_v, cb.min_s = fb.min_v, fb.min_s
                if fb.max_v is not None and _better_max(fb.max_v, fb.max_s, cb.max_v, cb.max_s):
                    cb.max_v, cb.max_s = fb.max_v, fb.max_s
            level_buckets, prev = coarse, level
        for b, bk in level_buckets.items():
            rows.append((series_id, level, b, bk.min_v, bk.min_s, bk.max_v, bk.max_s, bk.nan_s, bk.first, bk.last))
    return rows


def _merge_sql(ph: str) -> str:
    # Re-applying a bucket's extremes is idempotent: min/max/first NaN of a union.
    # "r" is the stored row, "excluded" the incoming one; every SET reads the old row.
    newer_min = "(excluded.min_value IS NOT NULL AND (r.min_value IS NULL OR excluded.min_value < r.min_value OR (excluded.min_value = r.min_value AND excluded.min_step < r.min_step)))"
    newer_max = "(excluded.max_value IS NOT NULL AND (r.max_value IS NULL OR excluded.max_value > r.max_value OR (excluded.max_value = r.max_value AND excluded.max_step < r.max_step)))"
    return (
        "INSERT INTO rollups AS r (series_id, level, bucket, min_value, min_step, max_value, max_step, nan_step, first_step, last_step) "
        f"VALUES ({', '.join([ph] * 10)}) "
        "ON CONFLICT (series_id, level, bucket) DO UPDATE SET "
        f"min_value = CASE WHEN {newer_min} THEN excluded.min_value ELSE r.min_value END, "
        f"min_step = CASE WHEN {newer_min} THEN excluded.min_step ELSE r.min_step END, "
        f"max_value = CASE WHEN {newer_max} THEN excluded.max_value ELSE r.max_value END, "
        f"max_step = CASE WHEN {newer_max} THEN excluded.max_step ELSE r.max_step END, "
        "nan_step = CASE WHEN r.nan_step IS NULL OR (excluded.nan_step IS NOT NULL AND excluded.nan_step < r.nan_step) THEN excluded.nan_step ELSE r.nan_step END, "
        "first_step = CASE WHEN excluded.first_step < r.first_step THEN excluded.first_step ELSE r.first_step END, "
        "last_step = CASE WHEN excluded.last_step > r.last_step THEN excluded.last_step ELSE r.last_step END"
    )


class PointWriter:
    """Writes validated batches inside the caller's transaction, on SQLite or PostgreSQL."""

    def __init__(self, dialect: str) -> None:
        self.postgres = dialect == "postgresql"
        ph = "%s" if self.postgres else "?"
        self._existing_sql = f"SELECT step FROM points WHERE series_id = {ph} AND step >= {ph} AND step <= {ph}"
        if self.postgres:
            # One statement for the whole batch: arrays travel as four parameters.
            self._insert_sql = (
                "INSERT INTO points (series_id, step, value, wall) "
                "SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::float8[], %s::float8[]) "
                "ON CONFLICT DO NOTHING"
            )
        else:
            self._insert_sql = "INSERT INTO points (series_id, step, value, wall) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING"
        self._merge_sql = _merge_sql(ph)

    def write(self, conn: Connection, items: list[tuple[int, SeriesBatch]]) -> list[tuple[int, SeriesBatch]]:
        """Store the points not stored yet; returns, per series, the points that were new."""
        new_items: list[tuple[int, SeriesBatch]] = []
        for series_id, sb in items:
            lo, hi = min(sb.steps), max(sb.steps)
            existing = conn.exec_driver_sql(self._existing_sql, (series_id, lo, hi)).fetchall()
            if existing:  # a resend or an overlap: first write wins, keep only what is new
                have = {r[0] for r in existing}
                keep = [i for i, s in enumerate(sb.steps) if s not in have]
                if not keep:
                    continue
                sb = SeriesBatch(sb.name, [sb.steps[i] for i in keep], [sb.values[i] for i in keep], [sb.walls[i] for i in keep])
            new_items.append((series_id, sb))
        if not new_items:
            return []
        rollups: list[tuple] = []
        if self.postgres:
            sids: list[int] = []
            steps: list[int] = []
            values: list[float | None] = []
            walls: list[float] = []
            for series_id, sb in new_items:
                sids.extend([series_id] * len(sb.steps))
                steps.extend(sb.steps)
                values.extend(None if v != v else v for v in sb.values)
                walls.extend(sb.walls)
                rollups.extend(rollup_rows(series_id, sb.steps, sb.values))
            conn.exec_driver_sql(self._insert_sql, (sids, steps, values, walls))
        else:
            rows: list[tuple] = []
            for series_id, sb in new_items:
                # sqlite3 binds NaN as NULL itself; spelled out for clarity of the encoding.
                rows.extend(zip([series_id] * len(sb.steps), sb.steps, [None if v != v else v for v in sb.values], sb.walls))
                rollups.extend(rollup_rows(series_id, sb.steps, sb.values))
            conn.exec_driver_sql(self._insert_sql, rows)
        conn.exec_driver_sql(self._merge_sql, rollups)
        return new_items


def nan_if_none(v: float | None) -> float:
    return math.nan if v is None else v
