"""The detector set: every enabled detector, per-project settings, one call per batch."""

from __future__ import annotations

import dataclasses
import typing
from itertools import repeat
from operator import itemgetter
from typing import Iterable, Sequence

from ._base import OPEN, RESOLVE, UPDATE, AlertChange, ChangeLog, Detector, episode_change
from ._bounds import check_bounds
from .dead_units import DeadUnitsDetector
from .divergence import DivergenceDetector
from .edge_of_stability import EdgeOfStabilityDetector
from .layer_gradients import LayerGradientsDetector
from .loss_spike import LossSpikeDetector
from .oscillation import OscillationDetector
from .overfitting import OverfittingDetector
from .plateau import PlateauDetector
from .rank_drift import RankDriftDetector
from .slow_steps import SlowStepsDetector
from .softmax_collapse import SoftmaxCollapseDetector
from .stability_gap import StabilityGapDetector
from .stalled import StalledRunDetector

#: Every detector, by the name used in settings, states and alerts.
DETECTORS: dict[str, type[Detector]] = {
    cls.name: cls
    for cls in (
        DivergenceDetector,
        LossSpikeDetector,
        SoftmaxCollapseDetector,
        EdgeOfStabilityDetector,
        StabilityGapDetector,
        StalledRunDetector,
        PlateauDetector,
        OscillationDetector,
        OverfittingDetector,
        LayerGradientsDetector,
        RankDriftDetector,
        DeadUnitsDetector,
        SlowStepsDetector,
    )
}

#: One point: (series, step, value).
Point = tuple[str, int, float]

_step = itemgetter(1)
#: Incidents: which detectors' alerts another detector's episode explains, root causes in the
#: order they are preferred. A run blowing up makes its loss jump, its logits grow one-hot and
#: its sharpness rise; a loss spike can push samples into Softmax Collapse for a few steps.
#: Those alerts are consequences: kept and shown under their root, never paged on their own.
#: Past the edge of stability (sharpness above 2/lr) the loss of gradient descent rises and
#: catapults back: those jumps are the edge's own signature, part of its incident.
#: A loss swinging up and down every step is gradient descent past that edge (or a run
#: blowing up); a run that stops making progress while it diverges, oscillates or sits past
#: the edge is stalled by that, not by a learning rate too low -- or by a layer whose gradient
#: vanished (dead units, a saturated deep stack): the run cannot learn through it. One layer's
#: gradient exploding while the whole run blows up is part of the divergence; a layer whose
#: gradient explodes alone (its effective learning rate with it) shakes the loss: the jump is
#: that layer's doing. Units that die take their layer's gradient with them: a unit whose
#: output is zero on the whole batch passes back exactly zero, so the weights feeding it get
#: none, and a layer mostly dead starves every layer below it. The dead share is measured on
#: the activations, upstream of the gradient, and names the mechanism (which layer, how many
#: units); the vanishing gradient is its consequence, and a plateau of a net whose units died
#: is that death's incident (dead units come before layer_gradients among the plateau's roots).
CAUSES: dict[str, tuple[str, ...]] = {
    "loss_spike": ("divergence", "edge_of_stability", "layer_gradients"),
    "softmax_collapse": ("divergence", "loss_spike"),
    "edge_of_stability": ("divergence",),
    "oscillation": ("divergence", "edge_of_stability"),
    "plateau": ("divergence", "oscillation", "edge_of_stability", "dead_units", "layer_gradients"),
    "layer_gradients": ("divergence", "dead_units"),
}
#: Stability gaps of several tasks after one task switch are one incident (the switch), under
#: the first task whose accuracy fell.
SAME_SWITCH = "stability_gap"
#: Alerts that wait while a root is suspected: its condition has held since before the alert
#: began (``SUSPECT_LEAD`` steps or more) and its patience has not run out. A run blowing up
#: gradually makes its loss jump before its divergence is confirmed (on the corpus's warm-up
#: divergences the smoothed loss had been running away for 13-16 steps when the loss jumped,
#: and the divergence opened 4-6 steps after the jump was told: two pages for one incident).
#: A jump that itself starts the root's condition (a spike lifts the smoothed loss) is told
#: after its own delay: waiting for the divergence's patience there would make every spike late.
SUSPECTED_BY: dict[str, str] = {"loss_spike": "divergence"}
SUSPECT_LEAD = 3
#: A root that came first, the other way round: a gradient norm running away because one
#: layer's gradient exploded alone before it is that layer's incident (the global norm is that
#: layer's norm then; a max-norm constraint far below a layer's norm does this without the run
#: blowing up). Only while the runaway is a warning: a critical divergence (a NaN, a loss a
#: thousand times its best) is never explained away; it is paged as a root.
#: Likewise a loss that keeps climbing for some steps after a jump (inputs badly scaled for a
#: few steps shake the weights): the spike's page told of it.
EXPLAINED_BEFORE: dict[str, dict[str, tuple[str, ...]]] = {
    "divergence": {"layer_gradients": ("exploding",), "loss_spike": ("loss",)}
}
#: A root explains consequences that start up to this many steps after it resolved (a loss
#: that settles after a spike can leave the logits one-hot for a few more readings).
INCIDENT_GRACE_STEPS = 50

