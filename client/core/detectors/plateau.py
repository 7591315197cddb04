"""Plateau: a run that has stopped learning near where it started, with its learning rate up.

AUTOTRAINER (Zhang et al., ICSE 2021) flags "slow convergence" when the training signal stops
improving over a window; ReduceLROnPlateau and early stopping use the same idea with a fixed
patience. A fixed patience is wrong for runs of every length, so the window here grows with
the run: ``max(min_window, window_fraction * steps seen)``.

A run that has simply converged is flat too. What tells them apart, from the loss alone, is
how far the run got: a converged run has fallen well below its starting loss (or has decayed
its learning rate to the end of its schedule); a stuck one -- a learning rate far too low,
every ReLU dead, a saddle at a too-small initialisation -- sits at its starting loss. So the
alert needs all three: flat over the window, still near its start, and a learning rate not
at its floor. (A task whose best achievable loss is within ``progress_fraction`` of its
starting loss, e.g. 70% label noise over 10 classes, looks stuck to this rule.)

The loss history is kept in at most ``MAX_BLOCKS`` blocks of log-loss sums whose size doubles
as the run grows, so the state stays small on runs of any length.
"""

from __future__ import annotations

import dataclasses
import math

from ._base import ChangeLog, Detector, fmt

#: The shortest window judged, in steps. ReduceLROnPlateau and early stopping use patiences
#: of tens of epochs; 200 steps is past the first fast drop of every healthy run in the
#: corpus (their loss is below 90% of its start by step 100) and short enough to page before
#: most of a stuck job's compute is spent.
PLATEAU_MIN_WINDOW = 200
#: ... and a quarter of the steps seen: a run 10,000 steps in is judged over its last 2,500.
#: Healthy runs learn in bursts; a quarter of the run is long enough that a pause between two
#: of them does not count, short enough to notice a stall before the run ends.
PLATEAU_WINDOW_FRACTION = 0.25
#: Flat: the smoothed loss moved by less than 5% either way over the window. The stuck runs of
#: the corpus (lr 1e-5, dead ReLUs, a vanishing init) move by under 2%; healthy runs at
#: step 200 have fallen by 20% or more over their first 200 steps. A loss rising by more
#: is going backwards, not flat: the divergence detector's business.
PLATEAU_MIN_CHANGE = 0.05
#: Still near its start: the smoothed loss above 90% of its starting level (the mean log loss
#: of its first ``START_POINTS`` points). The healthy runs of the corpus are at 36-81% of
#: their start at their flattest (full-batch GD below the edge: 71%; batch-4 SGD at its noise
#: floor: 75-84%).
PLATEAU_PROGRESS_FRACTION = 0.9
#: The learning rate at its floor ends the judgement: below 10% of the largest seen, a
#: decaying schedule is finishing and a flat loss is what it is meant to give.
PLATEAU_LR_FLOOR = 0.1
#: The condition must hold for 50 steps before it is an alert (a few judgements: one flat
#: block between two drops is not a plateau).
PLATEAU_MIN_STEPS = 50
#: Judgements in a row without the condition before the episode resolves.
PLATEAU_CLEAR_POINTS = 3
#: A stall that comes back within 200 steps of clearing is the same stall.
PLATEAU_REJOIN = 200
#: Points averaged for the starting level.
START_POINTS = 16
#: Blocks kept of the loss history; the block size doubles when they are all used.
MAX_BLOCKS = 32
#: Points in a block at the start of a run.
FIRST_BLOCK_POINTS = 4
#: Zero (a float32 loss can be exactly 0) or a negative loss is taken as this on the log
#: scale: the rule assumes a positive loss (cross-entropy, MSE).
LOG_FLOOR = 1e-30
#: An announced task switch (``continual/task``) changes the data: the run starts over.
TASK_SERIES = "continual/task"


@dataclasses.dataclass(frozen=True)
class PlateauParams:
    """Settings of :class:`PlateauDetector`."""

    loss_series: str = "loss"  #: the training loss (positive: cross-entropy, MSE)
    lr_series: str = "lr"  #: the learning rate; when it is not sent, it is taken as never at its floor
    min_window: int = PLATEAU_MIN_WINDOW  #: shortest window judged, in steps
    window_fraction: float = PLATEAU_WINDOW_FRACTION  #: the window is this share of the steps seen, if longer
    min_change: float = PLATEAU_MIN_CHANGE  #: flat = smoothed loss moved by less than this share over the window
    progress_fraction: float = PLATEAU_PROGRESS_FRACTION  #: stuck = smoothed loss still above this share of its start
    lr_floor: float = PLATEAU_LR_FLOOR  #: learning rate below this share of its peak = at its floor: no alert
    min_steps: int = PLATEAU_MIN_STEPS  #: steps the condition must hold before it is an alert
    clear_points: int = PLATEAU_CLEAR_POINTS
    rejoin_steps: int = PLATEAU_REJOIN  #: steps after a resolution within which the same episode resumes
    task_series: str = TASK_SERIES  #: a point here is a task switch: the run is judged afresh

    def __post_init__(self):
        if self.min_window < 2 or self.clear_points < 1:
            raise ValueError("plateau: need min_window >= 2 and clear_points >= 1")
        if not 0 < self.min_change < 1 or not 0 < self.progress_fraction < 1:
            raise ValueError("plateau: min_change and progress_fraction must be in (0, 1)")


