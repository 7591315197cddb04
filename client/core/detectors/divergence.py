"""Divergence: non-finite loss or gradients, and the early signs that come before them."""

from __future__ import annotations

import dataclasses
import math

from ._base import ChangeLog, Detector, fmt, sentence

#: Lightning's SpikeDetection flags a loss above ``rtol=2.0`` times its running mean; a
#: smoothed loss at twice its running minimum is running away, not wobbling.
RUNAWAY_RATIO = 2.0
#: ... and it must also have given back all the progress made since the start of the run (be
#: back at its starting level): small-batch losses double from batch to batch, and a
#: converged loss moving from 0.001 to 0.003 is no divergence either.
RUNAWAY_PROGRESS = 1.0
#: The loss now is the median of its last 8 points: up to 3 bad batches (a corrupted batch
#: is a loss spike, not divergence) cannot move it.
SMOOTH_POINTS = 8
#: The running minimum is taken over the median of the last 32 points: the minimum of a
#: noisy short median is biased low (small-batch losses swing by 2x from batch to batch),
#: which would make every swing look like a doubling.
LEVEL_POINTS = 32
#: Gradient norm against the median of its last 64 values: warm-up and catapults move the
#: norm by a few times, a diverging run by orders of magnitude (Cohen et al. 2021 show the
#: loss and gradient growing geometrically once sharpness stays past 2/lr).
GRAD_WINDOW = 64
GRAD_RATIO = 10.0
#: The gradient norm is smoothed with the median of the last 3 points (one wild batch is not
#: enough, two in a row are).
GRAD_SMOOTH_POINTS = 3
#: Points of a series before its baseline is trusted.
DIVERGENCE_WARMUP = 16
#: Steps in a row the condition must hold before the warning: transient excursions that heal
#: themselves -- a learning-rate bump, a catapult at the edge of stability (Lewkowycz et al.
#: 2020) -- last up to ~15 steps in our runs, while a divergence keeps growing.
RUNAWAY_PATIENCE = 20
#: A signal that has fallen below half its peak since it crossed the threshold is healing,
#: not running away: the patience count starts again. A divergence never falls back.
RECOVERING_FRACTION = 0.5
#: A loss (or gradient norm) a thousand times its running minimum (rolling median) has
#: diverged by any measure, NaN or not: the warning escalates to critical. (A cross-entropy
#: that fell to 0.5 and is now 500 no longer trains; a loss at 1e21 stayed a "warning" before.)
CRITICAL_RATIO = 1000.0
#: Steps in a row without the condition before an episode is resolved.
CLEAR_POINTS = 5


#: A divergence signal that comes back within 50 steps of clearing is the same episode going on.
DIVERGENCE_REJOIN = 50


@dataclasses.dataclass(frozen=True)
class DivergenceParams:
    """Settings of :class:`DivergenceDetector`."""

    loss_series: str = "loss"
    grad_series: str = "grad/norm"
    nonfinite_series: str = "grad/nonfinite"  #: count of non-finite gradient entries
    runaway_ratio: float = RUNAWAY_RATIO
    runaway_progress: float = RUNAWAY_PROGRESS
    smooth_points: int = SMOOTH_POINTS
    level_points: int = LEVEL_POINTS
    patience: int = RUNAWAY_PATIENCE
    recovering_fraction: float = RECOVERING_FRACTION
    grad_window: int = GRAD_WINDOW
    grad_ratio: float = GRAD_RATIO
    grad_smooth_points: int = GRAD_SMOOTH_POINTS
    critical_ratio: float = CRITICAL_RATIO  #: loss or gradient ratio at which the warning turns critical
    warmup: int = DIVERGENCE_WARMUP
    clear_points: int = CLEAR_POINTS
    rejoin_steps: int = DIVERGENCE_REJOIN  #: steps after a resolution within which the same episode resumes

    def __post_init__(self):
        if self.runaway_ratio <= 1 or self.grad_ratio <= 1:
            raise ValueError("divergence: runaway_ratio and grad_ratio must be > 1")
        if self.critical_ratio < max(self.runaway_ratio, self.grad_ratio):
            raise ValueError("divergence: critical_ratio must be at least runaway_ratio and grad_ratio")
        if not 0 <= self.runaway_progress <= 1 or not 0 <= self.recovering_fraction < 1:
            raise ValueError("divergence: runaway_progress must be in [0, 1], recovering_fraction in [0, 1)")
        if min(self.smooth_points, self.level_points, self.grad_smooth_points, self.clear_points, self.patience) < 1:
            raise ValueError(
                "divergence: smooth_points, level_points, grad_smooth_points, patience and clear_points must be >= 1"
            )
        if self.grad_window < 4 or not 1 <= self.warmup <= self.grad_window:
            raise ValueError("divergence: need grad_window >= 4 and 1 <= warmup <= grad_window")


