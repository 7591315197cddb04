"""Reading a range of a series, downsampled to at most ``max_points`` points.

Each output bucket keeps its minimum, its maximum and its first NaN (``extremes.Extremes``, the
bucket every downsampler shares; +-inf are the extremes themselves), so a spike, a dip or a
non-finite point is never averaged away. Long ranges are read from the rollups written at
ingest (``rollups.ROLLUP_LEVELS``), aligned so that every output bucket is a whole number of
rollup buckets: the extremes are exact, not approximate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import Connection

from .extremes import Extremes, bucket_of, emit_all
from .rollups import ROLLUP_LEVELS
from .sql import placeholder

#: Points each output bucket may contribute: its min, its max and its first NaN.
POINTS_PER_BUCKET = 3
#: ... and where the range holds no NaN: its min and its max.
FINITE_POINTS_PER_BUCKET = 2

#: Series whose bounds one statement reads in ``read_many``: two scalar subqueries and four
#: parameters each, well inside SQLite's 2,000 result columns and old 999-parameter limit.
BOUNDS_PER_STATEMENT = 200


@dataclass(slots=True)
class SeriesRead:
    steps: list[int]
    values: list[float]
    downsampled: bool


class SeriesReader:
    def __init__(self, dialect: str) -> None:
        ph = self._ph = placeholder(dialect)
        # Two scalar subqueries so each can use the primary key's order (one probe each).
        self._bounds_cols = (
            f"(SELECT min(step) FROM points WHERE series_id = {ph} AND step >= {ph}), "
            f"(SELECT max(step) FROM points WHERE series_id = {ph} AND step <= {ph})"
        )
        self._bounds_sql = "SELECT " + self._bounds_cols
        # Every point of several series in one range ({ids}: their placeholders).
        self._raw_many_sql = (
            "SELECT series_id, step, value FROM points WHERE series_id IN ({ids}) "
            f"AND step >= {ph} AND step <= {ph} ORDER BY series_id, step"
        )
        self._raw_sql = (
            f"SELECT step, value FROM points WHERE series_id = {ph} AND step >= {ph} AND step <= {ph} ORDER BY step"
        )
        # How many points a range holds, counting no further than the limit (an index range scan).
        self._fits_sql = (
            f"SELECT count(*) FROM (SELECT 1 FROM points WHERE series_id = {ph} AND step >= {ph} AND step <= {ph} "
            f"LIMIT {ph}) AS t"
        )
        self._rollup_sql = (
            "SELECT bucket, min_value, min_step, max_value, max_step, nan_step, first_step, last_step FROM rollups "
            f"WHERE series_id = {ph} AND level = {ph} AND bucket >= {ph} AND bucket <= {ph} ORDER BY bucket"
        )

    def read(self, conn: Connection, series_id: int, start: int | None, end: int | None, max_points: int) -> SeriesRead:
        lo_bound = -(2**63) if start is None else start
        hi_bound = 2**63 - 1 if end is None else end
        lo, hi = conn.exec_driver_sql(self._bounds_sql, (series_id, lo_bound, series_id, hi_bound)).one()
        if lo is None or hi is None or lo > hi:
            return SeriesRead([], [], False)
        return self._read_range(conn, series_id, lo, hi, max_points)

    def _read_range(self, conn: Connection, series_id: int, lo: int, hi: int, max_points: int) -> SeriesRead:
        """``read`` once the first and last stored steps of the range are known.

        A bucket shows two points (its min and max) unless it holds a NaN (then three): the
        range is cut into ``max_points // 2`` buckets, or ``// 3`` where a NaN is about, so the
        reply has at most ``max_points`` points and, for a series that moves, close to that."""
        width = hi - lo + 1
        if width <= max_points:
            return self._read_raw(conn, series_id, lo, hi, max_points)
        # A sparse range (few points over many steps) fits as it is: downsampling it would
        # drop points for nothing (two equal values in one bucket leave one).
        if conn.exec_driver_sql(self._fits_sql, (series_id, lo, hi, max_points + 1)).scalar() <= max_points:
            return self._read_raw(conn, series_id, lo, hi, max_points)
        for per_bucket in (FINITE_POINTS_PER_BUCKET, POINTS_PER_BUCKET):
            n_buckets = max(1, max_points // per_bucket)
            # The coarsest rollup level with at least one rollup bucket per output bucket.
            levels = [lv for lv in ROLLUP_LEVELS if (1 << lv) <= width // n_buckets]
            if not levels:
                return self._read_raw(conn, series_id, lo, hi, max_points)
            level = levels[-1]
            rows = conn.exec_driver_sql(self._rollup_sql, (series_id, level, lo >> level, hi >> level)).fetchall()
            if per_bucket == POINTS_PER_BUCKET or all(r[5] is None for r in rows):  # r[5]: the first NaN
                return self._from_rollups(conn, series_id, lo, hi, level, rows, n_buckets)
        raise AssertionError("unreachable")

    def read_many(
        self, conn: Connection, series_ids: list[int], start: int | None, end: int | None, max_points: int
    ) -> dict[int, SeriesRead]:
        """``read`` of many series at once, in a number of statements that does not grow with
        their count where it can: one per ``BOUNDS_PER_STATEMENT`` series for the bounds, one
        for the points of every series that fits whole (at most ``max_points`` steps wide),
        and ``read``'s own statements only for the series that need downsampling."""
        lo_bound = -(2**63) if start is None else start
        hi_bound = 2**63 - 1 if end is None else end
        out: dict[int, SeriesRead] = {}
        whole: list[int] = []
        long: list[tuple[int, int, int]] = []
        for k in range(0, len(series_ids), BOUNDS_PER_STATEMENT):
            chunk = series_ids[k : k + BOUNDS_PER_STATEMENT]
            sql = "SELECT " + ", ".join([self._bounds_cols] * len(chunk))
            params = tuple(p for sid in chunk for p in (sid, lo_bound, sid, hi_bound))
            row = conn.exec_driver_sql(sql, params).one()
            for i, sid in enumerate(chunk):
                lo, hi = row[2 * i], row[2 * i + 1]
                if lo is None or hi is None or lo > hi:
                    out[sid] = SeriesRead([], [], False)
                elif hi - lo + 1 <= max_points:  # fits whole: no downsampling, read below
                    whole.append(sid)
                else:
                    long.append((sid, lo, hi))
        if whole:
            got: dict[int, tuple[list, list]] = {sid: ([], []) for sid in whole}
            for k in range(0, len(whole), BOUNDS_PER_STATEMENT):
                chunk = whole[k : k + BOUNDS_PER_STATEMENT]
                sql = self._raw_many_sql.format(ids=", ".join([self._ph] * len(chunk)))
                for sid, s, v in conn.exec_driver_sql(sql, (*chunk, lo_bound, hi_bound)):
                    steps, values = got[sid]
                    steps.append(s)
                    values.append(math.nan if v is None else v)
            out.update({sid: SeriesRead(st, vs, False) for sid, (st, vs) in got.items()})
        for sid, lo, hi in long:
            out[sid] = self._read_range(conn, sid, lo, hi, max_points)
        return out

    def _read_raw(self, conn, series_id, lo, hi, max_points) -> SeriesRead:
        rows = conn.exec_driver_sql(self._raw_sql, (series_id, lo, hi)).fetchall()
        if len(rows) <= max_points:
            return SeriesRead([r[0] for r in rows], [math.nan if r[1] is None else r[1] for r in rows], False)
        per_bucket = POINTS_PER_BUCKET if any(r[1] is None for r in rows) else FINITE_POINTS_PER_BUCKET
        n_buckets = max(1, max_points // per_bucket)
        width = hi - lo + 1
        buckets: dict[int, Extremes] = {}
        for s, v in rows:
            b = bucket_of(s - lo, width, n_buckets)
            ex = buckets.get(b)
            if ex is None:
                ex = buckets[b] = Extremes()
            ex.add_point(s, v)
        return _finish(buckets)

    def _from_rollups(self, conn, series_id, lo, hi, level, rows, n_buckets) -> SeriesRead:
        """Output buckets of whole rollup buckets: rollup bucket ``b`` goes to output bucket
        ``bucket_of(b - blo, count, n_buckets)``, so the extremes are exact."""
        blo, bhi = lo >> level, hi >> level
        count = bhi - blo + 1
        buckets: dict[int, Extremes] = {}
        for b, min_v, min_s, max_v, max_s, nan_s, first, last in rows:
            k = bucket_of(b - blo, count, n_buckets)
            ex = buckets.get(k)
            if ex is None:
                ex = buckets[k] = Extremes()
            if first >= lo and last <= hi:
                ex.merge(min_v, min_s, max_v, max_s, nan_s)
            else:  # an edge bucket that the range cuts: its extremes may lie outside, read it
                a, z = max(lo, b << level), min(hi, ((b + 1) << level) - 1)
                for s, v in conn.exec_driver_sql(self._raw_sql, (series_id, a, z)):
                    ex.add_point(s, v)
        return _finish(buckets)


def _finish(buckets: dict[int, Extremes]) -> SeriesRead:
    steps, values = emit_all(buckets.values())
    return SeriesRead(steps, values, True)
