"""Plateau, oscillation and overfitting detectors on real tiny trainings (seeded, CPU torch),
each against a healthy run of the same setting, plus the rules on hand-made series."""

from __future__ import annotations

import json
import math

import pytest

from stethoscope.core.detectors import (
    CAUSES,
    DetectorSet,
    OscillationDetector,
    OverfittingDetector,
    PlateauDetector,
    PlateauParams,
)

torch = pytest.importorskip("torch")

import _corpus_runs_plateau as P  # noqa: E402  (tests/client is on sys.path under pytest)
import _detector_scenarios as S  # noqa: E402

EDGE = {"before": 30, "steps": 250}


def replay(points):
    changes, raised, state = S.replay(S.Scenario("t", points, []), DetectorSet())
    json.dumps(state, allow_nan=False)  # what the server saves with the points
    return changes, raised


def opened(changes, detector):
    return [c for c in changes if c.action == "open" and c.detector == detector]


def loud_roots(changes):
    return [c for c in changes if c.action == "open" and c.cause is None and c.severity != "info"]


# -- plateau ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dead", "lr_low"])
def test_a_run_that_does_not_learn_is_one_plateau_warning_and_the_only_page(kind):
    pts = P.stuck(kind, seed=0, steps=500, lr=1e-5 if kind == "lr_low" else 0.05)
    loss = [v for n, _, v in pts if n == "loss"]
    assert min(loss[-50:]) > 0.8 * loss[0]  # it really does not learn
    changes, raised = replay(pts)
    assert [(c.detector, c.key, c.severity) for c in loud_roots(changes)] == [("plateau", "loss", "warning")]
    (c,) = opened(changes, "plateau")
    assert 200 <= raised[("plateau", "loss", c.start_step)] <= 300  # a 200-step window, then 50 steps held
    ev = c.evidence
    assert abs(ev["change"]) < 0.05 and ev["progress"] > 0.9 and ev["lr"] == ev["lr_max"]
    assert "learning rate is at 100% of its peak" in c.message


def test_the_same_network_learning_at_a_sound_rate_raises_no_plateau():
    pts = P.stuck("lr_low", seed=0, steps=500, lr=0.05)  # the stuck run's twin, with a sane lr
    loss = [v for n, _, v in pts if n == "loss"]
    assert sum(loss[-50:]) / 50 < 0.8 * loss[0]
    changes, _ = replay(pts)
    assert opened(changes, "plateau") == [] and loud_roots(changes) == []


def test_a_converged_run_and_a_decayed_schedule_are_not_plateaus():
    det = PlateauDetector()
    # converged: fell to a fifth of its start and flat since, learning rate up
    conv = [("lr", s, 0.1) for s in range(2000)] + [("loss", s, 0.5 + 2.0 * math.exp(-s / 50)) for s in range(2000)]
    conv.sort(key=lambda p: p[1])
    assert det.update({}, conv) == []
    # stuck at its start, but the learning rate decayed to 5% of its peak: end of schedule
    lr = [("lr", s, 0.1 if s < 100 else 0.005) for s in range(1000)]
    flat = sorted(lr + [("loss", s, 2.3) for s in range(1000)], key=lambda p: p[1])
    assert det.update({}, flat) == []
    # the same flat loss with the learning rate up is a plateau (each rule can fail)
    flat_up = sorted(
        [("lr", s, 0.1) for s in range(1000)] + [("loss", s, 2.3) for s in range(1000)], key=lambda p: p[1]
    )
    assert [c.action for c in det.update({}, flat_up)] == ["open"]


def test_the_plateau_window_grows_with_the_run_and_its_state_stays_small():
    det = PlateauDetector(PlateauParams(min_steps=0))
    state: dict = {}
    # stuck for 8,000 steps (creeping up by 1% in all, so each judgement is the new peak)
    pts = [("loss", s, 2.3 * (1 + 1e-6 * s)) for s in range(8000)]
    (first,) = det.update(state, pts[:210])
    assert first.action == "open" and first.evidence["window_steps"] == 200
    (last,) = det.update(state, pts[210:])
    assert last.evidence["window_steps"] == int(0.25 * last.peak_step) > 1900  # a quarter of the run
    assert len(state["blocks"]) <= 33 and len(json.dumps(state)) < 4000


