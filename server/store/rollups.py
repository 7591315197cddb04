"""Rollups: the per-bucket extremes of a series, kept at ingest so long reads stay cheap.

A rollup row holds one bucket (``step >> level``) of one series: its minimum, its maximum and
its first NaN (``extremes.Extremes``), plus the first and last step it holds. The writer
computes the rows of a batch's new points here, all levels at once, and merges them into the
stored rows with one upsert (``MERGE``): re-applying a bucket's extremes is idempotent.

    rollup_rows(7, [0, 1, 2], [2.3, 2.1, 2.2])
    # [(7, 6, 0, 2.1, 1, 2.3, 0, None, 0, 2), (7, 9, 0, ...), (7, 12, 0, ...)]
"""

from __future__ import annotations

from bisect import bisect_left
from itertools import islice
from operator import lt

from .extremes import Extremes

#: Rollup levels: a bucket at level L holds steps [b << L, (b + 1) << L): 64, 512, 4096 steps.
#: A read picks the coarsest level finer than its output buckets, so it touches at most ~8x
#: as many rows as it returns: a 1,000,000-step series read to 2,000 points reads ~2,000
#: level-9 rows, a 10^8-step one ~25,000 level-12 rows.
ROLLUP_LEVELS = (6, 9, 12)

COLUMNS = "series_id, level, bucket, min_value, min_step, max_value, max_step, nan_step, first_step, last_step"
#: PostgreSQL array types of the columns, in that order (the writer sends one array each).
PG_TYPES = ("bigint", "int", "bigint", "float8", "bigint", "float8", "bigint", "bigint", "bigint", "bigint")

_NEWER_MIN = (
    "(excluded.min_value IS NOT NULL AND (r.min_value IS NULL OR excluded.min_value < r.min_value"
    " OR (excluded.min_value = r.min_value AND excluded.min_step < r.min_step)))"
)
_NEWER_MAX = (
    "(excluded.max_value IS NOT NULL AND (r.max_value IS NULL OR excluded.max_value > r.max_value"
    " OR (excluded.max_value = r.max_value AND excluded.max_step < r.max_step)))"
)
#: Re-applying a bucket's extremes is idempotent: min/max/first NaN of a union.
#: "r" is the stored row, "excluded" the incoming one; every SET reads the old row.
MERGE = (
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


class _Bucket(Extremes):
    """A rollup bucket: the shared extremes, plus the first and last step it holds."""

    __slots__ = ("first", "last")

    def __init__(self, step: int) -> None:
        super().__init__()
        self.first = self.last = step


def _ascending(steps: list[int]) -> bool:
    """Whether ``steps`` is strictly ascending, checked in C: a contiguous range (what a
    training job sends) by one list comparison, anything else pairwise by ``map``."""
    n = len(steps)
    if steps[-1] - steps[0] == n - 1 and steps == list(range(steps[0], steps[0] + n)):
        return True
    return all(map(lt, steps, islice(steps, 1, None)))


def _rows_sorted(series_id: int, steps: list[int], values: list[float]) -> list[tuple] | None:
    """The common case, steps ascending and no NaN: every level's rows from slices, min/max in C.

    The same extremes as ``Extremes.add_point`` point by point (ties go to the smaller step:
    ``index`` finds the first), only faster; ``test_downsamplers_agree`` holds them equal.
    None when the batch is not that case (a NaN, or inf - inf, or steps out of order)."""
    total = sum(values)
    if total != total or not _ascending(steps):
        return None
    rows = []
    n = len(steps)
    whole = None  # the batch's own extremes, once a level holds it in one bucket
    for level in ROLLUP_LEVELS:
        b = steps[0] >> level
        if b == steps[-1] >> level:
            # One bucket holds the whole batch (the usual case from level 9 up: a batch
            # spans fewer steps than a bucket), and then every coarser level does too.
            if whole is None:
                lo, hi = min(values), max(values)
                whole = (lo, steps[values.index(lo)], hi, steps[values.index(hi)], None, steps[0], steps[-1])
            rows.append((series_id, level, b, *whole))
            continue
        i = 0
        while i < n:
            b = steps[i] >> level
            j = bisect_left(steps, (b + 1) << level, i + 1)
            chunk = values[i:j]
            lo, hi = min(chunk), max(chunk)
            rows.append(
                (
                    series_id,
                    level,
                    b,
                    lo,
                    steps[i + chunk.index(lo)],
                    hi,
                    steps[i + chunk.index(hi)],
                    None,
                    steps[i],
                    steps[j - 1],
                )
            )
            i = j
    return rows


def rollup_rows(series_id: int, steps: list[int], values: list[float]) -> list[tuple]:
    """Rollup rows (one per touched bucket and level) for newly stored points."""
    if not steps:
        return []
    fast = _rows_sorted(series_id, steps, values)
    if fast is not None:
        return fast
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