#: Series names whose routing is cached; a run with more distinct names still works, it just
#: recomputes routes after the cache is cleared.
_ROUTE_CACHE = 4096


class DetectorSet:
    """Runs every enabled detector on the points of one run.

    ``settings`` maps a detector name to overrides of its parameters, plus ``enabled``
    (default true); anything unknown is a ``ValueError``. ``state`` is a JSON-safe dict that
    the caller keeps between calls: ``{detector_name: {...}}`` (the server saves one row per
    detector, in the transaction that stores the points).

        detectors = DetectorSet({"loss_spike": {"threshold": 8.0}, "stalled": {"enabled": False}})
        state = {}
        for batch in batches:                   # [(series, step, value), ...]
            for change in detectors.update(state, batch):
                print(change.severity, change.message)
    """

    def __init__(self, settings: dict | None = None) -> None:
        self.detectors: list[Detector] = []
        settings = dict(settings or {})
        unknown = sorted(set(settings) - set(DETECTORS))
        if unknown:
            raise ValueError(f"unknown detector {unknown[0]!r}; known detectors: {', '.join(DETECTORS)}")
        for name, cls in DETECTORS.items():
            overrides = settings.get(name) or {}
            if not isinstance(overrides, dict):
                raise ValueError(f"settings for {name!r} must be an object of parameters, got {overrides!r}")
            overrides = dict(overrides)
            enabled = overrides.pop("enabled", True)
            if not isinstance(enabled, bool):
                raise ValueError(f"{name}.enabled must be true or false, got {enabled!r}")
            params = make_params(cls, overrides)
            if enabled:
                self.detectors.append(cls(params))
        self._routes: dict[str, list[Detector]] = {}
        self._plans: dict[tuple, list] = {}

    @staticmethod
    def defaults() -> dict:
        """Every detector's settings with their defaults: ``{name: {"enabled": True, ...}}``."""
        return {name: {"enabled": True, **_as_json(cls.Params())} for name, cls in DETECTORS.items()}

    def settings(self) -> dict:
        """The effective settings of this set, in the shape the constructor takes."""
        out = {name: {"enabled": False, **_as_json(cls.Params())} for name, cls in DETECTORS.items()}
        for det in self.detectors:
            out[det.name] = {"enabled": True, **_as_json(det.params)}
        return out

    def takes_any(self, names: Iterable[str]) -> bool:
        """Whether any detector takes a series of one of ``names`` (matched as ``route`` matches
        them, and cached alike)."""
        routes = self._routes
        for name in names:
            dets = routes.get(name)
            if dets is None:
                dets = self._takers(name)
            if dets:
                return True
        return False

    def _takers(self, name: str) -> list[Detector]:
        """The detectors that take series ``name``, matched once and cached (``_routes``; the
        callers look the cache up themselves first, once per name)."""
        routes = self._routes
        if len(routes) >= _ROUTE_CACHE:
            routes.clear()
        dets = routes[name] = [d for d in self.detectors if d.accepts(name)]
        return dets

    def route(self, series: Iterable[tuple[str, Sequence[int], Sequence[float]]]) -> dict[str, list[Point]]:
        """The points each detector takes: ``{detector name: [(series, step, value), ...]}``.

        ``series`` is ``[(name, steps, values), ...]``, as the server has a batch (a name may
        come more than once). Each name is matched against the detectors once (and cached);
        points of a series no detector takes are never touched. A detector's points are in
        step order, stable: ties keep the order they were given in.
        """
        routes = self._routes
        out: dict[str, list] = {}
        for name, steps, values in series:
            dets = routes.get(name)
            if dets is None:
                dets = self._takers(name)
            if dets and len(steps):
                pts = list(zip(repeat(name), steps, values))
                for d in dets:
                    out.setdefault(d.name, []).extend(pts)
        for pts in out.values():
            pts.sort(key=_step)
        return out

    def feed(self, state: dict, routed: dict[str, list[Point]]) -> list[AlertChange]:
        """Feed points as :meth:`route` gave them; return alert changes.

        Changes of an episode that another episode explains (:data:`CAUSES`) carry that root
        in ``cause``; a root that opens after its consequences adopts them (one ``update``
        each), so the incident ends up under its cause whichever alert came first.
        """
        changes: list[AlertChange] = []
        for d in self.detectors:
            pts = routed.get(d.name)
            if pts:
                changes += d.feed(state.setdefault(d.name, {}), pts)
        if changes:
            changes = attribute(state, changes)
        return changes

    def update(self, state: dict, points: Iterable[tuple[str, int, float]]) -> list[AlertChange]:
        """Feed one run's new points, in any interleaving of series; return alert changes.

        Points are taken in step order (stable, so a series' own order is kept); a point at
        or before the last step a detector saw for its series is ignored.
        """
        # What :meth:`route` makes of the runs of points of one series, built point by point:
        # each detector's points in the order given, then sorted by step (stable). Points of
        # many series interleaved (a step's points together) make runs of one point, so
        # grouping them first cost more than the detectors.
        routes = self._routes
        out: dict[str, list] = {}
        lists: dict[str, list] = {}  # series name -> the lists of the detectors taking it
        for pt in points:
            name = pt[0]
            into = lists.get(name)
            if into is None:
                dets = routes.get(name)
                if dets is None:
                    dets = self._takers(name)
                into = lists[name] = [out.setdefault(d.name, []) for d in dets]
            if into:
                p = (name, pt[1], pt[2])
                for pts in into:
                    pts.append(p)
        for pts in out.values():
            pts.sort(key=_step)
        return self.feed(state, out)

    def feed_step(self, state: dict, step: int, names: tuple, values: Sequence[float]) -> list[AlertChange]:
        """:meth:`update` for the points of one step, ``names[i]`` at ``values[i]`` (the hook's
        record of a training step): the same changes, at a fraction of the cost for a few
        points a step. Which detector takes which entries is worked out once per ``names``
        tuple (cached, like :meth:`route`'s names); one step needs no grouping nor sorting.
        """
        plans = self._plans
        plan = plans.get(names)
        if plan is None:
            if len(plans) >= _ROUTE_CACHE:
                plans.clear()
            plan = plans[names] = self._plan(names)
        changes: list[AlertChange] = []
        # Detector.step_points for the detectors that keep Detector.feed, with one ChangeLog
        # for all of them: a log merges changes per (detector, key), so sharing it merges
        # nothing across detectors, and changes stay in detector order.
        log = ChangeLog()
        for d, idx, by_step in plan:
            own = state.get(d.name)
            if own is None:
                own = state[d.name] = {}
            if by_step:
                d.step_points(own, step, names, values, idx, log)
                continue
            changes += log.changes
            log = ChangeLog()
            changes += d.feed(own, [(names[i], step, values[i]) for i in idx])
        changes += log.changes
        if changes:
            changes = attribute(state, changes)
        return changes

    def _plan(self, names: tuple) -> list[tuple[Detector, tuple[int, ...], bool]]:
        """Per detector, in feeding order, the indices of the ``names`` it takes (those with
        none left out), and whether it feeds points as :meth:`Detector.feed` does (then
        :meth:`Detector.step_points` takes the step) or by a ``feed`` of its own."""
        plan = []
        for d in self.detectors:
            idx = tuple(i for i, n in enumerate(names) if d.accepts(n))
            if idx:
                rank = d.step_rank
                if rank is not None:  # Detector.feed's order within a step (stable)
                    idx = tuple(sorted(idx, key=lambda i: rank(names[i])))
                plan.append((d, idx, type(d).feed is Detector.feed))
        return plan

    def check(
        self, state: dict, now: float, last_seen: float | None, status: str, last_step: int | None = None
    ) -> list[AlertChange]:
        """Run the time-based detectors (stalled run); see :class:`StalledRunDetector`."""
        changes: list[AlertChange] = []
        for d in self.detectors:
            if isinstance(d, StalledRunDetector):
                changes += d.check(state.setdefault(d.name, {}), now, last_seen, status, last_step)
        return changes


