"""Softmax Collapse (Prieto et al. 2025): float32 softmax turning exactly one-hot."""

from __future__ import annotations

import dataclasses
import math

from ._base import ChangeLog, Detector, finite, fmt, sentence, series_list

#: float32 absorbs x in 1 + x once x <= 2^-24 (half an ulp of 1.0). A sample whose softmax
#: denominator sum_j exp(z_j - max z) rounds to exactly 1 has zero loss and zero gradient;
#: that happens once its margin exceeds ln(2^24) = 16.64 nats.
SC_MARGIN_NATS = 24 * math.log(2)
#: Warn when the median margin is within 4 nats of that bound: the other classes then hold
#: less than e^-12.6 ~ 3e-6 of the probability, and in the runs of Prieto et al. logits keep
#: growing at a steady rate, so the bound is reached soon after.
SC_MARGIN_HEADROOM = 4.0
#: Prieto et al.'s figures mark Softmax Collapse at SC > 0.5 (half the samples collapsed) ...
SC_CRITICAL_FRACTION = 0.5
#: ... we warn at a tenth, while most samples still learn.
SC_WARN_FRACTION = 0.1
#: A tenth of the batch with exactly zero loss is the same early sign from the loss side.
ZERO_LOSS_WARN_FRACTION = 0.1
#: Each signal is the mean of its last 5 readings (50 steps at the hook's default of a reading
#: every 10 steps): a 64-sample batch measures a fraction with a standard error of up to 6
#: points, and one odd batch (a corrupted batch, a learning-rate bump) is not a collapse. A
#: median of 3 readings crossed 50% on a run whose fraction averaged 15%.
SC_SMOOTH_POINTS = 5
#: Hysteresis: once open, the episode resolves only when the fractions are below half their
#: warning levels and the median margin is 1 nat below its warning level ...
SC_CLEAR_FACTOR = 0.5
SC_MARGIN_HYSTERESIS = 1.0
#: ... for 3 readings in a row.
SC_CLEAR_POINTS = 3
#: The signs must hold for 30 steps before they are an alert: a learning-rate bump or a
#: corrupted batch saturates the logits for a few readings, and a run blowing up shows them
#: while its divergence is still being confirmed (the divergence then explains them).
SC_MIN_STEPS = 30
#: Collapse signs back within 200 steps of clearing continue the episode: a run hovering at the
#: warning level would otherwise open and close it again and again.
SC_REJOIN = 200


@dataclasses.dataclass(frozen=True)
class SoftmaxCollapseParams:
    """Settings of :class:`SoftmaxCollapseDetector`."""

    warn_fraction: float = SC_WARN_FRACTION
    critical_fraction: float = SC_CRITICAL_FRACTION
    margin_warn: float = SC_MARGIN_NATS - SC_MARGIN_HEADROOM  #: nats, median margin
    zero_loss_warn: float = ZERO_LOSS_WARN_FRACTION
    smooth_points: int = SC_SMOOTH_POINTS
    clear_points: int = SC_CLEAR_POINTS
    min_steps: int = SC_MIN_STEPS  #: steps the signs must hold before they are an alert
    rejoin_steps: int = SC_REJOIN  #: steps after a resolution within which the same episode resumes
    sc_series: str = "logits/sc_fraction"
    margin_series: str = "logits/median_margin"
    zero_loss_series: str = "logits/zero_loss_fraction"

    def __post_init__(self):
        if not 0 < self.warn_fraction <= self.critical_fraction <= 1:
            raise ValueError("softmax_collapse: need 0 < warn_fraction <= critical_fraction <= 1")
        if not 0 < self.zero_loss_warn <= 1 or self.margin_warn <= 0 or min(self.clear_points, self.smooth_points) < 1:
            raise ValueError(
                "softmax_collapse: need 0 < zero_loss_warn <= 1, margin_warn > 0, clear_points >= 1, smooth_points >= 1"
            )


