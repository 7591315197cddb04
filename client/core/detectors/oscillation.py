"""Oscillation: a loss going up and down every step with a growing swing.

Gradient descent with a learning rate past 2/lambda_max flips the iterate along the top
Hessian direction every step (Cohen et al. 2021; Lewkowycz et al. 2020). On a loss that is
not exactly quadratic along that direction the loss itself alternates -- up, down, up --
and the swing grows until the run diverges or settles in a period-2 cycle above its old
level. AUTOTRAINER (Zhang et al., ICSE 2021) lists oscillating loss among the training
problems it repairs, by lowering the learning rate.

Minibatch noise alternates too, but only about two steps in three (the differences of
independent values change sign with probability 2/3), and its swing has no growing trend.
So the rule asks for the period-2 structure (nearly every difference changing sign over a
window) *and* a growing swing, and it holds for a few points before it is an alert.
"""

from __future__ import annotations

import dataclasses
from operator import mul, sub

from ._base import ChangeLog, Detector, fmt, median, push, series_list

#: Series lists whose sign changes are kept between points (see ``OscillationDetector._alternation``).
_KEPT = 256

#: Differences judged: the last 16. A run of 15 sign changes out of 16 differences has a
#: chance of about 2% under independent noise (p = 2/3 per change); the alert also needs the
#: growth and ``min_steps`` of persistence. In the corpus's healthy minibatch runs the longest
#: stretch of alternating differences is 19 steps, with no growing swing.
OSC_WINDOW = 16
#: Share of consecutive differences in the window that change sign: 14 of 15.
OSC_ALTERNATING = 0.9
#: The swing (median |difference| relative to the loss) over the newer half of the window
#: must be 3x what it was before the window (the median over the ``OSC_LOOKBACK`` points
#: before it). Past the edge the swing grows by |1 - lr*lambda| per step until the loss starts
#: to alternate: in the corpus's softmax regressions it grew 100-1000x in the 30 steps before
#: the alternation showed. A steady period-2 cycle that has gone on for a while is no news.
OSC_GROWTH = 3.0
OSC_LOOKBACK = 32
#: ... or the alternation is new: the ``OSC_LOOKBACK`` points before the window changed
#: direction at most half the time (noise: two times in three; a steady cycle: always).
OSC_FRESH = 0.5
#: ... and at least 0.1% of the loss: a converged full-batch run wobbles at float32
#: resolution (1e-7 relative) with no meaning.
OSC_MIN_AMPLITUDE = 1e-3
#: Period-2 structure: points two steps apart agree far better than neighbours do. Past the
#: edge the loss is c + (-1)^t A_t with a smooth A_t, so |L_t - L_(t-2)| is a small part of
#: |L_t - L_(t-1)| (about 0.15 at a growth of 1.2x a step, ~0 in a steady cycle); for noise
#: both are differences of independent values and their medians are equal. The median of
#: the two-step differences must be at most half that of the one-step differences.
OSC_PERIOD2_RATIO = 0.5
#: Points the condition must hold before it is an alert.
OSC_MIN_STEPS = 8
#: Points in a row without alternation before the episode resolves. While it keeps
#: alternating (a steady period-2 cycle), the episode stays open.
OSC_CLEAR_POINTS = 8
#: Oscillation returning within 100 steps of clearing is the same episode.
OSC_REJOIN = 100


@dataclasses.dataclass(frozen=True)
class OscillationParams:
    """Settings of :class:`OscillationDetector`."""

    series: tuple = ("loss",)  #: series to watch, each on its own (an eval metric too)
    lr_series: str = "lr"  #: quoted in the message; the rule does not need it
    window: int = OSC_WINDOW  #: differences judged, in points
    alternating_fraction: float = OSC_ALTERNATING  #: share of differences that must change sign
    growth_ratio: float = OSC_GROWTH  #: swing of the newer half of the window vs the swing before the window
    period2_ratio: float = OSC_PERIOD2_RATIO  #: two-step differences vs one-step ones, at most (period-2 structure)
    min_amplitude: float = OSC_MIN_AMPLITUDE  #: smallest swing, as a share of the loss
    min_steps: int = OSC_MIN_STEPS  #: steps the condition must hold before it is an alert
    clear_points: int = OSC_CLEAR_POINTS
    rejoin_steps: int = OSC_REJOIN  #: steps after a resolution within which the same episode resumes

    def __post_init__(self):
        if self.window < 4 or self.clear_points < 1:
            raise ValueError("oscillation: need window >= 4 and clear_points >= 1")
        if not 0 < self.alternating_fraction <= 1 or self.growth_ratio < 1:
            raise ValueError("oscillation: need 0 < alternating_fraction <= 1 and growth_ratio >= 1")


