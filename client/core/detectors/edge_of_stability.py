"""Edge of stability: sharpness against the 2/lr bound of gradient descent."""

from __future__ import annotations

import dataclasses

from ._base import ChangeLog, Detector, fmt

#: Cohen et al. 2021: full-batch GD with step size lr is unstable along a direction of
#: curvature above 2/lr; sharpness rises until lambda_max ~ 2/lr and hovers there.
EOS_AT_RATIO = 1.0
#: Give notice when lambda_max is within 10% of 2/lr: progressive sharpening covers that last
#: stretch in a short part of the run.
EOS_NEAR_RATIO = 0.9
#: Wu & Su 2023: a minimum is linearly stable for SGD only if tr(H) <= 2/lr (roughly).
TRACE_RATIO = 1.0
#: At the edge, each catapult knocks sharpness down by a quarter for a few measurements
#: before it climbs back (Cohen et al. 2021, Fig. 1; Lewkowycz et al. 2020): five
#: measurements in a row below ``near_ratio`` end the episode, a catapult does not.
EOS_CLEAR_POINTS = 5


def _bound_rank(series: str) -> int:
    """0 for a series that sets the bound (2/lr, lr), 1 for the curvature measured against it."""
    return 0 if series == "hessian/two_over_lr" or series == "lr" or series.startswith("lr/") else 1


#: Sharpness back at the edge within 100 steps of leaving it is the same episode (catapults).
EOS_REJOIN = 100


@dataclasses.dataclass(frozen=True)
class EdgeOfStabilityParams:
    """Settings of :class:`EdgeOfStabilityDetector`."""

    near_ratio: float = EOS_NEAR_RATIO
    at_ratio: float = EOS_AT_RATIO
    #: The tr(H) > 2/lr test (Wu & Su 2023) is a statement about SGD noise at a stable minimum,
    #: not a threshold for GD: on full-batch GD it fired at step 0 and stayed open. Off unless
    #: the project says its runs are stochastic (turn it on for SGD if you trust the bound).
    check_trace: bool = False
    trace_ratio: float = TRACE_RATIO
    clear_points: int = EOS_CLEAR_POINTS
    rejoin_steps: int = EOS_REJOIN  #: steps after a resolution within which the same episode resumes

    def __post_init__(self):
        if not 0 < self.near_ratio <= self.at_ratio or self.trace_ratio <= 0 or self.clear_points < 1:
            raise ValueError("edge_of_stability: need 0 < near_ratio <= at_ratio, trace_ratio > 0, clear_points >= 1")


class EdgeOfStabilityDetector(Detector):
    """Sharpness at the edge of stability, keys ``lambda_max`` and ``trace``.

    ``lambda_max``: info at ``near_ratio * 2/lr``, warning at or past ``at_ratio * 2/lr``.
    ``trace``: warning when tr(H) is past ``trace_ratio * 2/lr`` (meaningful for SGD).
    2/lr comes from ``hessian/two_over_lr`` when the hook sends it, else from the largest of
    ``lr`` and ``lr/<group>``.

        det = EdgeOfStabilityDetector(EdgeOfStabilityParams(check_trace=False))
    """

    name = "edge_of_stability"
    Params = EdgeOfStabilityParams
    #: Learning-rate groups remembered; more than this and the oldest is forgotten.
    MAX_LR_GROUPS = 32

    def accepts(self, series: str) -> bool:
        return (
            series == "hessian/lambda_max"
            or series == "hessian/trace"
            or series == "hessian/two_over_lr"
            or series == "lr"
            or series.startswith("lr/")
        )

    #: Within one step, take the bound (2/lr, lr) before the curvature measured at that step:
    #: lambda_max at step t must be compared with 2/lr at step t, not with the one before.
    step_rank = staticmethod(_bound_rank)

    def point(self, state: dict, series: str, step: int, value: float, log: ChangeLog) -> None:
        if value - value != 0.0:  # not finite
            return
        if series == "hessian/two_over_lr" or series == "lr" or series.startswith("lr/"):
            if series == "hessian/two_over_lr":
                state["two_over_lr"] = value
            else:
                lrs = state.get("lr")
                if lrs is None:  # (not setdefault: that builds the default at every point)
                    lrs = state["lr"] = {}
                lrs[series] = value
                if len(lrs) > self.MAX_LR_GROUPS:
                    del lrs[next(iter(lrs))]
            # A curvature point that came just before its bound (same step, earlier in the batch).
            if "pending" in state:
                for s, st, v in state.pop("pending"):
                    self._curvature(state, s, st, v, log)
            return
        self._curvature(state, series, step, value, log)

    def _curvature(self, state: dict, series: str, step: int, value: float, log: ChangeLog) -> None:
        bound = state.get("two_over_lr")
        if bound is None:
            lr = max(state.get("lr", {}).values(), default=0.0)
            if lr <= 0:
                pending = state.setdefault("pending", [])
                pending.append([series, step, value])
                del pending[:-2]
                return
            bound = 2.0 / lr
        p = self.params
        ratio = value / bound
        if series == "hessian/lambda_max":
            if ratio >= p.near_ratio:
                ev = {"value": value, "two_over_lr": bound, "ratio": ratio}
                at = ratio >= p.at_ratio
                what = "reached" if at else "is approaching"
                self.hold(
                    state,
                    log,
                    "lambda_max",
                    step,
                    "warning" if at else "info",
                    ratio,
                    f"Sharpness {what} the edge of stability at step {step}: the loss may oscillate or rise. "
                    f"Hessian lambda_max {fmt(value)} is {fmt(ratio)}x 2/lr = {fmt(bound)}.",
                    {**ev, "near_ratio": p.near_ratio, "at_ratio": p.at_ratio},
                )
            else:
                self.clear(state, log, "lambda_max", step, p.clear_points)
        elif p.check_trace:
            if ratio > p.trace_ratio:
                ev = {"value": value, "two_over_lr": bound, "ratio": ratio}
                self.hold(
                    state,
                    log,
                    "trace",
                    step,
                    "warning",
                    ratio,
                    f"The minimum is too sharp for SGD at step {step}: training may leave it. "
                    f"Hessian trace {fmt(value)} is {fmt(ratio)}x 2/lr = {fmt(bound)}, "
                    f"so it is not linearly stable for SGD.",
                    {**ev, "trace_ratio": p.trace_ratio},
                )
            else:
                self.clear(state, log, "trace", step, p.clear_points)
