"""Dead units: the rule on hand-made series, and the incident it roots."""

from __future__ import annotations

import pytest

from stethoscope.core.detectors import CAUSES, DeadUnitsDetector, DeadUnitsParams, DetectorSet


def _layers(n, value, k=3, every=5):
    return [(f"dead/fc{j}", s, value(j, s)) for s in range(0, n, every) for j in range(k)]


def test_a_layer_whose_units_die_is_one_warning_naming_it_and_it_clears_with_hysteresis():
    det, state = DeadUnitsDetector(), {}

    def value(j, s):
        if j == 1 and 300 <= s < 600:
            return 0.95
        if j == 1 and 600 <= s < 650:
            return 0.45  # below the level, above 80% of it: still flagged
        return 0.05 + 0.02 * ((s // 5 + j) % 3)

    changes = det.update(state, _layers(900, value))
    assert [(c.action, c.key) for c in changes] == [("open", "dead"), ("resolve", "dead")]
    opened, resolved = changes
    assert opened.evidence["layer"] == "fc1" and opened.severity == "warning"
    assert 300 <= opened.start_step <= 330
    assert "fc1" in opened.message and "output zero" in opened.message
    assert resolved.end_step >= 650
    assert all(len(m) == 6 for m in state["mods"].values())


def test_a_layer_dead_from_the_start_that_does_not_grow_is_not_an_alert():
    # 70% of the units dead from initialisation, steady: a wide layer at a poor init
    det = DeadUnitsDetector()
    assert det.update({}, _layers(2000, lambda j, s: 0.7 if j == 0 else 0.1)) == []


def test_one_noisy_batch_does_not_open_it():
    det = DeadUnitsDetector()
    assert det.update({}, _layers(1000, lambda j, s: 0.9 if s in (300, 305) else 0.1)) == []


def test_growing_death_opens_once_it_is_past_the_level():
    det = DeadUnitsDetector()
    changes = det.update({}, _layers(1000, lambda j, s: min(0.99, s / 1000) if j == 2 else 0.1))
    (c,) = changes
    assert c.action == "open" and c.evidence["layer"] == "fc2" and 500 <= c.start_step <= 540


def test_settings_are_checked():
    with pytest.raises(ValueError):
        DeadUnitsParams(level=1.5)
    with pytest.raises(ValueError):
        DetectorSet({"dead_units": {"patience": 0}})


def test_dead_units_root_the_plateau_and_the_vanishing_gradient_of_their_layer():
    assert "dead_units" in CAUSES["plateau"] and "dead_units" in CAUSES["layer_gradients"]
    assert CAUSES["plateau"].index("dead_units") < CAUSES["plateau"].index("layer_gradients")
    ds, state = DetectorSet(), {}
    pts = []
    for s in range(1200):
        dead = s >= 100
        pts.append(("loss", s, 2.3 * (1 + 0.001 * (s % 3)) if s >= 100 else 2.3 - 0.001 * s))
        pts.append(("lr", s, 0.1))
        for k in range(4):
            g = 0.0 if dead and k < 3 else 0.5 + 0.05 * (s % 3)
            pts.append((f"grad/norm/fc{k}", s, g))
        if s % 5 == 0:
            pts += [(f"dead/act{k}", s, 1.0 if dead and k == 2 else 0.05) for k in range(3)]
    changes = ds.update(state, pts)
    opened = {c.detector: c for c in changes if c.action == "open"}
    assert "dead_units" in opened and opened["dead_units"].cause is None
    for consequence in ("layer_gradients", "plateau"):
        if consequence in opened:
            assert opened[consequence].cause["detector"] == "dead_units"
    assert "layer_gradients" in opened
