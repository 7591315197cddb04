"""The corpus's scenario generators, at a reduced size: each run shows what it is for, as read
from its own series by the labelling rules (so a broken generator or rule is caught here, not
by a benchmark that quietly scores the wrong thing)."""

from __future__ import annotations

import math
import statistics

import pytest

pytest.importorskip("torch")

import _corpus_labels as L  # noqa: E402  (tests/client is on sys.path under pytest)
import _corpus_runs as R  # noqa: E402
import _detector_scenarios as S  # noqa: E402

pytestmark = pytest.mark.slow

WARMUP_TOO_HIGH = {"lr": 0.05, "warmup": 300, "peak": 3.0}


def kinds(labels):
    return [(e.detector, e.tag) for e in labels.events]


def steps_of(labels, detector):
    return [e.step for e in labels.events if e.detector == detector]


def test_gradual_divergence_goes_non_finite_and_its_runaway_is_no_spike():
    pts = R.minibatch(arch="mlp", opt="sgdm", batch=64, steps=600, schedule=WARMUP_TOO_HIGH)
    labels = L.label(pts, "gradual")
    assert kinds(labels) == [("divergence", "gradual")]
    bad = labels.events[0].step
    loss = dict((s, v) for n, s, v in pts if n == "loss")
    assert all(math.isfinite(v) for s, v in loss.items() if s < bad)
    assert not math.isfinite(loss[bad]) or dict((s, v) for n, s, v in pts if n == "grad/nonfinite")[bad]
    assert pts[-1][1] <= bad + L.DIVERGENCE_WINDOW  # the run stops soon after
    # the loss ran away long before the NaN, and one-hot logits came with it: both noted
    assert labels.notes["jumps_in_divergence"][0] < bad - 30
    assert labels.notes["sc_in_divergence"] < bad
    assert any(n.startswith("update_ratio/") for n, _, _ in pts)


def test_learning_rate_jump_diverges_within_steps_of_the_jump():
    pts = R.minibatch(arch="mlp", opt="sgd", batch=32, steps=300, schedule={"lr": 0.05, "jump": [150, 10.0]})
    labels = L.label(pts, "sudden")
    assert kinds(labels) == [("divergence", "sudden")]
    assert 150 <= labels.events[0].step <= 190  # tens of steps, not hundreds


@pytest.mark.parametrize(
    "params, lo, hi",
    [
        (dict(arch="mlp", steps=300, corrupt=(200,)), 200, 200),
        (dict(arch="cnn", opt="adam", steps=300, schedule={"lr": 1e-3}, corrupt=(200,)), 200, 200),
        (dict(arch="mlp", steps=300, schedule={"lr": 0.05, "bumps": [[200, 2, 50.0]]}), 200, 203),
        (dict(arch="mlp", batch=8, steps=700, schedule={"lr": 0.02}, scale=[[600, 3, 10.0]]), 600, 602),
        (
            dict(arch="transformer", opt="adamw", batch=16, steps=300, schedule={"lr": 2e-3}, scale=[[200, 3, 20.0]]),
            200,
            202,
        ),
    ],
)
def test_each_kind_of_spike_gives_one_loss_jump_where_it_was_made(params, lo, hi):
    labels = L.label(R.minibatch(**params))
    assert [d for d, _ in kinds(labels)] == ["loss_spike"]
    assert lo <= labels.events[0].step <= hi


@pytest.mark.parametrize(
    "params",
    [
        dict(arch="mlp", batch=4, steps=1500, schedule={"lr": 0.02}),  # the noisiest loss
        dict(arch="mlp", steps=800, flip=0.3),  # label noise
        dict(arch="cnn", opt="adamw", steps=300, schedule={"lr": 3e-3, "warmup": 100, "cosine": True}),
        dict(arch="transformer", opt="adamw", steps=300, schedule={"lr": 3e-3, "warmup": 100, "cosine": True}),
    ],
)
def test_healthy_runs_have_no_labelled_event(params):
    pts = R.minibatch(**params)
    labels = L.label(pts)
    assert labels.events == [] and labels.steps == params["steps"]
    loss = [v for n, _, v in pts if n == "loss"]
    assert statistics.median(loss[-50:]) < 0.9 * statistics.median(loss[:20])  # it does learn


def test_long_constant_lr_sgd_hovers_below_softmax_collapse():
    params = dict(arch="mlp", batch=64, steps=1000, schedule={"lr": 0.15}, noise=0.5, flip=0.0, n=512)
    labels = L.label(R.minibatch(**params))
    assert labels.events == []
    assert 0.05 < labels.notes["sc_peak"] < L.SC_LEVEL


def test_class_incremental_run_labels_a_gap_at_each_switch():
    pts = R.continual(seed=0, steps_per_task=60)
    switches = [s for n, s, _ in pts if n == "continual/task"]
    assert switches == [0, 60, 120, 180]
    labels = L.label(pts)
    assert steps_of(labels, "stability_gap") == [60, 120, 180]
    assert {e.detector for e in labels.events} == {"stability_gap"}


