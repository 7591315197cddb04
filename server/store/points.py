"""Points: bulk idempotent ingest and the per-bucket rollups that make long reads cheap.

The hot path talks to the DB-API cursor through ``exec_driver_sql``: building an ORM object
or a parameter dict per point would cost more than the database insert itself.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy import Connection

from .extremes import Extremes
from .sql import placeholder

#: Rollup levels: a bucket at level L holds steps [b << L, (b + 1) << L): 64, 512, 4096 steps.
#: A read picks the coarsest level finer than its output buckets, so it touches at most ~8x
#: as many rows as it returns: a 1,000,000-step series read to 2,000 points reads ~2,000
#: level-9 rows, a 10^8-step one ~25,000 level-12 rows.
ROLLUP_LEVELS = (6, 9, 12)


@dataclass(frozen=True, slots=True)
class SeriesBatch:
    """Validated points of one series: steps unique within the batch, values as floats."""

    name: str
    steps: list[int]
    values: list[float]
    walls: list[float]


class _Bucket(Extremes):
    """A rollup bucket: the shared extremes, plus the first and last step it holds."""

    __slots__ = ("first", "last")

    def __init__(self, step: int) -> None:
        super().__init__()
        self.first = self.last = step


def _finest_buckets_sorted(steps: list[int], values: list[float], finest: int) -> dict[int, _Bucket] | None:
    """The common case, steps ascending and no NaN: slice per bucket, min/max in C.

    The same extremes as ``Extremes.add_point`` point by point (ties go to the smaller step:
    ``index`` finds the first), only faster; ``test_downsamplers_agree`` holds them equal."""
    total = sum(values)
    if total != total or any(a >= b for a, b in zip(steps, steps[1:])):
        return None  # a NaN (or inf - inf), or steps out of order: take the general path
    buckets: dict[int, _Bucket] = {}
    i, n = 0, len(steps)
    while i < n:
        b = steps[i] >> finest
        j = bisect_left(steps, (b + 1) << finest, i + 1)
        chunk = values[i:j]
        bk = buckets[b] = _Bucket(steps[i])
        bk.last = steps[j - 1]
        bk.min_v = min(chunk)
        bk.min_s = steps[i + chunk.index(bk.min_v)]
        bk.max_v = max(chunk)
        bk.max_s = steps[i + chunk.index(bk.max_v)]
        i = j
    return buckets


def rollup_rows(series_id: int, steps: list[int], values: list[float]) -> list[tuple]:
    """Rollup rows (one per touched bucket and level) for newly stored points."""
    finest = ROLLUP_LEVELS[0]
    fast = _finest_buckets_sorted(steps, values, finest)
    buckets: dict[int, _Bucket] = fast if fast is not None else {}
    for s, v in zip(steps, values) if fast is None else ():
        b = s >> finest
        bk = buckets.get(b)
        if bk is None:
            bk = buckets[b] = _Bucket(s)
        if s < bk.first:
            bk.first = s
        if s > bk.last:
            bk.last = s
        bk.add_point(s, v)
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
                cb.merge(fb.min_v, fb.min_s, fb.max_v, fb.max_s, fb.nan_s)
            level_buckets, prev = coarse, level
        for b, bk in level_buckets.items():
            rows.append((series_id, level, b, bk.min_v, bk.min_s, bk.max_v, bk.max_s, bk.nan_s, bk.first, bk.last))
    return rows


_NEWER_MIN = (
    "(excluded.min_value IS NOT NULL AND (r.min_value IS NULL OR excluded.min_value < r.min_value"
    " OR (excluded.min_value = r.min_value AND excluded.min_step < r.min_step)))"
)
_NEWER_MAX = (
    "(excluded.max_value IS NOT NULL AND (r.max_value IS NULL OR excluded.max_value > r.max_value"
    " OR (excluded.max_value = r.max_value AND excluded.max_step < r.max_step)))"
)
# Re-applying a bucket's extremes is idempotent: min/max/first NaN of a union.
# "r" is the stored row, "excluded" the incoming one; every SET reads the old row.
_MERGE = (
    "ON CONFLICT (series_id, level, bucket) DO UPDATE SET "
    f"min_value = CASE WHEN {_NEWER_MIN} THEN excluded.min_value ELSE r.min_value END, "
    f"min_step = CASE WHEN {_NEWER_MIN} THEN excluded.min_step ELSE r.min_step END, "
    f"max_value = CASE WHEN {_NEWER_MAX} THEN excluded.max_value ELSE r.max_value END, "
    f"max_step = CASE WHEN {_NEWER_MAX} THEN excluded.max_step ELSE r.max_step END, "
    "nan_step = CASE WHEN r.nan_step IS NULL OR (excluded.nan_step IS NOT NULL AND excluded.nan_step < r.nan_step)"
    " THEN excluded.nan_step ELSE r.nan_step END, "
    "first_step = CASE WHEN excluded.first_step < r.first_step THEN excluded.first_step ELSE r.first_step END, "
    "last_step = CASE WHEN excluded.last_step > r.last_step THEN excluded.last_step ELSE r.last_step END"
)
_ROLLUP_COLS = "series_id, level, bucket, min_value, min_step, max_value, max_step, nan_step, first_step, last_step"
_ROLLUP_TYPES = ("bigint", "int", "bigint", "float8", "bigint", "float8", "bigint", "bigint", "bigint", "bigint")

#: Series whose largest step one statement looks up (SQLite allows 2,000 result columns).
MAX_LOOKUPS_PER_STATEMENT = 500

#: Series whose largest stored step this process remembers (see ``PointWriter.write``).
MAX_STEP_CACHE_SIZE = 100_000


def _pg_array(items) -> str:
    """A PostgreSQL array literal. psycopg adapts a list element by element (a regex per
    float); one string built by ``repr`` in C is ~10x cheaper for a 1,000-point batch."""
    return "{" + ",".join(["NULL" if x is None else repr(x) for x in items]) + "}"


def _pg_float_array(values) -> str:
    # NaN is stored as NULL; repr gives 'inf'/'-inf', which float8 input accepts.
    return "{" + ",".join(["NULL" if v != v else repr(v) for v in values]) + "}"


class PointWriter:
    """Writes validated batches inside the caller's transaction, on SQLite or PostgreSQL."""

    def __init__(self, dialect: str) -> None:
        self.postgres = dialect == "postgresql"
        ph = placeholder(dialect)
        self._existing_sql = f"SELECT step FROM points WHERE series_id = {ph} AND step >= {ph} AND step <= {ph}"
        self._max_sql = f"(SELECT max(step) FROM points WHERE series_id = {ph})"
        if self.postgres:
            # One statement per table for the whole batch: arrays travel as a few parameters.
            self._insert_sql = (
                "INSERT INTO points (series_id, step, value, wall) "
                "SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::float8[], %s::float8[]) "
                "ON CONFLICT DO NOTHING RETURNING series_id, step"
            )
            casts = ", ".join(f"%s::{t}[]" for t in _ROLLUP_TYPES)
            self._rollup_sql = f"INSERT INTO rollups AS r ({_ROLLUP_COLS}) SELECT * FROM unnest({casts}) {_MERGE}"
        else:
            self._insert_sql = (
                "INSERT INTO points (series_id, step, value, wall) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING"
            )
            self._rollup_sql = f"INSERT INTO rollups AS r ({_ROLLUP_COLS}) VALUES ({', '.join(['?'] * 10)}) {_MERGE}"
        # The largest step stored per series, as far as this process knows. A batch whose
        # steps all lie beyond it (a training job appending) needs no look-up of what exists.
        # Another worker may have stored more since (a resend that reached the other worker
        # first): on PostgreSQL the insert returns the rows it really stored, and only those
        # count as new (for the reply, the rollups and the detectors). SQLite has one writer
        # at a time (BEGIN IMMEDIATE), so there the look-up is always made: it is exact.
        self._max_step: OrderedDict[int, int] = OrderedDict()
        self._lock = threading.Lock()

    def _known_maxes(self, conn: Connection, series_ids: list[int], overlay: dict[int, int]) -> dict[int, int | None]:
        """The largest stored step of each series: from this transaction, the cache
        (PostgreSQL), else one statement for all the others."""
        known: dict[int, int | None] = {}
        ask: list[int] = []
        with self._lock:
            for sid in series_ids:
                if sid in overlay:  # written earlier in this same transaction
                    known[sid] = overlay[sid]
                elif self.postgres and sid in self._max_step:
                    known[sid] = self._max_step[sid]
                else:
                    ask.append(sid)
        for k in range(0, len(ask), MAX_LOOKUPS_PER_STATEMENT):
            chunk = ask[k : k + MAX_LOOKUPS_PER_STATEMENT]
            # One scalar subquery per series: each is a single probe of the primary key's end
            # (a GROUP BY would read every point of the series).
            sql = "SELECT " + ", ".join([self._max_sql] * len(chunk))
            known.update(zip(chunk, conn.exec_driver_sql(sql, tuple(chunk)).one()))
        return known

    def remember(self, maxes: dict[int, int]) -> None:
        """After commit: the largest stored step of each series written (from ``write``)."""
        with self._lock:
            for series_id, top in maxes.items():
                cur = self._max_step.get(series_id)
                self._max_step[series_id] = top if cur is None or top > cur else cur
                self._max_step.move_to_end(series_id)
            while len(self._max_step) > MAX_STEP_CACHE_SIZE:
                self._max_step.popitem(last=False)

    def write(
        self, conn: Connection, items: list[tuple[int, SeriesBatch]], overlay: dict[int, int]
    ) -> tuple[list[tuple[int, SeriesBatch]], dict[int, int]]:
        """Store the points not stored yet. Returns, per series, the points that were new, and
        the largest step now stored per series: pass it to ``remember`` once committed.
        ``overlay`` carries those largest steps between writes of one transaction."""
        new_items: list[tuple[int, SeriesBatch]] = []
        maxes: dict[int, int] = {}
        knowns = self._known_maxes(conn, [sid for sid, _ in items], overlay)
        for series_id, sb in items:
            lo, hi = min(sb.steps), max(sb.steps)
            known = knowns[series_id]
            maxes[series_id] = overlay[series_id] = hi if known is None or hi > known else known
            if known is not None and lo <= known:
                existing = conn.exec_driver_sql(self._existing_sql, (series_id, lo, hi)).fetchall()
                if existing:  # a resend or an overlap: first write wins, keep only what is new
                    have = {r[0] for r in existing}
                    keep = [i for i, s in enumerate(sb.steps) if s not in have]
                    if not keep:
                        continue
                    sb = SeriesBatch(
                        sb.name, [sb.steps[i] for i in keep], [sb.values[i] for i in keep], [sb.walls[i] for i in keep]
                    )
            new_items.append((series_id, sb))
        if not new_items:
            return [], maxes
        if self.postgres:
            sids: list[int] = []
            steps: list[int] = []
            values: list[float] = []
            walls: list[float] = []
            for series_id, sb in new_items:
                sids.extend([series_id] * len(sb.steps))
                steps.extend(sb.steps)
                values.extend(sb.values)
                walls.extend(sb.walls)
            stored = conn.exec_driver_sql(
                self._insert_sql, (_pg_array(sids), _pg_array(steps), _pg_float_array(values), _pg_array(walls))
            ).fetchall()
            if len(stored) != len(steps):  # another worker stored some first: those are not new
                new_items = _only(new_items, set(map(tuple, stored)))
            rollups = [r for series_id, sb in new_items for r in rollup_rows(series_id, sb.steps, sb.values)]
            if rollups:
                conn.exec_driver_sql(self._rollup_sql, tuple(_pg_array(col) for col in zip(*rollups)))
        else:
            rows: list[tuple] = []
            for series_id, sb in new_items:
                # sqlite3 binds NaN as NULL itself; spelled out for clarity of the encoding.
                rows.extend(
                    zip([series_id] * len(sb.steps), sb.steps, [None if v != v else v for v in sb.values], sb.walls)
                )
            conn.exec_driver_sql(self._insert_sql, rows)
            conn.exec_driver_sql(
                self._rollup_sql,
                [r for series_id, sb in new_items for r in rollup_rows(series_id, sb.steps, sb.values)],
            )
        return new_items, maxes


def _only(items: list[tuple[int, SeriesBatch]], stored: set[tuple[int, int]]) -> list[tuple[int, SeriesBatch]]:
    """The points of ``items`` whose (series id, step) is in ``stored``."""
    out = []
    for series_id, sb in items:
        keep = [i for i, s in enumerate(sb.steps) if (series_id, s) in stored]
        if keep:
            out.append(
                (
                    series_id,
                    SeriesBatch(
                        sb.name, [sb.steps[i] for i in keep], [sb.values[i] for i in keep], [sb.walls[i] for i in keep]
                    ),
                )
            )
    return out
