"""The one downsampling bucket: its minimum, its maximum and its first NaN, each with its step.

Every downsampler keeps these three (the rollups written at ingest, a range read, the
continual summary), so a spike, a dip or a non-finite point is never averaged away and all
of them agree on what a bucket shows. +-inf are ordinary extremes; NaN (stored as NULL) is
kept as its first step. Ties go to the smaller step, so the result does not depend on the
order the points arrive in, and merging buckets gives the extremes of their union.
"""

from __future__ import annotations

import math


class Extremes:
    """A bucket's extremes; ``add_point`` one point, ``merge`` another bucket, ``emit`` the result.

    >>> ex = Extremes()
    >>> for s, v in [(0, 1.0), (1, float("nan")), (2, -float("inf")), (3, 5.0)]:
    ...     ex.add_point(s, v)
    >>> out = {}; ex.emit(out); sorted(out.items())
    [(1, nan), (2, -inf), (3, 5.0)]
    """

    __slots__ = ("min_v", "min_s", "max_v", "max_s", "nan_s")

    def __init__(self) -> None:
        self.min_v = self.max_v = None
        self.min_s = self.max_s = self.nan_s = None

    def merge(self, min_v, min_s, max_v, max_s, nan_s) -> None:
        """Take in another bucket's extremes (``None`` where it has none)."""
        if min_v is not None and (
            self.min_v is None or min_v < self.min_v or (min_v == self.min_v and min_s < self.min_s)
        ):
            self.min_v, self.min_s = min_v, min_s
        if max_v is not None and (
            self.max_v is None or max_v > self.max_v or (max_v == self.max_v and max_s < self.max_s)
        ):
            self.max_v, self.max_s = max_v, max_s
        if nan_s is not None and (self.nan_s is None or nan_s < self.nan_s):
            self.nan_s = nan_s

    def add_point(self, s: int, v: float | None) -> None:
        """Take in one point; ``None`` (how the database stores NaN) and NaN count as NaN."""
        if v is None or v != v:
            self.merge(None, None, None, None, s)
        else:
            self.merge(v, s, v, s, None)

    def emit(self, out: dict[int, float]) -> None:
        """Put the bucket's points into ``out`` (step -> value): one to three of them."""
        if self.min_s is not None:
            out[self.min_s] = self.min_v
        if self.max_s is not None:
            out[self.max_s] = self.max_v
        if self.nan_s is not None:
            out[self.nan_s] = math.nan


def emit_all(buckets) -> tuple[list[int], list[float]]:
    """The points the ``buckets`` (an iterable of :class:`Extremes`) keep, in step order."""
    out: dict[int, float] = {}
    for ex in buckets:
        ex.emit(out)
    steps = sorted(out)
    return steps, [out[s] for s in steps]


def bucket_of(offset: int, width: int, n_buckets: int) -> int:
    """The bucket of the item ``offset`` places into a range of ``width`` cut into
    ``n_buckets`` buckets of equal width, to within one (``n_buckets`` at most; each
    non-empty when ``width >= n_buckets``). Every downsampler cuts its range this way, so a
    reply asked for ``n`` buckets has ``n`` of them, not the ``width / ceil(width / n)`` that
    whole-number widths give (1,000 points where 1,500 were asked).

    >>> [bucket_of(i, 10, 4) for i in range(10)]
    [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    """
    return offset * n_buckets // width