class SoftmaxCollapseDetector(Detector):
    """One alert per collapse episode of the output softmax, key ``logits``.

    Warning when the SC fraction reaches ``warn_fraction``, the median margin
    z_y - logsumexp(z_others) reaches ``margin_warn`` (16.6 nats is the float32 bound), or the
    zero-loss fraction reaches ``zero_loss_warn``; critical when the collapsed fraction reaches
    ``critical_fraction``. Fractions are the mean of their last ``smooth_points`` readings
    (sustained, not one batch), the margin their median. With targets (a zero-loss series),
    the collapsed samples are those with exactly zero loss, and the SC fraction counts only as
    far as it is made of them: samples one-hot on a wrong class are logits blowing up, which
    the divergence detector reads. Hysteresis: the episode resolves when every signal is below
    half its warning level (the margin 1 nat below) for ``clear_points`` readings, and signs
    that come back within ``rejoin_steps`` continue it.

        det = SoftmaxCollapseDetector(SoftmaxCollapseParams(critical_fraction=0.9))
    """

    name = "softmax_collapse"
    Params = SoftmaxCollapseParams
    KEY = "logits"

    def accepts(self, series: str) -> bool:
        p = self.params
        return series == p.sc_series or series == p.margin_series or series == p.zero_loss_series

    def point(self, state: dict, series: str, step: int, value: float, log: ChangeLog) -> None:
        if value - value != 0.0:  # not finite
            return
        p = self.params
        window = series_list(state, "recent", series)
        recent = state["recent"]
        window.append(value)  # push(window, value, smooth_points), inlined
        if len(window) > p.smooth_points:
            del window[: len(window) - p.smooth_points]
        # mean() and median() inlined (the same sums and the same picks)
        w = recent.get(p.sc_series)
        sc = sum(w) / len(w) if w is not None else 0.0
        w = recent.get(p.margin_series)
        if w is not None:
            w = sorted(w)
            n = len(w)
            h = n // 2
            margin = w[h] if n % 2 else 0.5 * (w[h - 1] + w[h])
        else:
            margin = -math.inf
        w = recent.get(p.zero_loss_series)
        has_zero = w is not None
        zero = sum(w) / len(w) if has_zero else 0.0
        # The samples that stopped learning: with targets, those with exactly zero loss (one-hot
        # on their own class). A one-hot softmax on a wrong class has a huge loss and gradient:
        # that is logits blowing up (divergence), not Softmax Collapse.
        collapsed = min(sc, zero) if has_zero else sc
        eps = state.get("episodes")
        is_open = eps is not None and self.KEY in eps
        k = SC_CLEAR_FACTOR if is_open else 1.0
        m = SC_MARGIN_HYSTERESIS if is_open else 0.0
        by_sc = collapsed >= k * p.warn_fraction
        by_margin = margin >= p.margin_warn - m
        by_zero = has_zero and zero >= k * p.zero_loss_warn
        if not (by_sc or by_margin or by_zero):
            if is_open:  # (clear is a no-op with no episode open)
                self.clear(state, log, self.KEY, step, p.clear_points)
            return
        signs = []
        if by_sc:
            signs.append(f"{fmt(100 * sc)}% of samples have an exactly one-hot float32 softmax")
        if by_margin:
            signs.append(f"median margin {fmt(margin)} nats (float32 bound {fmt(SC_MARGIN_NATS)})")
        if by_zero:
            signs.append(f"{fmt(100 * zero)}% of samples have zero loss")
        critical = collapsed >= p.critical_fraction
        if critical:
            head = f"Softmax Collapse at step {step}: {fmt(100 * collapsed)}% of samples have stopped learning. "
        elif collapsed > 0:
            head = f"Approaching Softmax Collapse at step {step}: some samples have stopped learning. "
        else:
            head = f"Approaching Softmax Collapse at step {step}: the logits grow toward the float32 limit. "
        tail = "; those samples get zero loss and zero gradient" if collapsed > 0 else ""
        evidence = {
            "sc_fraction": sc,
            "collapsed_fraction": collapsed,
            "readings": len(recent.get(p.zero_loss_series if has_zero else p.sc_series, ())),
            "warn_fraction": p.warn_fraction,
            "critical_fraction": p.critical_fraction,
            "zero_loss_fraction": zero,
            "zero_loss_warn": p.zero_loss_warn,
            "margin_bound": SC_MARGIN_NATS,
            "margin_warn": p.margin_warn,
        }
        if finite(margin):
            evidence["median_margin"] = margin
        # The peak is the highest collapsed fraction; before any sample collapses, the widest margin.
        score = collapsed + 1e-3 * max(margin, 0.0) / SC_MARGIN_NATS
        self.hold(
            state,
            log,
            self.KEY,
            step,
            "critical" if critical else "warning",
            score,
            head + sentence("; ".join(signs)) + tail + ".",
            evidence,
        )
