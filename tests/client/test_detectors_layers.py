"""Per-layer gradient health on real tiny trainings (seeded, CPU torch), each against a
healthy twin of the same setting, plus the rules on hand-made series."""

from __future__ import annotations

import json
import math

import pytest

from stethoscope.core.detectors import CAUSES, DetectorSet, LayerGradientsDetector

torch = pytest.importorskip("torch")

import _corpus_runs_layers as L  # noqa: E402  (tests/client is on sys.path under pytest)
import _detector_scenarios as S  # noqa: E402


def replay(points, batch_size=None):
    changes, raised, state = S.replay(S.Scenario("t", points, []), DetectorSet(), batch_size=batch_size)
    json.dumps(state, allow_nan=False)  # what the server saves with the points
    return changes, raised


def opened(changes, detector="layer_gradients"):
    return [c for c in changes if c.action == "open" and c.detector == detector]


def loud_roots(changes):
    return [c for c in changes if c.action == "open" and c.cause is None and c.severity != "info"]


def norms(points, module):
    return {s: v for n, s, v in points if n == f"grad/norm/{module}"}


# -- vanishing -------------------------------------------------------------------------------


def test_a_layer_whose_units_die_is_one_vanishing_warning_naming_it():
    pts = L.layers("dead", seed=0, steps=600)  # hidden layer 1 (module "2") gets bias -100 at step 400
    dead = norms(pts, "2")
    assert all(v == 0 for s, v in dead.items() if s >= 400) and min(v for s, v in dead.items() if s < 400) > 0.05
    changes, raised = replay(pts)
    assert [(c.detector, c.key, c.severity) for c in loud_roots(changes)] == [
        ("layer_gradients", "vanishing", "warning")
    ]
    (c,) = opened(changes)
    assert 400 <= raised[("layer_gradients", "vanishing", c.start_step)] <= 420  # patience: 10 points
    assert c.evidence["layer"] == "2" and set(c.evidence["layers"]) == {"0", "2"}  # and the layer below it
    assert c.message.startswith("The gradient of layer 2 vanished at step")
    assert "Dead units" in c.message


def test_the_same_network_without_the_dead_layer_raises_nothing():
    pts = L.layers("relu", seed=0, steps=600)
    loss = [v for n, _, v in pts if n == "loss"]
    assert sum(loss[-50:]) / 50 < 0.5 * loss[0]  # it learns
    changes, _ = replay(pts)
    assert opened(changes) == [] and loud_roots(changes) == []


def test_a_deep_sigmoid_stack_vanishes_from_the_start_and_is_the_cause_of_its_plateau():
    assert "layer_gradients" in CAUSES["plateau"]
    pts = L.layers("sigmoid", seed=0, steps=500)
    first, last = norms(pts, "0")[0], norms(pts, "16")[0]
    assert first < 1e-5 * last  # 8 sigmoid layers: the first gets a millionth of the last's gradient
    changes, _ = replay(pts)
    assert [(c.detector, c.key) for c in loud_roots(changes)] == [("layer_gradients", "vanishing")]
    (c,) = opened(changes)
    assert c.evidence["layer"] == "0" and c.evidence["level_vs_others_decades"] <= -3
    assert "saturating activations" in c.message
    plateau = [c for c in changes if c.detector == "plateau"]
    assert plateau and all(p.cause and p.cause["detector"] == "layer_gradients" for p in plateau)


def test_a_tanh_stack_at_a_sound_initialisation_raises_nothing():
    changes, _ = replay(L.layers("tanh", seed=0, steps=500))
    assert opened(changes) == [] and loud_roots(changes) == []


# -- exploding -------------------------------------------------------------------------------


