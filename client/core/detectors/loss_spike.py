"""Loss spikes: a point far above the robust rolling statistics of its own series."""

from __future__ import annotations

import dataclasses
import math

from ._base import MAD_TO_SIGMA, ChangeLog, Detector, fmt, median, median_mad_sorted, sentence, series_list

#: OLMo-core's SkipStepOptimizer judges a step against the last 128 values
#: (``rolling_interval_length=128``).
SPIKE_WINDOW = 128
#: OLMo-core skips a step more than 6 standard deviations above the rolling mean
#: (``sigma_factor=6``). We measure sigma as 1.4826 * MAD, which one spike cannot inflate.
SPIKE_SIGMAS = 6.0
#: Points needed before judging: a quarter of the window. Below ~30 values the MAD is too
#: noisy (its relative standard error is ~1/sqrt(n)), and the first steps of a run, when the
#: loss falls fastest and the learning rate is still warming up, are never spikes.
SPIKE_WARMUP = 32
#: Statistics on log(loss): minibatch losses are skewed (a batch of 4 with one hard sample
#: costs 3x the median), and on a log scale their spread is roughly symmetric and the same
#: at any loss level; in our batch-4 runs the largest healthy excursion is ~4 log-sigmas.
SPIKE_LOG_SCALE = True
#: Zero (a float32 loss can be exactly 0) is taken as this value on the log scale.
LOG_FLOOR = 1e-30
#: A spike must also be this far above the median, relative to it: when the loss is nearly
#: flat the MAD collapses and a 1% wobble would count as "6 sigma".
SPIKE_MIN_RISE = 0.1
#: A jump by a ratio is a spike too, when it also stands clear of the noise: a 10x jump of a
#: small-batch loss whose log wobbles by 0.4 is only ~5.8 sigmas, under the z threshold, yet
#: plainly a spike (llm-foundry and Lightning's SpikeDetection judge ratios to a running mean).
#: Healthy batch-4 losses reach 9x their median, but at most ~3 log-sigmas in our runs: the
#: ratio rule needs 4 as well.
SPIKE_RATIO = 5.0
SPIKE_RATIO_SIGMAS = 4.0
#: A falling loss leaves the window's median behind: the ratio is also taken to the median of
#: the last ``SPIKE_RECENT`` points when that is lower (full-batch GD whose loss halved within
#: the window jumps 5x its recent level while only 4x the window's median).
SPIKE_RECENT = 32
#: A jump that lasts is a spike sooner: two points in a row each ``ratio`` times the median and
#: ``SPIKE_RUN_SIGMAS`` above it. One such point is what a batch of 8 with a hard sample does
#: (healthy small-batch runs reach ~3 log-sigmas about once in a few thousand steps); two in a
#: row at 2.5 sigmas is rarer than one at 4 (below 1e-4 of steps for independent batches).
#: The episode starts, and its delay counts, from the first of them.
SPIKE_RUN_SIGMAS = 2.5
#: A spike is told 2 steps after it is seen: a run that is blowing up shows its loss jump
#: first, and its divergence (a NaN, a loss a thousand times its best) within those steps
#: then claims the jump as its consequence: one page, named by its cause.
SPIKE_DELAY = 2
#: ... or up to 25 steps (past the divergence detector's patience of 20) while the loss still
#: climbs: each step at least ``SPIKE_CLIMB`` times the highest value of the spike so far. A
#: run blowing up grows by orders of magnitude a step (the corpus's sudden divergences: x14 to
#: x10^7 per step before the NaN); a learning-rate bump or a badly scaled batch lifts the loss
#: by 1.1-1.5x a step after its jump (one step of x2.4), and must be told within 2 steps.
SPIKE_WAIT_MAX = 25
SPIKE_CLIMB = 2.0
#: An announced task switch (``continual/task``, sent by ``Monitor.task_switch``) changes the
#: data: the loss jumps as expected, and its old level is no baseline. The windows restart and
#: judge again after ``warmup`` points of the new task.
TASK_SERIES = "continual/task"
#: A jump must also rise by 5% of the loss's starting level (the median of its first
#: ``warmup`` points): a converged loss moving from 1e-4 to 1e-3 is ten times higher and
#: harmless; on a log scale, near zero, every wobble is large.
SPIKE_MIN_RISE_OF_START = 0.05
#: The episode ends when the loss is back within 3 robust sigmas of the median ...
RECOVER_SIGMAS = 3.0
#: ... for 3 points in a row (the episode's end is the first of them). The resolution is told
#: ``rejoin_steps`` points later, and a spike before then continues the episode: a loss that
#: falls back for three or four steps and jumps again (the corpus's scaled-input runs do, for
#: some twenty steps after the inputs are back to scale) stays one alert, not one resolved and
#: reopened; wobbles above the recovery level after it do not hold the resolution back.
RECOVER_POINTS = 3