def test_full_batch_gd_crosses_two_over_lr_and_below_the_edge_it_does_not():
    pts, crossed = S._gd(0.3, 400, 2)
    labels = L.label(pts)
    assert kinds(labels)[0] == ("edge_of_stability", "") and labels.events[0].step == crossed
    # past the edge the loss may catapult (Lewkowycz et al. 2020): a real jump, after the crossing
    assert all(e.detector == "loss_spike" and e.step > crossed for e in labels.events[1:])
    assert L.label(S._gd(0.05, 300, 2)[0]).events == []


def test_issue17_runs_show_what_they_are_for_and_their_twins_do_not():
    import _corpus_runs_plateau as P

    stuck = L.label(P.stuck("dead", steps=700))
    assert [(e.detector, e.lo, e.step) for e in stuck.events] == [("plateau", 0, L.PLATEAU_FROM)]
    assert stuck.events[0].hi >= 650  # stuck to the end
    assert L.label(P.stuck("lr_low", steps=700, lr=0.05)).events == []  # the same net, learning
    edge = L.label(P.edge(factor=1.2, before=30, steps=250))
    assert [e.detector for e in edge.events] == ["oscillation"] and edge.events[0].step > 30
    assert L.label(P.edge(factor=0.9, before=30, steps=250)).events == []
    over = L.label(P.held_out(n_train=200, steps=500))
    assert [(e.detector, e.tag) for e in over.events] == [("overfitting", "eval/loss")]
    assert L.label(P.held_out(n_train=4000, steps=500)).events == []


def test_per_layer_runs_show_what_they_are_for_and_their_twins_do_not():
    import _corpus_runs_layers as LR

    dead = L.label(LR.layers("dead", steps=600))
    assert [(e.detector, e.tag) for e in dead.events] == [("layer_gradients", "vanishing")]
    assert 400 <= dead.events[0].step <= 400 + L.LAYER_SMOOTH
    assert L.label(LR.layers("relu", steps=600)).events == []  # the same net, no layer killed
    boom = L.label(LR.layers("maxnorm", steps=600, opt="adam", lr=1e-3, init_scale=30.0, factor=0.003))
    assert [(e.detector, e.tag) for e in boom.events] == [("layer_gradients", "exploding")]
    assert L.label(LR.layers("ln", steps=600, opt="adam", lr=1e-3)).events == []
    sig = L.label(LR.layers("sigmoid", steps=400))
    assert [(e.detector, e.tag, e.lo) for e in sig.events] == [("layer_gradients", "vanishing", 0)]


def test_two_rank_runs_label_the_first_differing_step_and_healthy_ones_nothing():
    import _corpus_runs_ranks as K  # two gloo processes per run, a few seconds each

    points = K.ranks("nudge", steps=120, at=70)
    nudge = L.label(points)
    assert [(e.detector, e.step, e.hi) for e in nudge.events] == [("rank_drift", 70, 70 + L.RANK_WINDOW)]
    # the hook's series in the run: 0 at the checks before the nudge, rank 1 named at the next
    counts = [(s, v) for n, s, v in points if n == "ddp/ranks_disagreeing"]
    assert counts == [(0, 0.0), (50, 0.0), (100, 1.0)]
    assert L.label(K.ranks("healthy", steps=120)).events == []


def test_dead_unit_and_slow_step_runs_show_what_they_are_for_and_their_twins_do_not():
    import _corpus_runs_dead as D

    shift = L.label(D.dead("bias_shift", steps=600, shift=10.0))
    assert [e.detector for e in shift.events if e.detector == "dead_units"] == ["dead_units"]
    assert 400 <= steps_of(shift, "dead_units")[0] <= 410
    assert [e for e in L.label(D.dead("relu", steps=600)).events if e.detector == "dead_units"] == []
    for schedule in ("stall", "recompile"):
        slow = L.label(D.perf(schedule, steps=900))
        assert [e.detector for e in slow.events] == ["slow_steps"] and 500 <= slow.events[0].step <= 600
    assert L.label(D.perf("jitter", steps=900)).events == []


def test_a_loss_back_at_a_level_it_reached_within_64_steps_has_not_jumped():
    # A near-zero loss (a task trained to 1e-6, a replayed batch lifting it to 0.05-0.3 now and
    # then): every excursion is 5x the median and 4x the 90th percentile, but only one that
    # goes above everything of the last 64 points is a jump.
    loss = [2.0, 1.5, 1.0, 0.5] + [1e-6 * (1 + (i % 7)) for i in range(200)]
    for s in (80, 100, 120):
        loss[s] = 0.3 if s == 80 else 0.05
    loss[190] = 0.8  # 0.3 was 110 steps before: out of the last 64
    pts = [("loss", i, v) for i, v in enumerate(loss)]
    assert L.loss_jumps(pts) == [80, 190]
