"""Ranks drifting apart: data-parallel replicas that no longer hold the same model.

The hook compares checksums of the ranks' replicated weights and optimizer state every
``rank_check_every`` steps (``stethoscope._ranks``) and sends, at each check,
``ddp/ranks_disagreeing`` (how many ranks differ from the most common checksums),
``ddp/param_checksum_spread`` (the largest relative distance of a rank from them) and
``ddp/rank_drift/<r>`` for each rank that differs. Under DDP the replicas are bit-identical
after every step, so any difference is a silent error (TrainCheck, OSDI 2025): a rank that
skipped an optimizer step, a weight changed outside the all-reduce, a corrupted replica. It is
critical: from then on the ranks train different models and average gradients that belong
to none of them, and nothing in the loss or the gradient norm shows it.

A setup whose replicas differ by harmless rounding (ranks on different hardware, a
nondeterministic kernel applied to the weights) sets ``tolerance``: a rank counts only when
its relative distance exceeds it. The default, 0, counts any difference at all.

Each check is judged once, when its count and the drift of every rank it counted have come
(in any order), or when a later check begins.
"""

from __future__ import annotations

import dataclasses

from ._base import ChangeLog, Detector, finite, fmt

SPREAD = "ddp/param_checksum_spread"
DISAGREEING = "ddp/ranks_disagreeing"
RANK_DRIFT = "ddp/rank_drift/"
#: Any difference: DDP replicas are bit-identical after each step (the same all-reduced
#: gradient, the same optimizer), and the hook's bit checksum is exact and order-free, so a
#: healthy run shows exactly 0. The distance a tolerance is compared with is a lower bound
#: (from the weights' norms): one weight of a 9K-parameter MLP moved by 1e-3 reads 5e-7 in the
#: corpus, a skipped optimizer step 5e-4, and one moved by one ulp 0. Set a tolerance only for
#: replicas known to differ by harmless rounding (ranks on different hardware running
#: nondeterministic kernels on the weights), and expect it to hide drifts that small.
RANK_TOLERANCE = 0.0
#: Checks in a row with every rank agreeing before the episode resolves (the replicas were
#: made equal again: a reload from a checkpoint, a re-broadcast).
RANK_CLEAR_POINTS = 1
#: Ranks named in the message (the evidence lists up to ``MAX_LISTED``).
SHOWN = 5
MAX_LISTED = 64
KEY = "ranks"


@dataclasses.dataclass(frozen=True)
class RankDriftParams:
    """Settings of :class:`RankDriftDetector`."""

    tolerance: float = RANK_TOLERANCE  #: a rank counts when its relative distance from the others exceeds this
    clear_points: int = RANK_CLEAR_POINTS

    def __post_init__(self):
        if not self.tolerance >= 0:
            raise ValueError("rank_drift: tolerance must be >= 0 (0: any difference counts)")
        if self.clear_points < 1:
            raise ValueError("rank_drift: clear_points must be >= 1")


class RankDriftDetector(Detector):
    """Data-parallel ranks whose weights or optimizer state differ. Critical; key ``ranks``.

    det = RankDriftDetector(RankDriftParams(tolerance=1e-6))
    state = {}
    changes = det.update(state, [("ddp/param_checksum_spread", 50, 2e-4),
                                 ("ddp/ranks_disagreeing", 50, 1.0), ("ddp/rank_drift/1", 50, 2e-4)])
    """

    name = "rank_drift"
    Params = RankDriftParams

    def accepts(self, series: str) -> bool:
        return series in (SPREAD, DISAGREEING) or (
            series.startswith(RANK_DRIFT) and series[len(RANK_DRIFT) :].isdigit()
        )

    def point(self, state: dict, series: str, step: int, value: float, log: ChangeLog) -> None:
        cur = state.get("cur")
        if cur is not None and step > cur["step"]:
            self._judge(state, log)
            cur = None
        if cur is None:
            if step <= state.get("judged", -1):
                return
            cur = state["cur"] = {"step": step, "count": None, "spread": None, "ranks": {}}
        if series == DISAGREEING:
            cur["count"] = value
        elif series == SPREAD:
            cur["spread"] = value
        elif len(cur["ranks"]) < MAX_LISTED:
            cur["ranks"][series[len(RANK_DRIFT) :]] = value
        count = cur["count"]
        if count is not None and cur["spread"] is not None and (not finite(count) or len(cur["ranks"]) >= count):
            self._judge(state, log)

    def _judge(self, state: dict, log: ChangeLog) -> None:
        cur = state.pop("cur")
        step = cur["step"]
        state["judged"] = step
        tol = self.params.tolerance
        count, spread = cur["count"] or 0.0, cur["spread"]
        ranks = sorted((int(r), d) for r, d in cur["ranks"].items() if tol == 0 or not finite(d) or d > tol)
        if count > 0 and not cur["ranks"] and (tol == 0 or spread is None or not finite(spread) or spread > tol):
            ranks = [(-1, spread if spread is not None else 0.0)]  # a count without its ranks (more than listed)
        if not ranks:
            if self.is_open(state, KEY):
                self.clear(state, log, KEY, step, self.params.clear_points)
            return
        named = [r for r, _ in ranks if r >= 0]
        shown = ", ".join(str(r) for r in named[:SHOWN]) + (
            f" and {len(named) - SHOWN} more" if len(named) > SHOWN else ""
        )
        who = f"rank {shown}" if len(named) == 1 else (f"ranks {shown}" if named else f"{fmt(count)} ranks")
        worst = max(ranks, key=lambda x: x[1] if finite(x[1]) else float("inf"))
        dist = (
            f"relative distance {fmt(worst[1])}"
            if worst[1] > 0 or not finite(worst[1])
            else "equal sums: their bits or their optimizer state differ"
        )
        verb = "holds" if len(named) == 1 else "hold"
        message = (
            f"Data-parallel replicas disagree at step {step}: {who} no longer {verb} the same weights "
            f"(or optimizer state) as the others ({fmt(count)} disagreeing; {dist}). The ranks now train "
            "different models. A rank that skipped an optimizer step, a weight changed outside the "
            "all-reduce or a parameter DDP does not synchronise does this."
        )
        self.hold(
            state,
            log,
            KEY,
            step,
            "critical",
            spread if spread is not None and finite(spread) else 1e300,
            message,
            {
                "ranks": named[:MAX_LISTED],
                "ranks_disagreeing": count,
                "spread": spread if spread is not None else 0.0,
                "tolerance": tol,
                "check_step": step,
            },
        )
