"""Slow steps: the run's step time regressed against its own baseline.

The hook sends the time of every step (``perf/step_ms``: from one ``log`` call to the next).
A data loader that can no longer keep up, a GPU throttling as it heats, a ``torch.compile``
recompiling again and again, a neighbour on a shared node: each makes every step, or a
steady share of them, slower, and the run costs more for the same progress. One slow step is
not that: an evaluation, a checkpoint or a garbage collection pauses a run now and then.

The baseline is the run's own: the median step time over ``baseline_points`` points after a
warm-up of ``warmup`` points (the first steps allocate, compile and fill caches), then fixed
-- a baseline that learned from later points would follow a gradual throttle and never see
it. The level judged is the mean of the last ``window`` step times without the ``trim``
largest (one-off pauses drop out; stalls that come every few steps do not); it must be past
``ratio`` times the baseline for ``patience`` points in a row. It is back below
``recover_ratio`` times the baseline (hysteresis). The state is two bounded lists of numbers.
"""

from __future__ import annotations

import dataclasses

from ._base import ChangeLog, Detector, finite, fmt, median

#: The series the hook sends, in milliseconds.
SERIES = "perf/step_ms"
#: Points skipped at the start: the first steps of a run are its slowest (allocation, cuDNN
#: autotuning, compilation); 20 steps cover them in the runs we measured.
SLOW_WARMUP = 20
#: Points whose median is the baseline.
SLOW_BASELINE_POINTS = 50
#: Points averaged for the level judged, less the ``SLOW_TRIM`` largest: a checkpoint or an
#: evaluation every few hundred steps is at most one of them; a loader stall every 10 steps
#: leaves 3 of its 5 in the mean.
SLOW_WINDOW = 50
SLOW_TRIM = 2
#: 1.5x the baseline: the step-to-step jitter of the healthy runs we recorded moves the
#: trimmed mean of 50 steps by under 10%; a throughput loss of a third is worth a page.
SLOW_RATIO = 1.5
#: ... for 50 points in a row (a sustained regression, not a burst of load).
SLOW_PATIENCE = 50
#: Back below 1.25x the baseline for ``SLOW_CLEAR_POINTS`` points: resolved.
SLOW_RECOVER_RATIO = 1.25
SLOW_CLEAR_POINTS = 20
#: A regression that comes back within 500 steps of clearing is the same episode.
SLOW_REJOIN = 500
#: An announced task switch (``continual/task``) may change the data and the model: the
#: baseline is measured afresh.
TASK_SERIES = "continual/task"


@dataclasses.dataclass(frozen=True)
class SlowStepsParams:
    """Settings of :class:`SlowStepsDetector`."""

    series: str = SERIES  #: step time, in milliseconds
    warmup: int = SLOW_WARMUP  #: points skipped at the start of the run
    baseline_points: int = SLOW_BASELINE_POINTS  #: points after the warm-up whose median is the baseline
    window: int = SLOW_WINDOW  #: points averaged for the level judged
    trim: int = SLOW_TRIM  #: largest points of the window left out of the mean (one-off pauses)
    ratio: float = SLOW_RATIO  #: slow = the trimmed mean past this many times the baseline
    recover_ratio: float = SLOW_RECOVER_RATIO  #: back = below this many times the baseline
    patience: int = SLOW_PATIENCE  #: points in a row past the ratio before it is an alert
    clear_points: int = SLOW_CLEAR_POINTS
    rejoin_steps: int = SLOW_REJOIN  #: steps after a resolution within which the same episode resumes
    task_series: str = TASK_SERIES  #: a point here is a task switch: the baseline is measured afresh

    def __post_init__(self):
        if self.trim < 0 or self.trim >= self.window:
            raise ValueError("slow_steps: need 0 <= trim < window")
        if not 1.0 <= self.recover_ratio <= self.ratio:
            raise ValueError("slow_steps: need 1 <= recover_ratio <= ratio")
        if min(self.warmup, self.baseline_points, self.patience, self.clear_points) < 1:
            raise ValueError("slow_steps: need warmup, baseline_points, patience and clear_points >= 1")


class SlowStepsDetector(Detector):
    """Step time sustained past ``ratio`` times the run's own baseline. Warning.

    Key: the step-time series.

        det = SlowStepsDetector(SlowStepsParams(ratio=2.0))
        state = {}
        changes = det.update(state, [("perf/step_ms", s, 10.0) for s in range(100)])
    """

    name = "slow_steps"
    Params = SlowStepsParams

    def accepts(self, series: str) -> bool:
        return series == self.params.series or series == self.params.task_series

    def point(self, state: dict, series: str, step: int, value: float, log: ChangeLog) -> None:
        p = self.params
        if series == p.task_series:
            for k in ("n", "base", "basis", "recent", "run"):
                state.pop(k, None)
            if self.is_open(state, p.series):
                self.clear(state, log, p.series, step, 1)
            return
        if not finite(value) or value < 0:
            return
        n = state["n"] = state.get("n", 0) + 1
        if n <= p.warmup:
            return
        base = state.get("base")
        if base is None:
            basis = state.setdefault("basis", [])
            basis.append(value)
            if len(basis) >= p.baseline_points:
                state["base"] = median(basis)
                del state["basis"]
            return
        recent = state.setdefault("recent", [])
        recent.append(value)
        if len(recent) > p.window:
            del recent[0]
        if len(recent) < p.window or base <= 0:
            return
        total = sum(recent)
        if total < p.recover_ratio * base * (p.window - p.trim) and not state.get("run"):
            # the trimmed mean is below the plain sum over window - trim points: nothing to judge
            # (the usual case; the sort below runs in the hook's sender thread at every step)
            if self.is_open(state, p.series):
                self.clear(state, log, p.series, step, p.clear_points)
            return
        kept = sorted(recent)[: p.window - p.trim]
        level = sum(kept) / len(kept)
        times = level / base
        if times >= p.ratio:
            state["run"] = state.get("run", 0) + 1
        else:
            state["run"] = 0
        if self.is_open(state, p.series) and times >= p.recover_ratio:
            self.keep(state, p.series, log, step)
            return
        if state["run"] >= p.patience:
            self.hold(
                state,
                log,
                p.series,
                step,
                "warning",
                times,
                f"Training steps have slowed down: over the last {p.window} steps a step took {fmt(level)} ms "
                f"(the slowest {p.trim} left out), {fmt(times)}x the run's own baseline of {fmt(base)} ms, "
                f"for {state['run']} steps in a row. A data loader that cannot keep up, a GPU throttling, "
                "a model recompiling again and again or another job on the node does this.",
                {
                    "step_ms": level,
                    "baseline_ms": base,
                    "ratio": times,
                    "threshold_ratio": p.ratio,
                    "window": p.window,
                    "samples_lost_share": 1.0 - 1.0 / times,
                },
                start=step - state["run"] + 1,
            )
        elif self.is_open(state, p.series):
            self.clear(state, log, p.series, step, p.clear_points)