class PlateauDetector(Detector):
    """A run that stopped learning near its starting loss while its learning rate is up.

    The loss is flat over a window scaled to the run, still near its starting level, and
    the learning rate is not at its floor. Key: the loss series. Warning.

    Judged each time a block of the loss history fills (every 4 points early on, every few
    hundred late in a long run): the smoothed loss now (mean log loss over the last quarter of
    the window) against the smoothed loss one window ago, and against its start.

        det = PlateauDetector(PlateauParams(min_window=500))
    """

    name = "plateau"
    Params = PlateauParams

    def accepts(self, series: str) -> bool:
        p = self.params
        return series == p.loss_series or series == p.lr_series or series == p.task_series

    def point(self, state: dict, series: str, step: int, value: float, log: ChangeLog) -> None:
        p = self.params
        if series == p.task_series:
            for k in ("start", "blocks", "size", "first", "open"):
                state.pop(k, None)
            if self.is_open(state, p.loss_series):
                self.clear(state, log, p.loss_series, step, 1)
            return
        if value - value != 0.0:  # not finite
            return
        if series == p.lr_series:
            state["lr"] = value
            state["lr_max"] = max(state.get("lr_max", value), value)
            return
        x = math.log(max(value, LOG_FLOOR))
        state.setdefault("first", step)
        start = state.get("start")
        if start is None:  # (not setdefault: that builds the default at every point)
            start = state["start"] = [0, 0.0]
        if start[0] < START_POINTS:
            start[0] += 1
            start[1] += x
        blocks = state.get("blocks")
        if blocks is None:
            blocks = state["blocks"] = []
        size = state.setdefault("size", FIRST_BLOCK_POINTS)
        cur = state.get("open")
        if cur is None:
            cur = state["open"] = [step, step, 0, 0.0]
        cur[1] = step
        cur[2] += 1
        cur[3] += x
        if cur[2] < size:
            return
        blocks.append(cur)
        del state["open"]
        if len(blocks) > MAX_BLOCKS:
            merged = [[a[0], b[1], a[2] + b[2], a[3] + b[3]] for a, b in zip(blocks[0:-1:2], blocks[1::2])] + (
                [blocks[-1]] if len(blocks) % 2 else []
            )
            blocks[:] = merged
            state["size"] = 2 * size
        self._judge(state, step, log)

    def _judge(self, state: dict, step: int, log: ChangeLog) -> None:
        p = self.params
        key = p.loss_series
        seen = step - state["first"]
        start_n, start_sum = state["start"]
        if seen < p.min_window or start_n < START_POINTS:
            return
        window = max(p.min_window, int(p.window_fraction * seen))
        smooth = max(1, window // 4)
        blocks = state["blocks"]
        now = _level(blocks, step - smooth, step)
        then = _level(blocks, step - window - smooth, step - window)
        if now is None or then is None:
            return
        start = math.exp(start_sum / start_n)
        now, then = math.exp(now), math.exp(then)
        change = now / then - 1.0
        progress = now / start
        lr, lr_max = state.get("lr"), state.get("lr_max")
        lr_share = lr / lr_max if lr is not None and lr_max and lr_max > 0 else None
        lr_up = lr_share is None or lr_share >= p.lr_floor
        if abs(change) < p.min_change and progress > p.progress_fraction and lr_up:
            lr_words = (
                f"while the learning rate is at {fmt(100 * lr_share)}% of its peak"
                if lr_share is not None
                else "(no learning rate was sent)"
            )
            self.hold(
                state,
                log,
                key,
                step,
                "warning",
                progress,
                f"Training has stalled at step {step}: the loss has not improved over the last {window} steps "
                f"and is still near where it started, {lr_words}. "
                f"Smoothed loss {fmt(now)} vs {fmt(then)} {window} steps ago ({_pct(change)}), "
                f"{fmt(100 * progress)}% of its starting level {fmt(start)}. A learning rate far too low, "
                f"dead units or a vanishing initialisation stall a run like this.",
                {
                    "loss_smoothed": now,
                    "loss_window_ago": then,
                    "loss_start": start,
                    "change": change,
                    "progress": progress,
                    "window_steps": window,
                    "lr": lr,
                    "lr_max": lr_max,
                    "min_change": p.min_change,
                    "progress_fraction": p.progress_fraction,
                    "lr_floor": p.lr_floor,
                },
            )
        else:
            self.clear(state, log, key, step, p.clear_points)


def _level(blocks: list, lo: int, hi: int) -> float | None:
    """Mean log loss of the blocks that end after ``lo`` and start at or before ``hi``."""
    n, total = 0, 0.0
    for first, last, count, s in blocks:
        if last > lo and first <= hi:
            n += count
            total += s
    return total / n if n else None


def _pct(change: float) -> str:
    return f"{'+' if change >= 0 else ''}{fmt(100 * change)}%"