class OscillationDetector(Detector):
    """A loss going up and down every step with a growing swing: the learning rate is too high.

    The series alternates up/down at nearly every point and its swing grows. Key: the
    series. Warning.

        det = OscillationDetector(OscillationParams(series=("loss", "eval/loss")))
    """

    name = "oscillation"
    Params = OscillationParams

    def __init__(self, params: OscillationParams | None = None) -> None:
        super().__init__(params)
        # id(series list) -> [the list, its length, its last value, sign changes in its last
        # window]: see ``_alternation``. Outside the state, which stays the JSON it was.
        self._changes: dict[int, list] = {}

    def _alternation(self, s: list, size: int) -> float:
        """``_alternation(s[-size:])`` (``s`` holds more than ``size`` values), kept up to date
        from one point to the next: the sign changes of the window are those of the window
        before it, less the first one leaving it, plus the one the new value makes (the same
        products, so the same count). The count is kept by the list's identity, and used only
        when the list is the one counted a point ago (its value before last is the object that
        was its last then, its length one more or the same, full): a state loaded from JSON,
        or a list cleared and filled again, is counted afresh."""
        cache = self._changes
        entry = cache.get(id(s))
        n = len(s)
        if entry is not None and entry[0] is s and s[-2] is entry[2] and (n == entry[1] + 1 or n == entry[1]):
            count = entry[3]
            a, b, c = s[-3], s[-2], s[-1]
            if (b - a) * (c - b) < 0:
                count += 1
            a, b, c = s[-size - 1], s[-size], s[-size + 1]
            if (b - a) * (c - b) < 0:
                count -= 1
            entry[1], entry[2], entry[3] = n, s[-1], count
        else:
            window = s[-size:]
            diffs = list(map(sub, window[1:], window))
            count = sum([x < 0 for x in map(mul, diffs, diffs[1:])])
            if len(cache) >= _KEPT:
                cache.clear()
            cache[id(s)] = [s, n, s[-1], count]
        return count / max(1, size - 2)

    def accepts(self, series: str) -> bool:
        return series in self.params.series or series == self.params.lr_series

    def point(self, state: dict, series: str, step: int, value: float, log: ChangeLog) -> None:
        p = self.params
        if series == p.lr_series:
            if value - value == 0.0:  # finite
                state["lr"] = value
            return
        s = series_list(state, "series", series)
        if value - value != 0.0:  # not finite
            s.clear()  # a gap: judge afresh from the next finite points
            return
        push(s, value, p.window + 2 + OSC_LOOKBACK)
        if len(s) < p.window + 2 + OSC_LOOKBACK // 2:
            return
        if self._alternation(s, p.window + 2) < p.alternating_fraction and not self.is_open(state, series):
            return  # the usual case, minibatch noise or a smooth descent: nothing more to compute
        past, s = s[: -p.window - 2], s[-p.window - 2 :]
        scale = max(abs(v) for v in s)
        if scale <= 0:
            return
        diffs = [(b - a) / scale for a, b in zip(s, s[1:])]
        skips = [abs(b - a) / scale for a, b in zip(s, s[2:])]
        changes = round(_alternation(s) * (len(diffs) - 1))
        alternating = changes / (len(diffs) - 1)
        mags = [abs(d) for d in diffs]
        swing = median(mags)
        period2 = median(skips) / swing if swing > 0 else 1.0
        # The swing of the alternating part: half the second difference is 2A for c + (-1)^t A
        # (as is the first difference), while a trend or a slow rise and fall adds little.
        bends = _bends(s, scale)
        newer = median(bends[len(bends) // 2 :])
        older = median(_bends(past, scale)) if len(past) >= 3 else 0.0
        growth = newer / older if older > 0 else float("inf") if newer > 0 else 0.0
        swinging = alternating >= p.alternating_fraction and period2 <= p.period2_ratio and newer >= p.min_amplitude
        # New: the points before the window alternated at most half the time. A loss that rose
        # and fell back (a catapult) before it settled into alternation shows no growth over
        # those points, yet its alternation is new; an old steady cycle is not.
        fresh = len(past) >= 3 and _alternation(past) <= OSC_FRESH
        if swinging and (growth >= p.growth_ratio or fresh or self.is_open(state, series)):
            lr = state.get("lr")
            lr_words = f"the learning rate {fmt(lr)}" if lr is not None else "the learning rate"
            self.hold(
                state,
                log,
                series,
                step,
                "warning",
                newer,
                f"The {series} series is oscillating at step {step}: it has gone up and down at {changes} of the last "
                f"{len(diffs) - 1} steps with a growing swing, now {fmt(100 * newer)}% of its value. "
                f"This is gradient descent past the edge of stability: {lr_words} is too high for the "
                f"curvature of the loss (sharpness above 2/lr). Lower the learning rate. "
                f"The swing is {fmt(growth)}x what it was before these steps.",
                {
                    "series": series,
                    "alternating": alternating,
                    "period2": period2,
                    "swing": newer,
                    "swing_before": older,
                    "growth": growth,
                    "lr": lr,
                    "alternating_fraction": p.alternating_fraction,
                    "growth_ratio": p.growth_ratio,
                    "min_amplitude": p.min_amplitude,
                },
            )
        else:
            self.clear(state, log, series, step, p.clear_points)


def _bends(values: list, scale: float) -> list:
    """Half the second differences of ``values``, relative to ``scale``, as magnitudes."""
    return [abs(a - 2 * b + c) / (2 * scale) for a, b, c in zip(values, values[1:], values[2:])]


def _alternation(values: list) -> float:
    """Share of consecutive differences of ``values`` that change sign."""
    diffs = list(map(sub, values[1:], values))  # b - a for consecutive a, b
    return sum([x < 0 for x in map(mul, diffs, diffs[1:])]) / max(1, len(diffs) - 1)