def test_a_layer_held_far_below_its_norm_explodes_alone_and_is_told_without_a_divergence():
    pts = L.layers("maxnorm", seed=0, steps=600, opt="adam", lr=1e-3, init_scale=30.0, factor=0.003)
    layer = norms(pts, "3")
    before = sorted(v for s, v in layer.items() if 300 <= s < 400)[50]
    after = sorted(v for s, v in layer.items() if 450 <= s < 550)[50]
    assert after > 100 * before  # its gradient x100 and more
    glob = {s: v for n, s, v in pts if n == "grad/norm"}
    g0 = sorted(v for s, v in glob.items() if 300 <= s < 400)[50]
    g1 = sorted(v for s, v in glob.items() if 450 <= s < 550)[50]
    assert g1 < 10 * g0  # the global norm moved far less
    changes, raised = replay(pts)
    assert [(c.detector, c.key, c.severity) for c in loud_roots(changes)] == [
        ("layer_gradients", "exploding", "warning")
    ]
    (c,) = opened(changes)
    assert 400 <= raised[("layer_gradients", "exploding", c.start_step)] <= 420
    assert c.evidence["layer"] == "3" and c.evidence["shift_decades"] >= 2
    assert c.message.startswith("The gradient of layer 3 exploded at step")
    # fed in random ingest batches, series interleaved: the same alert
    batched, _ = replay(pts, batch_size=300)
    assert [(c.key, c.start_step) for c in opened(batched)] == [(c.key, c.start_step)]


def test_the_same_layernorm_network_unconstrained_raises_nothing():
    changes, _ = replay(L.layers("ln", seed=0, steps=600, opt="adam", lr=1e-3))
    assert opened(changes) == [] and loud_roots(changes) == []


# -- the rules, on hand-made series ----------------------------------------------------------


def _modules(steps, value):
    """Points of 6 modules; ``value(module, step)`` gives each norm."""
    return [(f"grad/norm/m{k}", s, value(k, s)) for s in range(steps) for k in range(6)]


def test_gradients_shrinking_together_as_a_run_converges_are_not_vanishing():
    det = LayerGradientsDetector()
    # every layer falls by four decades over the run, each at its own level, with noise
    pts = _modules(2000, lambda k, s: 10 ** (-0.3 * k - 4 * s / 2000) * (1.5 if (s * 7 + k) % 3 else 0.7))
    assert det.update({}, pts) == []


def test_one_layer_falling_alone_vanishes_and_clears_with_hysteresis():
    det = LayerGradientsDetector()
    state: dict = {}

    def value(k, s):
        if k == 2 and 300 <= s < 500:
            return 1e-3
        if k == 2 and 500 <= s < 520:
            return 0.02  # back to 1/50: within two decades, not within one -- still flagged
        return 1.0 + 0.1 * ((s + k) % 3)

    changes = det.update(state, _modules(700, value))
    assert [(c.action, c.key) for c in changes] == [("open", "vanishing"), ("resolve", "vanishing")]
    opened_, resolved = changes
    assert opened_.start_step >= 300 and opened_.evidence["layer"] == "m2"
    assert resolved.end_step >= 520  # the 1/50 stretch kept it open
    mods = state["mods"]
    assert len(mods) == 6 and all(len(m) == 8 for m in mods.values())


def test_a_module_without_any_gradient_is_told_at_info_and_a_divergence_claims_an_explosion():
    det = LayerGradientsDetector()
    (c,) = [c for c in det.update({}, _modules(200, lambda k, s: 0.0 if k == 0 else 1.0)) if c.action == "open"]
    assert c.severity == "info" and c.message.startswith("Layer m0 has received no gradient at all by step")
    assert CAUSES["layer_gradients"] == ("divergence", "dead_units")
    # the whole run blows up (loss and global norm), one layer far more than the others
    ds, state = DetectorSet(), {}
    pts = []
    for s in range(300):
        grow = 1.0 if s < 150 else 1.3 ** (s - 150)
        pts += [("loss", s, 2.0 * (1 + 0.01 * (s % 3)) * grow), ("grad/norm", s, grow)]
        pts += [(f"grad/norm/m{k}", s, grow ** (3 if k == 0 else 1) * (1 + 0.1 * (s % 2))) for k in range(6)]
    changes = ds.update(state, pts)
    layer = [c for c in changes if c.detector == "layer_gradients"]
    assert layer and all(c.cause and c.cause["detector"] == "divergence" for c in layer)


def test_the_state_stays_bounded_with_hundreds_of_modules():
    det = LayerGradientsDetector()
    state: dict = {}
    for start in range(0, 2000, 500):
        pts = [
            (f"grad/norm/layers.{k}", s, 10 ** (-(k % 7) * 0.2) * (1 + 0.2 * math.sin(s + k)))
            for s in range(start, start + 500)
            for k in range(300)
        ]
        assert det.update(state, pts) == []
    size = len(json.dumps(state, allow_nan=False))
    assert len(state["mods"]) == 300 and size < 300 * 120  # a few numbers per module