def make_params(cls: type[Detector], overrides: dict):
    """``cls.Params`` with ``overrides`` checked by name, type and bounds (``_bounds.BOUNDS``);
    ``ValueError`` if wrong."""
    fields = {f.name: f for f in dataclasses.fields(cls.Params)}
    hints = typing.get_type_hints(cls.Params)
    kwargs = {}
    for key, value in overrides.items():
        if key not in fields:
            raise ValueError(f"{cls.name}: unknown setting {key!r}; known settings: enabled, {', '.join(fields)}")
        kwargs[key] = _coerce(f"{cls.name}.{key}", hints[key], value)
        if hints[key] in (int, float):
            check_bounds(f"{cls.name}.{key}", key, kwargs[key])
    return cls.Params(**kwargs)


def _coerce(where: str, kind, value):
    # The wire refuses NUL in series names (PostgreSQL's text cannot hold it): a setting
    # naming one would match nothing, and PostgreSQL could not store it as a name either.
    if any("\x00" in v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str)):
        raise ValueError(f"{where}: a series name cannot contain a NUL character")
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value - value == 0:
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif kind is tuple:
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ValueError(f"{where} must be a non-empty list of series names, got {value!r}")
    raise ValueError(f"{where} must be {getattr(kind, '__name__', kind)}, got {value!r}")


