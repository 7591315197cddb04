"""Overfitting: the held-out loss rising above its best while the training loss keeps falling.

Early stopping (Prechelt, "Early stopping -- but when?", 1998) watches the generalisation
loss GL(t) = 100 * (E_va(t) / E_opt(t) - 1), the held-out error above its best so far, and
stops when it passes a threshold (GL_5 stops at 5%). We alert at a clearer margin and only
while the training loss is still falling, which is what makes it overfitting rather than a
run getting worse on everything (divergence, a bad learning-rate change).

Series, as the user logs them:

- ``eval/loss``, ``eval/loss/<name>``, ``val/loss``, ``val/loss/<name>``: a held-out loss,
  lower is better. One alert per series.
- ``eval/acc``, ``val/acc``: a held-out accuracy (0-1), higher is better, judged only in runs
  that send no held-out loss (the loss and the accuracy of one held-out set tell one story:
  one alert, not two; the loss moves first). Only these exact names: ``eval/acc/<task>`` is
  the per-task accuracy of continual learning, read by the stability-gap detector, where a
  task's accuracy falling is forgetting, not overfitting.

The training loss is ``loss``, smoothed by an exponential moving average of its log.
"""

from __future__ import annotations

import dataclasses
import math

from ._base import ChangeLog, Detector, fmt, median, push

#: Held-out loss series: these names, or these names followed by "/<name>".
EVAL_LOSS_PREFIXES = ("eval/loss", "val/loss")
#: Held-out accuracy series: these exact names.
EVAL_ACC_SERIES = ("eval/acc", "val/acc")
#: Evaluations smoothed by the median of the last 3: one unlucky evaluation on a small
#: held-out set is not a trend.
EVAL_SMOOTH_POINTS = 3
#: The held-out loss 10% above its best: twice Prechelt's GL_5 stopping point, so an alert is
#: a clear rise, not the wobble around a flat optimum (a healthy run of the corpus with
#: 4,000 training samples drifts 3% above its best held-out loss by its end).
OVERFIT_MIN_RISE = 0.10
#: The held-out accuracy 5 points below its best: over 3 standard errors of a 1,000-sample
#: held-out set (sqrt(0.25 / 1000) = 0.016).
OVERFIT_ACC_DROP = 0.05
#: The training loss (smoothed) at least 5% below its level at the best evaluation: it is
#: still learning the training set while the held-out loss worsens.
OVERFIT_TRAIN_IMPROVEMENT = 0.05
#: The training loss is smoothed over about 50 points (an exponential moving average of its
#: log with weight 1/50): minibatch losses swing by 2x from batch to batch.
TRAIN_SMOOTH_POINTS = 50
#: Evaluations in a row the rise must hold before it is an alert.
OVERFIT_PATIENCE = 3
#: Evaluations of a series before its best is trusted (the first evaluations of a run fall
#: fast and are never a rise).
OVERFIT_WARMUP = 3
#: Evaluations in a row back within half the margin of the best before the alert resolves.
OVERFIT_CLEAR_POINTS = 3
#: A task switch (``continual/task``) changes the data: bests start again.
TASK_SERIES = "continual/task"
#: Held-out series remembered per run.
MAX_EVAL_SERIES = 64


@dataclasses.dataclass(frozen=True)
class OverfittingParams:
    """Settings of :class:`OverfittingDetector`."""

    train_series: str = "loss"  #: the training loss, which must keep falling
    eval_loss_prefixes: tuple = EVAL_LOSS_PREFIXES  #: held-out losses: these names or these names + "/<name>"
    eval_acc_series: tuple = EVAL_ACC_SERIES  #: held-out accuracies (0-1): these exact names
    smooth_points: int = EVAL_SMOOTH_POINTS  #: evaluations in the median that smooths each series
    min_rise: float = OVERFIT_MIN_RISE  #: held-out loss this share above its best opens an alert
    acc_drop: float = OVERFIT_ACC_DROP  #: held-out accuracy this far below its best opens an alert
    train_improvement: float = OVERFIT_TRAIN_IMPROVEMENT  #: training loss this share below its level at the best
    train_smooth_points: int = TRAIN_SMOOTH_POINTS  #: the training loss's moving average spans about this many points
    eval_patience: int = OVERFIT_PATIENCE  #: evaluations in a row the rise must hold (in points of the eval series)
    warmup: int = OVERFIT_WARMUP  #: evaluations of a series before it is judged (in points)
    clear_points: int = OVERFIT_CLEAR_POINTS
    task_series: str = TASK_SERIES  #: a point here is a task switch: bests start again

    def __post_init__(self):
        if min(self.smooth_points, self.train_smooth_points, self.eval_patience, self.clear_points) < 1:
            raise ValueError("overfitting: smoothing, patience and clear_points must be >= 1")
        if self.min_rise <= 0 or not 0 < self.acc_drop <= 1 or not 0 <= self.train_improvement < 1:
            raise ValueError("overfitting: need min_rise > 0, 0 < acc_drop <= 1 and 0 <= train_improvement < 1")


