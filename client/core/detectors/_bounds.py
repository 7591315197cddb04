"""Bounds of every numeric detector setting, checked when settings are made.

Each detector checks how its settings relate to each other (``warmup <= window``); these
bounds keep each one within what means something at all. A window of 10^30 points or a
stall timeout of 10^-300 s passed those checks: the first makes the state saved with every
ingest batch grow without limit, the second calls every run stalled. A setting outside
its bound is a ``ValueError`` naming the bound (a 422 from the server).
"""

from __future__ import annotations

#: Windows, warm-ups, patiences and smoothing lengths, in points. The detectors keep up to
#: this many values per series in the run's state, which is saved as JSON with every ingest
#: batch: 10,000 floats are ~200 KB a batch, ~80x the default 128-point spike window.
MAX_POINTS_SETTING = 10_000
#: Robust sigmas of the spike test. Below a tenth of a sigma every wobble is a spike; past
#: 1,000 nothing finite ever is (turn the detector off instead: ``enabled: false``).
MIN_SIGMAS, MAX_SIGMAS = 0.1, 1000.0
#: Growth ratios of the loss and gradient norm (and the spike's relative rise). A loss a
#: million times its minimum has diverged by any measure; larger ratios never fire.
MAX_GROWTH_RATIO = 1e6
#: Sharpness against 2/lr (Cohen et al. 2021 put the edge at 1.0). A thousandth of the
#: bound is flat ground, a thousand times past it is long diverged.
MIN_CURVATURE_RATIO, MAX_CURVATURE_RATIO = 1e-3, 1e3
#: The median-margin warning, in nats: float32 collapses at 16.6 nats (Prieto et al. 2025);
#: a tenth of a nat is an untrained model, 1,000 nats is past any float32 logit.
MIN_MARGIN_NATS, MAX_MARGIN_NATS = 0.1, 1000.0
#: Seconds of silence before a run is stalled. Below a tenth of a second every gap between
#: two sends of the hook is a stall; a run silent for 30 days is over, not stalled.
MIN_STALL_TIMEOUT_S, MAX_STALL_TIMEOUT_S = 0.1, 30 * 24 * 3600.0

#: The plateau's shortest window, in steps: it keeps block sums, not points, so a long window
#: costs no state; a million steps is longer than any run needs before its first judgement.
MAX_WINDOW_STEPS = 1_000_000
#: Decades (powers of ten) of a layer's gradient norm against its own level and the others'.
#: A tenth of a decade (x1.26) is minibatch noise; 30 decades is the floor an exactly zero
#: norm is taken at (``layer_gradients.ZERO_LOG10``): a larger threshold never fires.
MIN_DECADES, MAX_DECADES = 0.1, 30.0

#: The relative distance tolerated between data-parallel replicas: 1 is ranks as far apart as
#: their weights are large, so a larger tolerance would let every drift through.
MAX_RANK_TOLERANCE = 1.0

_POINTS = (1, MAX_POINTS_SETTING, "MAX_POINTS_SETTING: values kept per series in the state saved with every batch")
_SIGMAS = (MIN_SIGMAS, MAX_SIGMAS, "MIN_SIGMAS..MAX_SIGMAS: robust sigmas")
_GROWTH = (1.0, MAX_GROWTH_RATIO, "MAX_GROWTH_RATIO: a larger ratio never fires")
_FRACTION = (0.0, 1.0, "a fraction")
_CURVATURE = (MIN_CURVATURE_RATIO, MAX_CURVATURE_RATIO, "MIN_CURVATURE_RATIO..MAX_CURVATURE_RATIO: times 2/lr")

#: ``{setting: (min, max, reason)}``, inclusive, for every int and float setting of every
#: detector (a test checks that none is missing).
BOUNDS: dict[str, tuple[float, float, str]] = {
    **{
        k: _POINTS
        for k in (
            "window",
            "warmup",
            "smooth_points",
            "level_points",
            "patience",
            "grad_window",
            "grad_smooth_points",
            "clear_points",
            "recover_points",
            "train_smooth_points",
            "eval_patience",
            "baseline_points",
            "static_patience",
            "explode_patience",
        )
    },
    **{k: (0, MAX_POINTS_SETTING, "MAX_POINTS_SETTING: steps") for k in ("rejoin_steps", "min_steps", "delay_steps")},
    "trim": (0, MAX_POINTS_SETTING, "MAX_POINTS_SETTING: points of the window"),
    "min_window": (2, MAX_WINDOW_STEPS, "MAX_WINDOW_STEPS: steps; the window grows with the run past it anyway"),
    "growth_ratio": _GROWTH,
    "threshold": _SIGMAS,
    "recover_threshold": _SIGMAS,
    "ratio_sigmas": _SIGMAS,
    "run_sigmas": _SIGMAS,
    "ratio": _GROWTH,
    "runaway_ratio": _GROWTH,
    "recover_ratio": _GROWTH,
    "grad_ratio": _GROWTH,
    "critical_ratio": _GROWTH,
    "min_rise": (0.0, MAX_GROWTH_RATIO, "MAX_GROWTH_RATIO: a larger rise never fires"),
    "min_rise_of_start": (0.0, MAX_GROWTH_RATIO, "MAX_GROWTH_RATIO: a larger rise never fires"),
    **{
        k: _FRACTION
        for k in (
            "runaway_progress",
            "recovering_fraction",
            "warn_fraction",
            "critical_fraction",
            "zero_loss_warn",
            "drop",
            "recover_tolerance",
            "window_fraction",
            "min_change",
            "progress_fraction",
            "lr_floor",
            "alternating_fraction",
            "period2_ratio",
            "min_amplitude",
            "acc_drop",
            "train_improvement",
            "recover_fraction",
            "level",
        )
    },
    **{k: _CURVATURE for k in ("near_ratio", "at_ratio", "trace_ratio")},
    **{
        k: (MIN_DECADES, MAX_DECADES, "MIN_DECADES..MAX_DECADES: powers of ten")
        for k in ("vanish_decades", "explode_decades", "static_decades")
    },
    "tolerance": (0.0, MAX_RANK_TOLERANCE, "MAX_RANK_TOLERANCE: a relative distance between replicas"),
    "margin_warn": (MIN_MARGIN_NATS, MAX_MARGIN_NATS, "MIN_MARGIN_NATS..MAX_MARGIN_NATS: nats"),
    "timeout_s": (MIN_STALL_TIMEOUT_S, MAX_STALL_TIMEOUT_S, "MIN_STALL_TIMEOUT_S..MAX_STALL_TIMEOUT_S: seconds"),
}


def check_bounds(where: str, key: str, value: float) -> None:
    """``ValueError`` naming the bound if ``value`` is outside the bounds of setting ``key``."""
    bound = BOUNDS.get(key)
    if bound is None:
        return
    lo, hi, why = bound
    if value < lo:
        raise ValueError(f"{where} must be at least {lo:g} ({why}), got {value!r}")
    if value > hi:
        raise ValueError(f"{where} must be at most {hi:g} ({why}), got {value!r}")