# -- oscillation -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_descent_past_the_edge_oscillates_and_is_told_tied_to_the_learning_rate(seed):
    pts = P.edge(factor=1.2, seed=seed, **EDGE)
    changes, raised = replay(pts)
    osc = opened(changes, "oscillation")
    assert [(c.key, c.severity) for c in osc] == [("loss", "warning")]
    c = osc[0]
    assert raised[("oscillation", "loss", c.start_step)] <= 160  # lr raised past the edge at step 30
    assert c.evidence["alternating"] >= 0.9 and c.evidence["period2"] <= 0.5
    assert c.evidence["lr"] == pytest.approx(dict((s, v) for n, s, v in pts if n == "lr")[c.start_step])
    assert "learning rate" in c.message and "edge of stability" in c.message
    # the loss really goes up and down at every step there
    loss = [v for n, s, v in pts if n == "loss" and c.start_step - 16 <= s <= c.start_step]
    d = [b - a for a, b in zip(loss, loss[1:])]
    assert sum(x * y < 0 for x, y in zip(d, d[1:])) >= len(d) - 2


def test_the_same_descent_below_the_edge_and_minibatch_noise_do_not_oscillate():
    changes, _ = replay(P.edge(factor=0.9, seed=0, **EDGE))
    assert changes == []
    # the noisiest healthy loss of the corpus: batch 4 alternates often, with no period-2 structure
    noisy = S.healthy_sgd_small_batch(0)
    changes, _ = replay(noisy.points)
    assert opened(changes, "oscillation") == []


def test_oscillation_past_a_known_edge_is_part_of_the_edge_incident():
    assert CAUSES["oscillation"] == ("divergence", "edge_of_stability")
    pts = P.edge(factor=1.2, seed=0, curvature=True, **EDGE)
    changes, _ = replay(pts)
    roots = loud_roots(changes)
    assert [(c.detector, c.key) for c in roots] == [("edge_of_stability", "lambda_max")]
    osc = [c for c in changes if c.detector == "oscillation"]
    assert osc and all(c.cause and c.cause["detector"] == "edge_of_stability" for c in osc)


def test_a_steady_old_cycle_is_not_news():
    det = OscillationDetector()
    cycle = [("loss", s, 1.0 + 0.01 * (-1) ** s) for s in range(200)]
    assert det.update({}, cycle) == []  # alternating from the start: nothing grew, nothing is new


# -- overfitting -----------------------------------------------------------------------------


def test_a_small_training_set_overfits_and_the_alert_names_the_best_evaluation():
    pts = P.held_out(n_train=200, seed=0, steps=500)
    changes, raised = replay(pts)
    (c,) = opened(changes, "overfitting")  # one alert: the accuracy is not paged beside the loss
    assert c.key == "eval/loss" and c.severity == "warning" and c.cause is None
    ev = c.evidence
    evals = dict((s, v) for n, s, v in pts if n == "eval/loss")
    assert ev["eval"] >= 1.1 * ev["best"] and ev["best"] == pytest.approx(min(evals.values()), rel=0.05)
    assert ev["train_loss"] <= 0.95 * ev["train_loss_at_best"]
    assert ev["best_step"] < c.start_step <= raised[("overfitting", "eval/loss", c.start_step)] <= 300
    assert f"step {ev['best_step']}" in c.message
    assert loud_roots(changes) == [c]


def test_a_large_training_set_does_not_overfit():
    pts = P.held_out(n_train=4000, seed=0, steps=500)
    changes, _ = replay(pts)
    assert changes == []


def test_accuracy_alone_is_judged_and_per_task_accuracy_is_left_to_the_stability_gap():
    det = OverfittingDetector()
    train = [("loss", s, 2.0 * 0.995**s) for s in range(0, 400, 10)]
    acc = [("eval/acc", s, 0.8 if s < 200 else 0.7) for s in range(0, 400, 10)]
    pts = sorted(train + acc, key=lambda p: p[1])
    assert [(c.action, c.key) for c in det.update({}, pts)] == [("open", "eval/acc")]
    task = [("eval/acc/0", s, v) for _, s, v in acc]
    assert det.update({}, sorted(train + task, key=lambda p: p[1])) == []
    # the same fall of accuracy while the training loss is flat is no overfitting
    flat = [("loss", s, 1.0) for s in range(0, 400, 10)]
    assert det.update({}, sorted(flat + acc, key=lambda p: p[1])) == []
