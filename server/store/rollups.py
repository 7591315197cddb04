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


def _spans(steps: list[int]) -> tuple[list[tuple[int, int]], list[tuple[int, int, int, int]]] | None:
    """For ascending ``steps``: the index ranges ``[i, j)`` of the finest level's buckets, and
    every level's buckets as (level, bucket, first, end) over those ranges. None when the
    steps are not ascending.

    Only the steps decide them, so a batch whose series share their steps (a training job
    logs its metrics at the same steps) computes them once."""
    if not _ascending(steps):
        return None
    n = len(steps)
    finest = ROLLUP_LEVELS[0]
    b = steps[0] >> finest
    if b == steps[-1] >> finest:  # one bucket of the finest level holds the batch
        ranges, numbers = [(0, n)], [b]
    else:
        ranges, numbers = [], []
        i = 0
        while i < n:
            b = steps[i] >> finest
            j = bisect_left(steps, (b + 1) << finest, i + 1)
            ranges.append((i, j))
            numbers.append(b)
            i = j
    buckets = []
    for level in ROLLUP_LEVELS:
        shift = level - finest
        k = 0
        while k < len(numbers):
            b = numbers[k] >> shift
            end = k + 1
            while end < len(numbers) and numbers[end] >> shift == b:
                end += 1
            buckets.append((level, b, k, end))
            k = end
    return ranges, buckets


def batch_rows(items) -> list[tuple]:
    """``rollup_rows`` of each (series id, steps, values) of ``items``, all in one list.

    The same rows, with less Python: a series with the steps of the series before it reuses
    its buckets (compared in C); the extremes are taken once per bucket of the finest level
    and merged for the coarser ones (the earlier on a tie, as ``Extremes``); and a bucket's
    minimum and maximum come from ``sorted`` (its float comparison is several times faster
    than ``min``'s and ``max``'s), then ``index`` finds the first point equal to each, which
    is the one ``min`` and ``max`` return (so -0.0 and 0.0 keep their order too)."""
    rows: list[tuple] = []
    prev_steps: list[int] | None = None
    spans = None
    for series_id, steps, values in items:
        if not steps:
            continue
        total = sum(values)
        if total != total:  # a NaN (or inf - inf): point by point
            rows += rollup_rows(series_id, steps, values)
            continue
        if steps is not prev_steps and steps != prev_steps:
            prev_steps, spans = steps, _spans(steps)
        if spans is None:  # not ascending
            rows += rollup_rows(series_id, steps, values)
            continue
        ranges, buckets = spans
        n = len(values)
        ext = []
        for i, j in ranges:
            chunk = values[i:j] if i or j != n else values
            ordered = sorted(chunk)
            lo = chunk.index(ordered[0])
            hi = chunk.index(ordered[-1])
            ext.append((chunk[lo], steps[i + lo], chunk[hi], steps[i + hi], None, steps[i], steps[j - 1]))
        for level, b, k, end in buckets:
            if end - k == 1:
                rows.append((series_id, level, b, *ext[k]))
                continue
            lo_v, lo_s, hi_v, hi_s, _, first, _ = ext[k]
            for e in ext[k + 1 : end]:
                if e[0] < lo_v:
                    lo_v, lo_s = e[0], e[1]
                if e[2] > hi_v:
                    hi_v, hi_s = e[2], e[3]
            rows.append((series_id, level, b, lo_v, lo_s, hi_v, hi_s, None, first, ext[end - 1][6]))
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