#: A spike within 10 steps of the last one's recovery is the same episode (a loss that bounces).
SPIKE_REJOIN = 10


@dataclasses.dataclass(frozen=True)
class LossSpikeParams:
    """Settings of :class:`LossSpikeDetector` (names are the per-project setting keys)."""

    series: tuple = ("loss",)  #: series to watch, each on its own
    window: int = SPIKE_WINDOW  #: rolling window, in points
    threshold: float = SPIKE_SIGMAS  #: robust sigmas above the median that make a spike
    warmup: int = SPIKE_WARMUP  #: points seen before the first judgement
    log_scale: bool = SPIKE_LOG_SCALE  #: judge log(value); turn off for losses that can be <= 0
    min_rise: float = SPIKE_MIN_RISE  #: also needed: value >= median * (1 + min_rise)
    delay_steps: int = SPIKE_DELAY  #: steps before a spike is told (a root cause may claim it)
    min_rise_of_start: float = SPIKE_MIN_RISE_OF_START  #: also needed: value - median >= this * start level
    ratio: float = SPIKE_RATIO  #: value >= ratio * median is a spike if also ratio_sigmas above it
    ratio_sigmas: float = SPIKE_RATIO_SIGMAS
    run_sigmas: float = SPIKE_RUN_SIGMAS  #: two points in a row this far above and ratio x the median: a spike
    task_series: str = TASK_SERIES  #: a point here is a task switch: the baselines restart
    recover_threshold: float = RECOVER_SIGMAS
    recover_points: int = RECOVER_POINTS
    rejoin_steps: int = SPIKE_REJOIN  #: steps after a resolution within which the same episode resumes

    def __post_init__(self):
        if self.window < 8 or not 2 <= self.warmup <= self.window:
            raise ValueError("loss_spike: need window >= 8 and 2 <= warmup <= window")
        if not 0 < self.recover_threshold <= self.threshold:
            raise ValueError("loss_spike: need 0 < recover_threshold <= threshold")
        if self.recover_points < 1 or self.min_rise < 0:
            raise ValueError("loss_spike: need recover_points >= 1 and min_rise >= 0")
        if self.ratio <= 1 or self.ratio_sigmas > self.threshold:
            raise ValueError("loss_spike: need ratio > 1 and ratio_sigmas <= threshold")
        if not 0 < self.run_sigmas <= self.ratio_sigmas:
            raise ValueError("loss_spike: need 0 < run_sigmas <= ratio_sigmas")