class DivergenceDetector(Detector):
    """Flags a run that is blowing up.

    Two episodes, each one alert:

    - ``nonfinite`` (critical, at once): the loss or the gradient norm is NaN or infinite, or
      the hook counted non-finite gradient entries.
    - ``runaway`` (warning, the early sign): for ``patience`` steps in a row, the smoothed loss
      is ``runaway_ratio`` times its running minimum and has lost ``runaway_progress`` of the
      progress made, or the smoothed gradient norm is ``grad_ratio`` times its rolling median,
      without falling back below ``recovering_fraction`` of its peak (a healing excursion --
      a learning-rate bump, a catapult -- falls back; a divergence does not).
      In a run that diverges this opens before the first NaN; the alert's ``start_step`` is
      where the condition began. The loss test assumes a positive loss (cross-entropy,
      MSE); for other losses rely on the gradient test.

        det = DivergenceDetector(DivergenceParams(grad_ratio=20.0))
    """

    name = "divergence"
    Params = DivergenceParams

    def accepts(self, series: str) -> bool:
        p = self.params
        return series == p.loss_series or series == p.grad_series or series == p.nonfinite_series

    def point(self, state: dict, series: str, step: int, value: float, log: ChangeLog) -> None:
        p = self.params
        # (get, not setdefault: that builds the default at every point)
        bad = state.get("nonfinite")
        if bad is None:
            bad = state["nonfinite"] = {}
        if series == p.nonfinite_series:
            if value != 0.0:
                bad[series] = True
                self._nonfinite(state, log, series, step, value, True)
            else:
                bad[series] = False
                self._clear_nonfinite(state, log, bad, step)
            return
        if value - value != 0.0:
            bad[series] = True
            self._nonfinite(state, log, series, step, value, False)
            return
        bad[series] = False
        eps = state.get("episodes")
        if eps and "nonfinite" in eps:
            self._clear_nonfinite(state, log, bad, step)

        flags = state.get("flags")
        if flags is None:
            flags = state["flags"] = {}
        if series == p.loss_series:
            t = state.get("loss")
            if t is None:
                t = state["loss"] = {"recent": [], "level": [], "n": 0}
            flag = self._loss(t, value)
            name = "loss"
        else:
            t = state.get("grad")
            if t is None:
                t = state["grad"] = {"window": [], "recent": []}
            flag = self._grad(t, value)
            name = "grad"
        if flag is not None:
            if flag["raw"]:
                old = flags.get(name)
                v = flag["value"]
                peak = max(old["peak"], v) if old and old["raw"] else v
                if v < p.recovering_fraction * peak:
                    flag["since"], flag["count"] = None, 0
                elif old and old["raw"] and old["since"] is not None:
                    flag["since"], flag["count"] = old["since"], old["count"] + 1
                else:
                    flag["since"], flag["count"] = step, 1
                flag["peak"] = peak
                flag["hot"] = flag["count"] >= p.patience
            else:
                flag["hot"] = False
            flags[name] = flag
        hot = None
        for f in flags.values():
            if f["hot"]:
                if hot is None:
                    hot = [f]
                else:
                    hot.append(f)
        if hot is not None:
            self._runaway(state, log, step, hot)
        elif eps and "runaway" in eps:  # (clear is a no-op with no episode open)
            self.clear(state, log, "runaway", step, p.clear_points)

    def _nonfinite(self, state: dict, log: ChangeLog, series: str, step: int, value: float, count: bool) -> None:
        what = f"{fmt(value)} non-finite gradient entries" if count else f"{series} is {fmt(value)}"
        # A run already warned of as running away: its NaN is the same incident, escalated,
        # not a second page.
        self.hold(
            state,
            log,
            "runaway" if self.is_open(state, "runaway") and "nonfinite" not in state["episodes"] else "nonfinite",
            step,
            "critical",
            math.inf,  # the peak of its episode: what the alert must say first
            f"Training diverged at step {step}: {what}. Non-finite values do not come back by themselves.",
            {"series": series, "value": value},
        )

    def _clear_nonfinite(self, state: dict, log: ChangeLog, bad: dict, step: int) -> None:
        if "nonfinite" in state.get("episodes", ()) and not any(bad.values()):
            self.clear(state, log, "nonfinite", step, self.params.clear_points)  # (a no-op with no episode open)

    def _runaway(self, state: dict, log: ChangeLog, step: int, hot: list) -> None:
        p = self.params
        why, evidence, plain = [], {}, []
        for f in hot:
            e = f["evidence"]
            evidence.update(e)
            if "loss_ratio" in e:
                plain.append("the loss is climbing far above its best")
                why.append(
                    f"smoothed loss {fmt(e['loss_smoothed'])} is {fmt(e['loss_ratio'])}x "
                    f"its running minimum {fmt(e['loss_min'])}"
                )
            else:
                plain.append("the gradient norm is exploding")
                why.append(
                    f"gradient norm {fmt(e['grad_norm_smoothed'])} is {fmt(e['grad_ratio'])}x "
                    f"its rolling median {fmt(e['grad_norm_median'])}"
                )
        evidence["patience"] = p.patience
        ratio = max(evidence.get("loss_ratio", 0.0), evidence.get("grad_ratio", 0.0))
        critical = ratio >= p.critical_ratio
        evidence["critical_ratio"] = p.critical_ratio
        head = "Training is diverging" if critical else "Training may be diverging"
        self.hold(
            state,
            log,
            "runaway",
            step,
            "critical" if critical else "warning",
            max(f["score"] for f in hot),
            f"{head} at step {step}: {' and '.join(plain)}. " + sentence("; ".join(why)) + ".",
            evidence,
            start=min(f["since"] for f in hot),
        )

    def _loss(self, t: dict, value: float) -> dict | None:
        p = self.params
        recent = t["recent"]
        recent.append(value)  # push(recent, value, smooth_points), inlined
        k = p.smooth_points
        if len(recent) > k:
            del recent[: len(recent) - k]
        level_sorted = self._sorted.push(t["level"], value, p.level_points)
        n = t["n"] = t["n"] + 1
        if n < k:
            return None
        r = sorted(recent)  # median(recent), inlined
        h = len(r) // 2
        s = r[h] if len(r) % 2 else 0.5 * (r[h - 1] + r[h])
        h = len(level_sorted) // 2
        level = level_sorted[h] if len(level_sorted) % 2 else 0.5 * (level_sorted[h - 1] + level_sorted[h])
        if "ref" not in t:
            t["ref"], t["min"] = s, level
        lo, ref = t["min"], t["ref"]
        result = None
        if n >= p.warmup and lo > 0:
            ratio = s / lo
            raw = ratio >= p.runaway_ratio and s - lo >= p.runaway_progress * max(ref - lo, 0.0)
            result = {
                "raw": raw,
                "value": s,
                "score": ratio / p.runaway_ratio,
                "evidence": {
                    "loss_smoothed": s,
                    "loss_min": lo,
                    "loss_start": ref,
                    "loss_ratio": ratio,
                    "runaway_ratio": p.runaway_ratio,
                    "runaway_progress": p.runaway_progress,
                },
            }
        if (n >= p.level_points or n >= p.warmup) and level < lo:
            t["min"] = level
        return result

    def _grad(self, t: dict, value: float) -> dict | None:
        p = self.params
        recent = t["recent"]
        recent.append(value)  # push(recent, value, grad_smooth_points), inlined
        if len(recent) > p.grad_smooth_points:
            del recent[: len(recent) - p.grad_smooth_points]
        window = t["window"]
        if len(window) < p.warmup:
            self._sorted.push(window, value, p.grad_window)
            return None
        w = self._sorted.sorted(window)
        h = len(w) // 2
        base = w[h] if len(w) % 2 else 0.5 * (w[h - 1] + w[h])
        self._sorted.push(window, min(value, p.grad_ratio * base) if base > 0 else value, p.grad_window)
        if base <= 0:
            return None
        r = sorted(recent)
        h = len(r) // 2
        s = r[h] if len(r) % 2 else 0.5 * (r[h - 1] + r[h])
        ratio = s / base
        return {
            "raw": ratio >= p.grad_ratio,
            "value": s,
            "score": ratio / p.grad_ratio,
            "evidence": {
                "grad_norm_smoothed": s,
                "grad_norm_median": base,
                "grad_ratio": ratio,
                "grad_ratio_threshold": p.grad_ratio,
            },
        }
