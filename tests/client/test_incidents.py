"""Episode hygiene and incidents in the detector set: first detection, rejoining, causes."""

from __future__ import annotations

import math

from stethoscope.core.detectors import DetectorSet
from stethoscope.core.detectors._base import ChangeLog, Detector


class _Threshold(Detector):
    """A detector with no smoothing: the condition holds when the value is above 1."""

    name = "loss_spike"  # a name the engine knows, so it may have a cause

    class Params:
        rejoin_steps = 10

    def accepts(self, series):
        return series == "x"

    def point(self, state, series, step, value, log: ChangeLog):
        if value > 1:
            self.hold(state, log, "x", step, "critical" if value > 5 else "warning", value, f"x={value}", {"x": value})
        else:
            self.clear(state, log, "x", step, 1)


def _feed(det, state, pts):
    return det.update(state, [("x", s, v) for s, v in pts])


def test_an_episode_keeps_its_first_detection_beside_its_peak():
    det, state = _Threshold(), {}
    c1 = _feed(det, state, [(0, 0.5), (1, 2.0)])
    c2 = _feed(det, state, [(2, 9.0), (3, 3.0)])
    assert [c.action for c in c1] == ["open"] and c1[0].first["step"] == 1
    (c,) = c2
    assert c.severity == "critical" and c.peak_step == 2 and c.message == "x=9.0"
    assert c.first == {"step": 1, "severity": "warning", "message": "x=2.0", "evidence": {"x": 2.0}}


def test_coming_back_soon_after_resolving_continues_the_same_episode():
    det, state = _Threshold(), {}
    opened = _feed(det, state, [(0, 2.0)])
    resolved = _feed(det, state, [(1, 0.0)])
    back = _feed(det, state, [(8, 2.0)])
    assert [c.action for c in opened + resolved + back] == ["open", "resolve", "open"]
    assert back[0].start_step == opened[0].start_step == 0  # same episode: same start
    # Later than rejoin_steps: a new episode.
    _feed(det, state, [(9, 0.0)])
    (new,) = _feed(det, state, [(30, 2.0)])
    assert new.action == "open" and new.start_step == 30


def test_resolved_and_back_in_one_batch_is_one_update():
    det, state = _Threshold(), {}
    _feed(det, state, [(0, 2.0)])
    changes = _feed(det, state, [(1, 0.0), (2, 3.0)])
    assert [c.action for c in changes] == ["update"] and changes[0].end_step == 2


def _points(n, loss=lambda s: 1.0, sc=lambda s: 0.0):
    pts = []
    for s in range(n):
        pts.append(("loss", s, loss(s)))
        pts.append(("grad/norm", s, 1.0))
        pts.append(("logits/sc_fraction", s, sc(s)))
    return pts


def test_softmax_collapse_during_a_divergence_is_its_consequence():
    ds, state = DetectorSet(), {}
    # Steady, then the loss goes non-finite at 100 while the logits turn one-hot.
    changes = ds.update(
        state, _points(160, loss=lambda s: 1.0 if s < 100 else math.nan, sc=lambda s: 0.0 if s < 100 else 0.9)
    )
    roots = {(c.detector, c.key) for c in changes if c.cause is None}
    assert roots == {("divergence", "nonfinite")}
    sc = [c for c in changes if c.detector == "softmax_collapse"]
    assert sc and all(c.cause == {"detector": "divergence", "key": "nonfinite", "start_step": 100} for c in sc)


def test_a_root_that_opens_later_adopts_its_consequences():
    ds, state = DetectorSet(), {}
    first = ds.update(state, _points(100, sc=lambda s: 0.0 if s < 50 else 0.9))
    assert any(c.detector == "softmax_collapse" and c.action == "open" and c.cause is None for c in first)
    later = ds.update(state, [("loss", 100, math.inf), ("grad/norm", 100, 1.0), ("logits/sc_fraction", 100, 0.9)])
    adopted = [c for c in later if c.detector == "softmax_collapse"]
    assert adopted and adopted[-1].cause["detector"] == "divergence"
