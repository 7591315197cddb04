"""Episode hygiene and incidents in the detector set: first detection, rejoining, causes."""

from __future__ import annotations

import math
import random

import pytest

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


def _rising(jump: int | None, seed: int = 0, n: int = 260) -> list[tuple[str, int, float]]:
    """A noisy loss (30% log-normal) that starts running away at step 200 (x e every 8 steps),
    with a 10x jump at ``jump``: a run blowing up gradually, its loss jumping on the way."""
    rng = random.Random(seed)
    pts = []
    for s in range(n):
        v = math.exp(0.3 * rng.gauss(0, 1)) * (math.exp((s - 200) / 8) if s >= 200 else 1.0)
        pts += [("loss", s, v * (10 if s == jump else 1)), ("grad/norm", s, 1.0)]
    return pts


def _step_by_step(pts):
    ds, state, out = DetectorSet(), {}, []
    for step in sorted({p[1] for p in pts}):
        out += [(step, c) for c in ds.update(state, [p for p in pts if p[1] == step])]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_jump_while_a_divergence_builds_waits_and_is_claimed_by_it(seed):
    """The smoothed loss has been running away since ~207 when the loss jumps at 218: the jump
    waits (the divergence is suspected) and is told as the divergence's consequence, so the
    incident is paged once, by its cause."""
    log = _step_by_step(_rising(jump=218, seed=seed))
    loud = [(s, c.detector) for s, c in log if c.action == "open" and c.cause is None]
    assert loud == [(loud[0][0], "divergence")]
    spike = [c for _, c in log if c.detector == "loss_spike"]
    assert spike and all(c.cause and c.cause["detector"] == "divergence" for c in spike)


def test_a_jump_with_no_divergence_building_is_told_two_steps_after_it(monkeypatch):
    """The same jump on a loss with no trend: nothing to wait for, told at its delay."""
    pts = [p for p in _rising(jump=150, n=200)]
    log = _step_by_step(pts)
    assert [(s, c.action, c.detector, c.start_step, c.cause) for s, c in log if c.action == "open"] == [
        (152, "open", "loss_spike", 150, None)
    ]


def test_a_consequence_told_and_cleared_in_one_batch_names_its_root_in_both_changes():
    """A held jump that is told and resolved within one batch (here: the whole run at once)
    opens and resolves with its root, not as a root of its own (which would page it)."""
    pts = []
    for s in range(260):
        loss = 40.0 if s == 170 else 1.0 + 0.05 * ((s * 7919) % 13) / 13
        pts += [("loss", s, loss), ("grad/norm", s, math.inf if 150 <= s < 200 else 1.0)]
    changes = DetectorSet().update({}, pts)
    spike = [c for c in changes if c.detector == "loss_spike"]
    assert [c.action for c in spike] == ["open", "resolve"]
    assert all(c.cause == {"detector": "divergence", "key": "nonfinite", "start_step": 150} for c in spike)


def test_a_jump_that_keeps_rising_slowly_is_told_at_its_delay():
    """A learning-rate bump: the loss jumps 8x, then rises 1.4x and 1.05x before it turns
    (as the corpus's lr-bump runs do). That is no run blowing up (which grows by orders of
    magnitude a step): told two steps after the jump, not when it turns."""
    rng = random.Random(0)
    loss = [math.exp(0.3 * rng.gauss(0, 1)) for _ in range(100)] + [8.0, 11.0, 11.5, 9.5, 8.0, 5.0, 2.0, 1.0, 1.0]
    log = _step_by_step([p for s, v in enumerate(loss) for p in (("loss", s, v), ("grad/norm", s, 1.0))])
    assert [(s, c.detector, c.start_step) for s, c in log if c.action == "open"] == [(102, "loss_spike", 100)]


def test_a_loss_jump_past_the_edge_of_stability_belongs_to_its_incident():
    """Full-batch GD with sharpness above 2/lr: the loss catapults. The jump is the edge's
    own signature, told under the edge-of-stability alert, not paged on its own."""
    pts = []
    for s in range(200):
        lam = 8.0 + 4.0 * s / 100  # 2/lr = 10: crossed at step 50
        loss = 40.0 if s == 150 else 1.0 + 0.05 * ((s * 7919) % 13) / 13
        pts += [("loss", s, loss), ("grad/norm", s, 1.0)]
        if s % 10 == 0:
            pts += [("hessian/lambda_max", s, lam), ("hessian/two_over_lr", s, 10.0)]
    log = _step_by_step(pts)
    assert [c.detector for _, c in log if c.action == "open" and c.cause is None] == ["edge_of_stability"]
    spike = [c for _, c in log if c.detector == "loss_spike"]
    assert spike and all(c.cause and c.cause["detector"] == "edge_of_stability" for c in spike)
