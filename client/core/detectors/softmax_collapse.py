"""Softmax Collapse (Prieto et al. 2025): float32 softmax turning exactly one-hot."""

from __future__ import annotations

import dataclasses
import math

from ._base import ChangeLog, Detector, finite, fmt, median, push, sentence

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
#: Each signal is the median of its last 3 readings: one odd batch (a corrupted batch with
#: huge inputs has a few one-hot samples) is not a collapse.
SC_SMOOTH_POINTS = 3
#: Steps in a row below every warning level before the episode resolves.
SC_CLEAR_POINTS = 3


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
    zero-loss fraction reaches ``zero_loss_warn``; critical at SC fraction
    ``critical_fraction``. Each signal is the median of its last ``smooth_points`` readings.
    Resolves when all three are back below their warning levels.

        det = SoftmaxCollapseDetector(SoftmaxCollapseParams(critical_fraction=0.9))
    """

    name = "softmax_collapse"
    Params = SoftmaxCollapseParams
    KEY = "logits"

    def accepts(self, series: str) -> bool:
        p = self.params
        return series == p.sc_series or series == p.margin_series or series == p.zero_loss_series

    def point(self, state: dict, series: str, step: int, value: float, log: ChangeLog) -> None:
        if not finite(value):
            return
        p = self.params
        recent = state.setdefault("recent", {})
        push(recent.setdefault(series, []), value, p.smooth_points)
        sc = median(recent[p.sc_series]) if p.sc_series in recent else 0.0
        margin = median(recent[p.margin_series]) if p.margin_series in recent else -math.inf
        zero = median(recent[p.zero_loss_series]) if p.zero_loss_series in recent else 0.0
        signs = []
        if sc >= p.warn_fraction:
            signs.append(f"{fmt(100 * sc)}% of samples have an exactly one-hot float32 softmax")
        if margin >= p.margin_warn:
            signs.append(f"median margin {fmt(margin)} nats (float32 bound {fmt(SC_MARGIN_NATS)})")
        if zero >= p.zero_loss_warn:
            signs.append(f"{fmt(100 * zero)}% of samples have zero loss")
        if not signs:
            self.clear(state, log, self.KEY, step, p.clear_points)
            return
        critical = sc >= p.critical_fraction
        if critical:
            head = f"Softmax Collapse at step {step}: {fmt(100 * sc)}% of samples have stopped learning. "
        elif sc > 0 or zero > 0:
            head = f"Approaching Softmax Collapse at step {step}: some samples have stopped learning. "
        else:
            head = f"Approaching Softmax Collapse at step {step}: the logits grow toward the float32 limit. "
        tail = "; those samples get zero loss and zero gradient" if sc > 0 or zero > 0 else ""
        evidence = {
            "sc_fraction": sc,
            "warn_fraction": p.warn_fraction,
            "critical_fraction": p.critical_fraction,
            "zero_loss_fraction": zero,
            "zero_loss_warn": p.zero_loss_warn,
            "margin_bound": SC_MARGIN_NATS,
            "margin_warn": p.margin_warn,
        }
        if finite(margin):
            evidence["median_margin"] = margin
        # The peak is the highest SC fraction; before any sample collapses, the widest margin.
        score = sc + 1e-3 * max(margin, 0.0) / SC_MARGIN_NATS
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