class LossSpikeDetector(Detector):
    """One alert per spike episode of a loss-like series, with start, peak and recovery step.

    A point is a spike when it is more than ``threshold`` robust sigmas (1.4826 * MAD) above
    the median of the last ``window`` points, and at least ``min_rise`` above it in relative
    terms; both on log(value) unless ``log_scale`` is off. Values enter the window clipped at
    that threshold, so a spike barely moves the baseline while a lasting shift of level is
    learned within half a window. Downward moves
    (a falling loss, learning-rate warm-up) never count. Non-finite values are left to the
    divergence detector.

        det = LossSpikeDetector()
        state = {}
        changes = det.update(state, [("loss", 0, 2.3), ("loss", 1, 2.2)])
    """

    name = "loss_spike"
    Params = LossSpikeParams

    def __init__(self, params: LossSpikeParams | None = None) -> None:
        super().__init__(params)
        self._log_rise = math.log1p(self.params.min_rise)

    def accepts(self, series: str) -> bool:
        return series in self.params.series or series == self.params.task_series

    def point(self, state: dict, series: str, step: int, value: float, log: ChangeLog) -> None:
        p = self.params
        if series == p.task_series:
            state.pop("windows", None)
            state.pop("elevated", None)
            state["switch"] = step
            return
        if value - value != 0.0:  # not finite
            return
        eps = state.get("episodes")
        ep = eps.get(series) if eps else None
        if ep is not None and "held" in ep and step - ep["first"]["step"] < SPIKE_WAIT_MAX:
            peak = ep["evidence"]["value"]
            if isinstance(peak, float) and value >= SPIKE_CLIMB * peak:
                # Still climbing when its delay ends: a loss that keeps going up is a run
                # blowing up more often than a spike. Wait for it to turn (then it is told) or
                # for the divergence to claim it.
                ep["held"] = step - p.delay_steps + 1
        x = math.log(max(value, LOG_FLOOR)) if p.log_scale else value
        window = series_list(state, "windows", series)
        if len(window) < p.warmup:
            self._sorted.push(window, x, p.window)
            if len(window) == p.warmup:
                starts = state.setdefault("start", {})
                if series not in starts:  # kept across task switches: the loss's scale
                    starts[series] = math.exp(median(window)) if p.log_scale else median(window)
            return
        ordered, clean = self._sorted.sorted_clean(window)
        med, mad = median_mad_sorted(ordered, window, clean)
        sigma = MAD_TO_SIGMA * mad
        high = med + p.threshold * sigma
        z = (x - med) / sigma if sigma > 0 else (0.0 if x <= med else math.inf)
        if p.log_scale:
            rose, median_value = x - med >= self._log_rise, math.exp(med)
        else:
            rose, median_value = med <= 0 or x >= med * (1.0 + p.min_rise), med
        starts = state.get("start")
        start = starts.get(series) if starts else None
        if start is not None and value - median_value < p.min_rise_of_start * abs(start):
            rose = False
        runs = state.get("elevated")
        if runs is None:
            runs = state["elevated"] = {}
        was = runs.pop(series, None)  # first step of the elevated points just before this one
        elevated, ref = False, median_value
        strong = x > med + p.ratio_sigmas * sigma
        if x > med + p.run_sigmas * sigma:
            if p.log_scale:
                lift = x - med
                if lift < math.log(p.ratio) and strong and len(window) > SPIKE_RECENT:
                    recent = median(window[-SPIKE_RECENT:])
                    if recent < med:
                        lift, ref = x - recent, math.exp(recent)
                elevated = lift >= math.log(p.ratio)
            else:
                elevated = med > 0 and x >= p.ratio * med
        if elevated:
            runs[series] = step if was is None else was
        by_ratio = elevated and strong
        lasting = elevated and was is not None
        if (x > high or by_ratio or lasting) and rose:
            scale = " on a log scale" if p.log_scale else ""
            jump = f" {fmt(value / ref)}x" if ref > 0 else ""
            if x > high:
                rule = ")."
            elif by_ratio:
                rule = f"; or {fmt(p.ratio)}x and {fmt(p.ratio_sigmas)} sigmas)."
            else:
                rule = f"; or {fmt(p.ratio)}x and {fmt(p.run_sigmas)} sigmas for {step - was + 1} points in a row)."
            self.hold(
                state,
                log,
                series,
                step,
                "warning",
                z,
                sentence(f"{series} jumped{jump} at step {step} (from {fmt(ref)} to {fmt(value)}). ")
                + f"{fmt(z)} robust sigmas above its rolling median{scale} (threshold {fmt(p.threshold)}{rule}",
                {
                    "value": value,
                    "median": median_value,
                    "sigma": sigma,
                    "z": z,
                    "threshold": p.threshold,
                    "ratio": value / ref if ref > 0 else math.inf,
                    "baseline": ref,
                    "ratio_threshold": p.ratio,
                    "ratio_sigmas": p.ratio_sigmas,
                    "run_sigmas": p.run_sigmas,
                    "points_in_a_row": 1 if was is None else step - was + 1,
                    "log_scale": p.log_scale,
                    "min_rise": p.min_rise,
                    "window": len(window),
                },
                start=was if lasting else None,
            )
        elif self.is_open(state, series):
            if x <= med + p.recover_threshold * sigma or state["episodes"][series]["clear"] >= p.recover_points:
                self.clear(state, log, series, step, p.recover_points + p.rejoin_steps)
            else:  # still elevated: the episode goes on, though this is no longer a spike
                self.keep(state, series, log, step)
        self._sorted.push(window, min(x, high) if sigma > 0 else x, p.window)
