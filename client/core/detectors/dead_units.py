"""Dead units: a layer whose ReLU units stop firing, more of them as training goes on.

A ReLU unit whose pre-activation is negative on every input outputs exactly zero and gets
exactly zero gradient: it cannot come back by itself (the "dying ReLU" problem; Lu et al.,
"Dying ReLU and Initialization", 2019). Too high a learning rate, a large negative bias
update or a bad initialisation kill them in numbers. AUTOTRAINER (Zhang et al., ICSE 2021)
flags a layer when the share of its dead units passes a level.

The hook sends, per activation module, the share of its units that output zero on the whole
batch (``dead/<module>``, opt-in: ``attach(..., dead_units=True)``). A healthy ReLU net has
some dead units, at times many from the start (a wide layer at a poor init); what is a
failure is a layer that is mostly dead *and got there during the run*. So a module is
flagged when its smoothed share is past ``level`` and has risen by ``min_rise`` above the
lowest smoothed share it had earlier, for ``patience`` points in a row; it is back when its
share falls below ``recover_fraction`` of the level (hysteresis).

The state is a few numbers per module, for at most ``MAX_MODULES`` modules, and a count of
the flagged ones.
"""

from __future__ import annotations

import dataclasses

from ._base import ChangeLog, Detector, finite, fmt

#: The per-module series the hook sends.
PREFIX = "dead/"
#: Half of a layer's units dead on a whole batch. The healthy ReLU runs of the corpus stay
#: under 30% in every layer; AUTOTRAINER's dying-ReLU rule uses a level of the same order.
DEAD_LEVEL = 0.5
#: ... and risen by 20 points of share above the layer's lowest (smoothed) share: a layer
#: that is 60% dead from its first step and stays there is a design, not a failure.
DEAD_MIN_RISE = 0.2
#: Points averaged (exponentially, this time constant) before judging: one batch on which a
#: class is missing can silence units that only that class uses.
DEAD_SMOOTH_POINTS = 3
#: Points in a row past the condition before a module counts (the series comes on the hook's
#: expensive steps only, every few to 100 steps).
DEAD_PATIENCE = 3
#: A flagged module is back below this share of the level (hysteresis: 0.8 x 50% = 40%) ...
DEAD_RECOVER_FRACTION = 0.8
#: ... for this many points; then the episode resolves when no module is flagged.
DEAD_CLEAR_POINTS = 3
#: Units that die again within 500 steps of recovering: the same episode.
DEAD_REJOIN = 500
#: Modules followed per run (a few numbers each in the state saved with each ingest batch).
MAX_MODULES = 1024

# Per-module state: [points seen, smoothed share, lowest smoothed share, run past, back, flagged]
_N, _S, _MIN, _RUN, _BACK, _FLAG = range(6)


@dataclasses.dataclass(frozen=True)
class DeadUnitsParams:
    """Settings of :class:`DeadUnitsDetector`."""

    prefix: str = PREFIX  #: per-module dead shares: series named prefix + module
    level: float = DEAD_LEVEL  #: flagged when the smoothed share of dead units is past this fraction ...
    min_rise: float = DEAD_MIN_RISE  #: ... and this many points of share above its lowest earlier share
    smooth_points: int = DEAD_SMOOTH_POINTS  #: time constant of the smoothing, in points
    patience: int = DEAD_PATIENCE  #: points in a row past the condition before a module counts
    recover_fraction: float = DEAD_RECOVER_FRACTION  #: a flagged module is back below this share of the level
    clear_points: int = DEAD_CLEAR_POINTS
    rejoin_steps: int = DEAD_REJOIN  #: steps after a resolution within which the same episode resumes

    def __post_init__(self):
        if not self.prefix:
            raise ValueError("dead_units: prefix must name the per-module series (dead/)")
        if not 0 < self.level < 1:
            raise ValueError("dead_units: level must be in (0, 1)")
        if min(self.smooth_points, self.patience, self.clear_points) < 1:
            raise ValueError("dead_units: need smooth_points, patience and clear_points >= 1")


class DeadUnitsDetector(Detector):
    """A layer whose share of dead units passed a level and grew during the run. Warning.

    Key: ``dead`` (one episode per run naming every module involved: units dying in one
    layer starve the layers below it of gradient, one incident).

        det = DeadUnitsDetector(DeadUnitsParams(level=0.7))
        state = {}
        changes = det.update(state, [("dead/fc1", 0, 0.05), ("dead/fc1", 10, 0.9)])
    """

    name = "dead_units"
    Params = DeadUnitsParams
    KEY = "dead"

    def accepts(self, series: str) -> bool:
        p = self.params.prefix
        return series.startswith(p) and len(series) > len(p)

    def point(self, state: dict, series: str, step: int, value: float, log: ChangeLog) -> None:
        p = self.params
        if not finite(value):
            return
        mods = state.get("mods")
        if mods is None:  # (not setdefault: that builds the default at every point)
            mods = state["mods"] = {}
        m = mods.get(series)
        if m is None:
            if len(mods) >= MAX_MODULES:
                return
            m = mods[series] = [0, value, value, 0, 0, 0]
        m[_N] += 1
        m[_S] += (value - m[_S]) / min(m[_N], p.smooth_points)
        s = m[_S]
        was = m[_FLAG]
        if m[_FLAG]:
            m[_BACK] = m[_BACK] + 1 if s < p.recover_fraction * p.level else 0
            if m[_BACK] >= p.clear_points:
                m[_FLAG] = m[_RUN] = 0
                m[_MIN] = s
        else:
            past = s >= p.level and s - m[_MIN] >= p.min_rise
            m[_RUN] = m[_RUN] + 1 if past else 0
            if m[_RUN] >= p.patience:
                m[_FLAG], m[_BACK] = 1, 0
            elif not past:
                m[_MIN] = min(m[_MIN], s)
        if m[_FLAG] != was:  # a count, so that a step with none flagged costs O(1) per point
            state["flagged"] = state.get("flagged", 0) + (1 if m[_FLAG] else -1)
        if state.get("flagged"):
            self._hold(state, log, step, [(n, x) for n, x in mods.items() if x[_FLAG]])
        elif self.is_open(state, self.KEY):
            self.clear(state, log, self.KEY, step, p.clear_points)

    def _hold(self, state: dict, log: ChangeLog, step: int, flagged: list) -> None:
        p = self.params
        flagged.sort(key=lambda f: -f[1][_S])
        name, m = flagged[0]
        cut = len(p.prefix)
        names = [f[0][cut:] for f in flagged]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        many = f" Layers involved: {shown}." if len(names) > 1 else ""
        self.hold(
            state,
            log,
            self.KEY,
            step,
            "warning",
            m[_S],
            f"Units of layer {names[0]} are dying: at step {step}, {fmt(100 * m[_S])}% of them output zero on "
            f"the whole batch, up from {fmt(100 * m[_MIN])}% earlier in the run.{many} A dead ReLU gets no "
            "gradient and does not come back: too high a learning rate, a large negative bias update or a "
            "poor initialisation does this.",
            {
                "layer": names[0],
                "layers": names[:20],
                "layers_count": len(names),
                "dead_share": m[_S],
                "lowest_share": m[_MIN],
                "level": p.level,
                "min_rise": p.min_rise,
            },
        )