def _as_json(params) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items()}


def _same_switch(state: dict, c: AlertChange) -> AlertChange:
    """A stability gap opened by the same task switch as an open one is part of its incident."""
    eps = state.get(SAME_SWITCH, {}).get("episodes", {})
    switch = c.evidence.get("switch_step")
    same = [
        (ep["start"], key)
        for key, ep in eps.items()
        if key != c.key and ep["evidence"].get("switch_step") == switch and not ep.get("cause")
    ]
    if not same or c.key not in eps or min(same) > (c.start_step, c.key):
        return c
    start, key = min(same)
    eps[c.key]["cause"] = cause = {"detector": SAME_SWITCH, "key": key, "start_step": start}
    return dataclasses.replace(c, cause=cause)


def _suspected(state: dict, root: str, before: int) -> bool:
    """Whether detector ``root`` sees its condition building without having opened yet, and
    has since ``before`` or earlier."""
    return any(
        f.get("raw") and not f.get("hot") and f.get("since") is not None and f["since"] <= before
        for f in state.get(root, {}).get("flags", {}).values()
    )


def _root_of(state: dict, name: str, step: int) -> dict | None:
    """The episode that explains an alert of detector ``name`` at ``step``, as a ``cause``."""
    for root in CAUSES.get(name, ()):
        rs = state.get(root)
        if not rs:
            continue
        live = [
            (ep["start"], key)
            for key, ep in rs.get("episodes", {}).items()
            if not ep.get("quiet") and (ep.get("cause") or {}).get("detector") != name  # no cycles
        ]
        live += [
            (ep["start"], key)
            for key, ep in rs.get("closed", {}).items()
            if step - ep["resolved"] <= INCIDENT_GRACE_STEPS and ep["start"] <= step
        ]
        if live:
            start, key = min(live)
            return {"detector": root, "key": key, "start_step": start}
    return None