class OverfittingDetector(Detector):
    """Held-out loss rising above its best while the training loss keeps falling.

    The held-out loss (or accuracy) is worse than its best by a clear margin for a few
    evaluations in a row while the training loss keeps falling. Key: the held-out series.
    Warning; the evidence names the step of the best evaluation (the checkpoint to keep).

        det = OverfittingDetector(OverfittingParams(min_rise=0.2))
    """

    name = "overfitting"
    Params = OverfittingParams

    def __init__(self, params: OverfittingParams | None = None) -> None:
        super().__init__(params)
        self._kinds: dict[str, str | None] = {}  # series -> _kind_of(series), a cache

    def accepts(self, series: str) -> bool:
        p = self.params
        return series == p.train_series or series == p.task_series or self._kind(series) is not None

    def _kind(self, series: str) -> str | None:
        kinds = self._kinds
        kind = kinds.get(series, "")
        if kind == "":
            if len(kinds) >= 4096:
                kinds.clear()
            kind = kinds[series] = self._kind_of(series)
        return kind

    def _kind_of(self, series: str) -> str | None:
        p = self.params
        if series in p.eval_acc_series:
            return "acc"
        for prefix in p.eval_loss_prefixes:
            if series == prefix or series.startswith(prefix + "/"):
                return "loss"
        return None

    def point(self, state: dict, series: str, step: int, value: float, log: ChangeLog) -> None:
        p = self.params
        if series == p.task_series:
            state.pop("evals", None)
            for key in list(state.get("episodes", {})):
                self.clear(state, log, key, step, 1)
            return
        if value - value != 0.0:  # not finite
            return
        if series == p.train_series:
            x = math.log(max(value, 1e-30))
            old = state.get("train")
            state["train"] = x if old is None else old + (x - old) / p.train_smooth_points
            return
        train = state.get("train")
        if train is None:
            return
        kind = self._kind(series)
        if kind == "loss":
            state["has_loss"] = True
            if state.get("episodes"):  # an accuracy alert opened before the first loss point
                for key in [k for k in state["episodes"] if self._kind(k) == "acc"]:
                    self.clear(state, log, key, step, 1)
        elif state.get("has_loss"):
            return
        evals = state.get("evals")
        if evals is None:  # (not setdefault: that builds the default at every point)
            evals = state["evals"] = {}
        e = evals.get(series)
        if e is None:
            if len(evals) >= MAX_EVAL_SERIES:
                del evals[next(iter(evals))]
            e = evals[series] = {
                "recent": [],
                "n": 0,
                "best": None,
                "best_step": None,
                "train_at_best": None,
                "held": 0,
            }
        push(e["recent"], value, p.smooth_points)
        e["n"] += 1
        level = median(e["recent"])
        better = e["best"] is None or (level < e["best"] if kind == "loss" else level > e["best"])
        if better:
            e["best"], e["best_step"], e["train_at_best"] = level, step, train
        if e["n"] < p.warmup:
            return
        best = e["best"]
        if kind == "loss":
            worse = best > 0 and level >= best * (1 + p.min_rise)
            recovered = best <= 0 or level < best * (1 + p.min_rise / 2)
        else:
            worse = level <= best - p.acc_drop
            recovered = level > best - p.acc_drop / 2
        train_now, train_best = math.exp(train), math.exp(e["train_at_best"])
        falling = train_now <= train_best * (1 - p.train_improvement)
        if worse and falling:
            e["held"] += 1
            if e["held"] == 1:
                e["since"] = step
            if e["held"] < p.eval_patience:
                return
            if kind == "loss":
                what = f"{fmt(100 * (level / best - 1))}% above its best"
                score = level / best
            else:
                what = f"{fmt(100 * (best - level))} points below its best"
                score = best - level
            self.hold(
                state,
                log,
                series,
                step,
                "warning",
                score,
                f"The model is overfitting at step {step}: held-out {series} is {what} (step {e['best_step']}) "
                f"while the training loss keeps falling. {series} {fmt(level)} (median of the last "
                f"{len(e['recent'])} evaluations) vs {fmt(best)} at step {e['best_step']}; training loss "
                f"{fmt(train_now)} vs {fmt(train_best)} then. The checkpoint of step {e['best_step']} "
                f"generalises best; stop, or add regularisation or data.",
                {
                    "series": series,
                    "kind": kind,
                    "eval": level,
                    "best": best,
                    "best_step": e["best_step"],
                    "train_loss": train_now,
                    "train_loss_at_best": train_best,
                    "min_rise": p.min_rise,
                    "acc_drop": p.acc_drop,
                    "train_improvement": p.train_improvement,
                },
                start=e["since"],
            )
        else:
            e["held"] = 0
            if self.is_open(state, series):
                if recovered:
                    self.clear(state, log, series, step, p.clear_points)
                else:
                    self.keep(state, series)