def _rank(cause: dict | None, name: str) -> int:
    roots = CAUSES.get(name, ())
    return len(roots) - roots.index(cause["detector"]) if cause and cause["detector"] in roots else 0


def attribute(state: dict, changes: list[AlertChange]) -> list[AlertChange]:
    """Give each change of a consequence its root (see :data:`CAUSES`), remembered in the
    episode; roots opened in this batch adopt the open episodes they explain."""
    out: list[AlertChange] = []
    touched: set[tuple[str, str]] = set()
    explained: set[tuple[str, str]] = set()  # episodes another alert explains: no roots
    for c in changes:
        if c.detector in EXPLAINED_BEFORE:
            c = _explained_before(state, c)
            if c.cause is not None:
                explained.add((c.detector, c.key))
        if c.action == OPEN and c.cause is None and c.detector in SUSPECTED_BY:
            ep = state.get(c.detector, {}).get("episodes", {}).get(c.key)
            if ep is not None and _suspected(state, SUSPECTED_BY[c.detector], c.start_step - SUSPECT_LEAD):
                # A root is taking shape (its condition holds, its patience runs): wait, so
                # that it claims this alert instead of both paging. Told when it clears.
                ep["held"] = c.end_step
                continue
        if c.detector == SAME_SWITCH and c.action == OPEN and c.cause is None:
            c = _same_switch(state, c)
        if c.detector in CAUSES:
            eps = state.get(c.detector, {})
            ep = eps.get("episodes", {}).get(c.key)
            if ep is None:
                # Resolved by now: a held alert told and cleared in one batch opens and
                # resolves here, and both changes must name its root.
                ep = eps.get("closed", {}).get(c.key)
                if ep is not None and ep["start"] != c.start_step:
                    ep = None
            if ep is not None:
                root = _root_of(state, c.detector, c.peak_step if c.action == RESOLVE else c.end_step)
                if _rank(root, c.detector) > _rank(ep.get("cause"), c.detector):
                    ep["cause"] = root
                if ep.get("cause") != c.cause:
                    c = dataclasses.replace(c, cause=ep.get("cause"))
            touched.add((c.detector, c.key))
        out.append(c)
    # A root that opened now adopts the open episodes it explains that have no better cause.
    opened = {
        c.detector for c in changes if c.action == OPEN and c.cause is None and (c.detector, c.key) not in explained
    }
    for name, roots in CAUSES.items():
        if not opened.intersection(roots):
            continue
        eps = state.get(name, {}).get("episodes", {})
        for key, ep in eps.items():
            if (name, key) in touched or ep.get("quiet"):  # a quiet episode is no alert yet
                continue
            if "held" in ep:  # not told yet: it will be, with its cause
                ep["cause"] = _root_of(state, name, ep["end"]) or ep.get("cause")
                continue
            root = _root_of(state, name, ep["end"])
            if _rank(root, name) > _rank(ep.get("cause"), name):
                ep["cause"] = root
                out.append(episode_change(UPDATE, name, key, ep))
    return out


def _explained_before(state: dict, c: AlertChange) -> AlertChange:
    """A change of a detector in :data:`EXPLAINED_BEFORE`: give its episode the root that opened
    before it, or take that root away once it turns critical."""
    ep = state.get(c.detector, {}).get("episodes", {}).get(c.key)
    if ep is None or c.action == RESOLVE:
        return c
    cause = ep.get("cause")
    if c.severity == "critical":
        if cause is not None and cause["detector"] in EXPLAINED_BEFORE[c.detector]:
            ep["cause"] = None
            return dataclasses.replace(c, cause=None)
        return c
    if cause is None:
        for root, keys in EXPLAINED_BEFORE[c.detector].items():
            eps = state.get(root, {}).get("episodes", {})
            live = [
                (rep["start"], key)
                for key, rep in eps.items()
                if key in keys
                and not rep.get("quiet")
                and "held" not in rep  # told already: the page the user has
                and rep.get("cause") is None
                and rep["start"] <= c.start_step
            ]
            if live:
                start, key = min(live)
                cause = ep["cause"] = {"detector": root, "key": key, "start_step": start}
                break
    return c if cause == c.cause else dataclasses.replace(c, cause=cause)
