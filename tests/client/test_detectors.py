"""Unit tests of the detector core: lifecycle, idempotence, state, settings (no torch)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest

import stethoscope.core.detectors as D
from stethoscope.core.detectors import AlertChange, DetectorSet


def flat_loss(n, start=0, level=2.0):
    # deterministic wobble of +-1%: a healthy, nearly flat loss
    return [("loss", start + i, level * (1 + 0.01 * ((i * 7919) % 13 - 6) / 6)) for i in range(n)]


def test_public_names_are_pinned():
    assert sorted(D.__all__) == sorted(
        [
            "AlertChange",
            "CAUSES",
            "DETECTORS",
            "DeadUnitsDetector",
            "DeadUnitsParams",
            "Detector",
            "DetectorSet",
            "DivergenceDetector",
            "DivergenceParams",
            "EdgeOfStabilityDetector",
            "EdgeOfStabilityParams",
            "LayerGradientsDetector",
            "LayerGradientsParams",
            "LossSpikeDetector",
            "LossSpikeParams",
            "OPEN",
            "OscillationDetector",
            "OscillationParams",
            "OverfittingDetector",
            "OverfittingParams",
            "PlateauDetector",
            "PlateauParams",
            "RESOLVE",
            "RankDriftDetector",
            "RankDriftParams",
            "SC_MARGIN_NATS",
            "SEVERITIES",
            "SlowStepsDetector",
            "SlowStepsParams",
            "SoftmaxCollapseDetector",
            "SoftmaxCollapseParams",
            "StabilityGapDetector",
            "StabilityGapParams",
            "StalledRunDetector",
            "StalledRunParams",
            "UPDATE",
            "severity_rank",
        ]
    )
    assert (D.OPEN, D.UPDATE, D.RESOLVE) == ("open", "update", "resolve")
    assert set(D.DETECTORS) == {
        "divergence",
        "loss_spike",
        "softmax_collapse",
        "edge_of_stability",
        "stability_gap",
        "stalled",
        "plateau",
        "oscillation",
        "overfitting",
        "layer_gradients",
        "rank_drift",
        "dead_units",
        "slow_steps",
    }


def test_the_package_imports_only_the_standard_library():
    code = "import sys, stethoscope.core.detectors; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_float32_absorption_bound():
    assert D.SC_MARGIN_NATS == pytest.approx(math.log(2**24))
    assert D.SC_MARGIN_NATS == pytest.approx(16.6355, abs=1e-4)


def test_a_spike_is_one_episode_with_start_peak_and_recovery():
    ds = DetectorSet()
    state = {}
    # told resolved 10 points after the loss has been back for 3 (a spike that bounces stays one alert)
    pts = flat_loss(100) + [("loss", 100, 5.0), ("loss", 101, 9.0), ("loss", 102, 4.0)] + flat_loss(13, start=103)
    changes = ds.update(state, pts)
    assert [c.action for c in changes] == ["open", "resolve"]
    c = changes[-1]
    assert (c.detector, c.key, c.severity, c.status) == ("loss_spike", "loss", "warning", "resolved")
    assert (c.start_step, c.peak_step, c.end_step) == (100, 101, 103)
    assert c.evidence["value"] == 9.0 and c.evidence["threshold"] == 6.0
    assert c.message.startswith("Loss jumped 4.5x at step 101 (from 2 to 9). ") and "\n" not in c.message
    d = c.to_dict()
    assert d["status"] == "resolved" and set(d) >= {
        "detector",
        "key",
        "severity",
        "start_step",
        "peak_step",
        "end_step",
        "message",
        "evidence",
        "action",
    }


def test_point_by_point_changes_are_open_update_resolve():
    ds = DetectorSet({"loss_spike": {"delay_steps": 0}})
    state = {}
    ds.update(state, flat_loss(100))
    seen = []
    for pt in [("loss", 100, 5.0), ("loss", 101, 9.0)] + flat_loss(14, start=102):
        seen += [(pt[1], c.action, c.peak_step, c.end_step) for c in ds.update(state, [pt])]
    # the end is the first point back; it is told 10 points after 3 in a row are back
    assert seen == [(100, "open", 100, 100), (101, "update", 101, 101), (114, "resolve", 101, 102)]


def test_a_spike_is_told_after_its_delay_even_when_it_has_cleared():
    ds = DetectorSet()  # loss_spike.delay_steps = 2: a root cause may claim it first
    state = {}
    ds.update(state, flat_loss(100))
    seen = []
    for pt in [("loss", 100, 9.0)] + flat_loss(14, start=101):
        seen += [(pt[1], c.action, c.start_step, c.first["step"]) for c in ds.update(state, [pt])]
    assert seen == [(102, "open", 100, 100), (113, "resolve", 100, 100)]


def test_a_spike_that_bounces_is_one_alert_and_is_told_resolved_after_a_quiet_stretch():
    ds = DetectorSet()
    state = {}
    ds.update(state, flat_loss(100))
    # a spike, back for 4 points, a second spike, then back with a 5% wobble (no spike)
    pts = [("loss", 100, 9.0)] + flat_loss(4, start=101) + [("loss", 105, 9.0)] + flat_loss(3, start=106)
    pts += [("loss", 109, 2.1)] + flat_loss(20, start=110)
    seen = []
    for pt in pts:
        seen += [(pt[1], c.action, c.start_step, c.end_step) for c in ds.update(state, [pt])]
    # one alert: the second spike continues it (no resolve, no reopen) and the wobble after the
    # loss is back does not hold the resolution back: told 10 points after 3 back, ending at 106
    assert [a for _, a, _, _ in seen if a != "update"] == ["open", "resolve"]
    assert seen[0][:3] == (102, "open", 100) and seen[-1] == (118, "resolve", 100, 106)


def test_two_points_in_a_row_at_the_ratio_are_a_spike_told_from_the_first():
    # a noisy loss (log-sigma ~0.5): one point 6x its median is ~3.4 sigmas, no spike alone (a
    # batch with a hard sample); two in a row are, told 2 steps after the first of them
    noisy = [("loss", i, math.exp(0.7 * ((i * 7919) % 13 - 6) / 6)) for i in range(200)]
    ds = DetectorSet()
    state = {}
    ds.update(state, noisy)
    seen = []
    for pt in [("loss", 200, 6.0), ("loss", 201, 6.0)] + [("loss", 202 + i, 1.0) for i in range(4)]:
        seen += [
            (pt[1], c.action, c.start_step, c.evidence["points_in_a_row"], c.message) for c in ds.update(state, [pt])
        ]
    assert seen[0][:4] == (202, "open", 200, 2)
    assert seen[0][4].startswith("Loss jumped 6x at step 201") and "sigmas for 2 points in a row" in seen[0][4]
    one = DetectorSet()
    state = {}
    one.update(state, noisy)
    assert [c for i in range(6) for c in one.update(state, [("loss", 200 + i, 6.0 if i == 0 else 1.0)])] == []


def test_feeding_the_same_points_twice_changes_nothing():
    ds = DetectorSet()
    state = {}
    pts = flat_loss(100) + [("loss", 100, 9.0), ("grad/norm", 100, math.nan)]
    first = ds.update(state, pts)
    snapshot = json.dumps(state, allow_nan=False)
    # The spike waits its delay_steps: the divergence at the same step will claim it.
    assert {(c.detector, c.action) for c in first} == {("divergence", "open")}
    assert ds.update(state, pts) == []
    assert ds.update(state, pts[50:]) == []
    assert json.dumps(state, allow_nan=False) == snapshot


def test_non_finite_loss_is_critical_at_once_and_travels_as_json():
    ds = DetectorSet()
    state = {}
    changes = ds.update(state, [("loss", 0, 2.3), ("loss", 1, math.inf), ("grad/norm", 1, math.nan)])
    assert len(changes) == 1
    c = changes[0]
    assert (c.detector, c.key, c.severity, c.action, c.start_step) == ("divergence", "nonfinite", "critical", "open", 1)
    assert c.evidence == {"series": "loss", "value": "Infinity"}
    json.dumps(c.to_dict(), allow_nan=False)
    json.dumps(state, allow_nan=False)


def test_nonfinite_gradient_count_opens_and_finite_steps_resolve():
    ds = DetectorSet()
    state = {}
    assert [c.key for c in ds.update(state, [("grad/nonfinite", 5, 3.0)])] == ["nonfinite"]
    changes = ds.update(state, [("grad/nonfinite", s, 0.0) for s in range(6, 11)])
    assert [(c.action, c.end_step) for c in changes] == [("resolve", 6)]


def test_gradient_explosion_warns_after_patience_and_is_backdated():
    ds = DetectorSet({"divergence": {"patience": 5}})
    state = {}
    ds.update(state, [("grad/norm", s, 1.0 + 0.01 * (s % 3)) for s in range(40)])
    changes = []
    for s in range(40, 60):
        changes += ds.update(state, [("grad/norm", s, 1.5 ** (s - 39))])
    runaway = [c for c in changes if c.action == "open"]
    assert len(runaway) == 1
    r = runaway[0]
    # 1.5^k crosses 10x the median at k=6 (step 45); the 3-point median one step later.
    assert r.key == "runaway" and r.severity == "warning" and r.start_step == 46
    assert r.evidence["grad_ratio"] >= 10 and r.evidence["patience"] == 5


def test_interleaving_across_series_and_batches_gives_the_same_alerts():
    lr = [("lr", s, 0.1) for s in range(0, 200, 10)]
    lam = [("hessian/lambda_max", s, 2.0 + 0.1 * s) for s in range(0, 200, 10)]  # 2/lr = 20
    pts = sorted(lr + lam, key=lambda p: (p[1], p[0]))

    def rows(batches):
        ds, state, out = DetectorSet(), {}, {}
        for b in batches:
            for c in ds.update(state, b):
                out[(c.detector, c.key)] = (c.severity, c.start_step, c.peak_step, c.status)
        return out

    one = rows([pts])
    assert one == {("edge_of_stability", "lambda_max"): ("warning", 160, 190, "open")}
    assert rows([[p] for p in pts]) == one
    # each series in its own batch, the curvature before the learning rate
    assert rows([lam[:10], lr[:10], lam[10:], lr[10:]]) == one


def test_edge_of_stability_uses_two_over_lr_when_sent_in_the_same_step():
    ds = DetectorSet()
    state = {}
    changes = ds.update(state, [("hessian/lambda_max", 10, 21.0), ("hessian/two_over_lr", 10, 20.0)])
    assert [(c.key, c.severity, c.evidence["two_over_lr"]) for c in changes] == [("lambda_max", "warning", 20.0)]


def test_softmax_collapse_escalates_within_one_alert():
    ds = DetectorSet()
    state = {}
    changes = []
    margins = [8, 10, 13, 13.5, 14, 15, 16, 17, 17, 17, 17, 17]
    fractions = [0, 0, 0, 0, 0, 0.2, 0.3, 0.6, 0.7, 0.7, 0.8, 0.8]
    for i, (sc, margin) in enumerate(zip(fractions, margins, strict=True)):
        s = 10 * i  # the hook's default: logit statistics every 10 steps
        changes += ds.update(state, [("logits/sc_fraction", s, sc), ("logits/median_margin", s, margin)])
    assert [(c.action, c.severity) for c in changes][0] == ("open", "warning")
    # The median of the margins crosses 12.6 nats at step 40; an alert once it held 30 steps.
    assert changes[0].start_step == 40 and changes[0].first["step"] == 70
    # Critical once the mean of the last 5 readings reaches 0.5 (sustained, not one batch).
    crit = next(c for c in changes if c.severity == "critical")
    assert crit.end_step == 90 and crit.action == "update"
    assert len([c for c in changes if c.action == "open"]) == 1


def test_stalled_run_is_checked_by_time():
    ds = DetectorSet({"stalled": {"timeout_s": 60}})
    state = {}
    assert ds.check(state, now=1000.0, last_seen=990.0, status="running") == []
    (c,) = ds.check(state, now=1100.0, last_seen=990.0, status="running", last_step=42)
    assert (c.detector, c.key, c.action, c.start_step) == ("stalled", "run", "open", 42)
    assert "no data since step 42" in c.message and c.evidence["timeout_s"] == 60.0
    assert ds.check(state, now=1200.0, last_seen=990.0, status="running", last_step=42) == []  # no repeats
    (r,) = ds.check(state, now=1210.0, last_seen=1205.0, status="running", last_step=43)
    assert r.action == "resolve"
    assert ds.check({}, now=5000.0, last_seen=0.0, status="finished") == []


def test_settings_are_validated_with_clear_errors():
    with pytest.raises(ValueError, match="unknown detector 'spikes'"):
        DetectorSet({"spikes": {}})
    with pytest.raises(ValueError, match="loss_spike: unknown setting 'treshold'.*threshold"):
        DetectorSet({"loss_spike": {"treshold": 5}})
    with pytest.raises(ValueError, match="loss_spike.window must be int"):
        DetectorSet({"loss_spike": {"window": 12.5}})
    with pytest.raises(ValueError, match="enabled must be true or false"):
        DetectorSet({"loss_spike": {"enabled": "yes"}})
    with pytest.raises(ValueError, match="warn_fraction <= critical_fraction"):
        DetectorSet({"softmax_collapse": {"warn_fraction": 0.9, "critical_fraction": 0.5}})
    with pytest.raises(ValueError, match="must be float"):
        DetectorSet({"divergence": {"grad_ratio": math.nan}})


def test_settings_round_trip_and_disable():
    ds = DetectorSet({"loss_spike": {"threshold": 8, "series": ["loss", "eval/loss"]}, "stalled": {"enabled": False}})
    eff = ds.settings()
    assert eff["loss_spike"]["threshold"] == 8.0 and eff["loss_spike"]["series"] == ["loss", "eval/loss"]
    assert eff["stalled"]["enabled"] is False
    assert DetectorSet(eff).settings() == eff
    assert json.loads(json.dumps(DetectorSet.defaults())) == DetectorSet.defaults()
    assert [d.name for d in ds.detectors] == [
        "divergence",
        "loss_spike",
        "softmax_collapse",
        "edge_of_stability",
        "stability_gap",
        "plateau",
        "oscillation",
        "overfitting",
        "layer_gradients",
        "rank_drift",
        "dead_units",
        "slow_steps",
    ]
    state = {}
    assert ds.check(state, now=1e9, last_seen=0.0, status="running") == []
    off = DetectorSet({"loss_spike": {"enabled": False}})
    assert off.update({}, flat_loss(100) + [("loss", 100, 50.0)]) == []


def test_state_stays_small_on_a_long_run():
    ds = DetectorSet()
    state = {}
    for start in range(0, 20_000, 1000):
        batch = []
        for s in range(start, start + 1000):
            batch += [
                # a learning run (a flat loss at its start would be a plateau, rightly)
                ("loss", s, 0.5 + 1.5 * math.exp(-s / 300) + 0.1 * math.sin(s)),
                ("grad/norm", s, 1.0 + 0.1 * math.cos(s)),
                ("grad/nonfinite", s, 0.0),
                ("lr", s, 0.01),
                ("logits/sc_fraction", s, 0.0),
            ]
            if s % 100 == 0:
                batch.append(("hessian/lambda_max", s, 10.0))
        assert ds.update(state, batch) == []
    assert len(json.dumps(state, allow_nan=False)) < 12_000


def test_alert_change_is_frozen_and_json_ready():
    c = AlertChange("open", "x", "k", "info", 1, 1, 1, "m", {"v": 1.0})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.severity = "critical"
    assert c.status == "open" and AlertChange("resolve", "x", "k", "info", 1, 1, 2, "m", {}).status == "resolved"


def test_edge_of_stability_compares_sharpness_with_the_bound_of_its_own_step():
    """A learning-rate change and a curvature point at the same step, curvature first in the
    batch: the bound used is that step's 2/lr, not the previous one."""
    from stethoscope.core.detectors import DetectorSet

    dset = DetectorSet({"edge_of_stability": {"check_trace": False}})
    state: dict = {}
    assert dset.update(state, [("hessian/two_over_lr", 0, 20.0), ("hessian/lambda_max", 0, 5.0)]) == []
    # lr drops 10x at step 10: 2/lr = 200; lambda_max 19 is far from it (it was near 20 before)
    changes = dset.update(state, [("hessian/lambda_max", 10, 19.0), ("hessian/two_over_lr", 10, 200.0)])
    assert changes == []
    changes = dset.update(state, [("hessian/lambda_max", 20, 210.0), ("hessian/two_over_lr", 20, 200.0)])
    assert [c.evidence["two_over_lr"] for c in changes] == [200.0]


def _gap():
    acc = [0.5, 0.7, 0.8, 0.9, 0.92, 0.93, 0.94, 0.95, 0.95, 0.95]
    return (
        [("eval/acc/a", s, v) for s, v in enumerate(acc)]
        + [("continual/task", 10, 1.0)]
        + [("eval/acc/a", 10 + i, v) for i, v in enumerate([0.6, 0.45, 0.3, 0.45])]
    )


#: (detector, key) -> points that open its alert; the step the message must name is the peak.
MESSAGE_CASES = {
    ("loss_spike", "loss"): lambda: flat_loss(100) + [("loss", 100, 24.0)] + flat_loss(2, start=101),
    ("divergence", "nonfinite"): lambda: flat_loss(10) + [("loss", 10, math.nan)],
    ("divergence", "runaway"): lambda: (
        [("grad/norm", s, 1.0 + 0.01 * (s % 3)) for s in range(40)]
        + [("grad/norm", s, 1.5 ** (s - 39)) for s in range(40, 60)]
    ),
    ("softmax_collapse", "logits"): lambda: [
        p
        for i, (sc, m) in enumerate([(0, 13.5)] * 3 + [(0.7, 17)] * 6)
        for s in (10 * i,)
        for p in (("logits/sc_fraction", s, sc), ("logits/median_margin", s, m))
    ],
    ("edge_of_stability", "lambda_max"): lambda: [("hessian/two_over_lr", 10, 20.0), ("hessian/lambda_max", 10, 21.0)],
    ("edge_of_stability", "trace"): lambda: [("hessian/two_over_lr", 10, 20.0), ("hessian/trace", 10, 90.0)],
    ("stability_gap", "a"): _gap,
    ("plateau", "loss"): lambda: [("lr", 0, 0.1)] + flat_loss(400),
    ("oscillation", "loss"): lambda: (
        [("loss", s, 1.0 - 0.001 * s) for s in range(40)]
        + [("loss", 40 + i, 0.96 + 0.001 * 1.08**i * (-1) ** i) for i in range(40)]
    ),
    ("layer_gradients", "vanishing"): lambda: [
        (f"grad/norm/m{k}", s, 1e-4 if k == 0 and s >= 50 else 1.0 + 0.1 * (s % 3)) for s in range(80) for k in range(4)
    ],
    ("layer_gradients", "exploding"): lambda: [
        (f"grad/norm/m{k}", s, 1e3 if k == 0 and s >= 50 else 1.0 + 0.1 * (s % 3)) for s in range(80) for k in range(4)
    ],
    ("rank_drift", "ranks"): lambda: (
        [
            p
            for s in (0, 50, 100)
            for p in (
                ("ddp/param_checksum_spread", s, 0.0 if s < 100 else 2e-4),
                ("ddp/ranks_disagreeing", s, 0.0 if s < 100 else 1.0),
            )
        ]
        + [("ddp/rank_drift/1", 100, 2e-4)]
    ),
    ("overfitting", "eval/loss"): lambda: [
        p
        for s in range(0, 600, 10)
        for p in (("loss", s, 2.0 * 0.997**s), ("eval/loss", s, 1.0 + (0.002 * (s - 200) if s > 200 else 0.0)))
    ],
}


def _first_sentence(message: str) -> str:
    return message.split(". ", 1)[0]


@pytest.mark.parametrize("case", list(MESSAGE_CASES), ids="/".join)
def test_every_alert_message_starts_with_what_happened_and_the_step(case):
    """The first sentence says what happened in plain words and at which step; the evidence
    (sigmas, ratios, lambda_max) comes after it."""
    ds = DetectorSet({"edge_of_stability": {"check_trace": True}, "divergence": {"patience": 5}})
    state: dict = {}
    changes = [c for c in ds.update(state, MESSAGE_CASES[case]()) if (c.detector, c.key) == case]
    assert changes, f"{case} did not fire"
    for c in changes:
        first, _, evidence = c.message.partition(". ")
        assert first[:1].isupper() and f"at step {c.peak_step}" in first, c.message
        assert not any(w in first.lower() for w in ("sigma", "median", "lambda", "2/lr", "mad", "nats")), c.message
        assert evidence.strip(), c.message  # the evidence follows


def test_the_loss_spike_message_reads_as_the_issue_asks():
    ds = DetectorSet()
    (c,) = ds.update(
        {}, [("loss", s, 0.4) for s in range(100)] + [("loss", 100, 4.8), ("loss", 101, 0.4)] * 1 + [("loss", 102, 0.4)]
    )
    assert c.message.startswith("Loss jumped 12x at step 100 (from 0.4 to 4.8). ")
    assert "robust sigmas above its rolling median on a log scale" in c.message


def test_the_stalled_message_starts_with_the_last_step():
    (c,) = DetectorSet({"stalled": {"timeout_s": 60}}).check(
        {}, now=1100.0, last_seen=990.0, status="running", last_step=42
    )
    assert _first_sentence(c.message).startswith("The run has sent no data since step 42")


def test_every_numeric_setting_has_documented_bounds_that_hold_its_default():
    import dataclasses
    import typing

    from stethoscope.core.detectors import DETECTORS
    from stethoscope.core.detectors._bounds import BOUNDS

    for name, cls in DETECTORS.items():
        hints = typing.get_type_hints(cls.Params)
        for f in dataclasses.fields(cls.Params):
            if hints[f.name] in (int, float):
                assert f.name in BOUNDS, f"{name}.{f.name} has no bound in stethoscope.core.detectors._bounds"
                lo, hi, why = BOUNDS[f.name]
                assert lo <= getattr(cls.Params(), f.name) <= hi and why, (name, f.name)


def test_route_gives_each_detector_its_points_in_step_order_once():
    """``route`` matches each series name once and leaves out series no detector takes; each
    detector's points come in step order, ties in the order given; ``update`` is
    ``feed(route(...))`` over the runs of one series in the points given."""
    dset = DetectorSet()
    routed = dset.route(
        [
            ("loss", [2, 3], [1.0, 1.1]),
            ("other/metric", [0], [5.0]),
            ("grad/norm", [1, 2], [0.5, 0.6]),
            ("loss", [], []),
        ]
    )
    assert routed["divergence"] == [("grad/norm", 1, 0.5), ("loss", 2, 1.0), ("grad/norm", 2, 0.6), ("loss", 3, 1.1)]
    assert routed["loss_spike"] == [("loss", 2, 1.0), ("loss", 3, 1.1)]
    assert all("other/metric" not in {p[0] for p in pts} for pts in routed.values())
    points = [("loss", s, 2.0 if s != 40 else 50.0) for s in range(60)] + [("grad/norm", s, 1.0) for s in range(60)]
    points.sort(key=lambda p: -p[1])  # any interleaving: update takes them in step order
    a, b = {}, {}
    by_series = [
        (n, [p[1] for p in points if p[0] == n], [p[2] for p in points if p[0] == n]) for n in ("loss", "grad/norm")
    ]
    assert dset.update(a, points) == dset.feed(b, dset.route(by_series)) and a == b


def test_severity_rank_is_the_one_order_of_severities():
    # Episodes, the server's escalation check and the dashboard's run health all use this one.
    assert [D.severity_rank(s) for s in D.SEVERITIES] == [0, 1, 2]
    assert D.severity_rank("bogus") == D.severity_rank(None) == -1


def test_median_mad_picks_the_same_floats_as_sorting_the_deviations():
    """``median_mad`` selects the median deviation from the two sorted runs of deviations
    instead of sorting them: the same float, bit for bit, as the definition, on windows with
    ties, signed zeros, extremes, NaN and infinities, of every size up to past the window."""
    import random

    from stethoscope.core.detectors._base import median, median_mad

    def definition(xs):
        m = median(xs)
        return m, median([abs(x - m) for x in xs])

    rng = random.Random(7)
    makers = [
        lambda: rng.gauss(0.0, 1.0),
        lambda: float(rng.randint(-3, 3)),  # many ties
        lambda: rng.choice([0.0, -0.0, 1e-300, -1e-300, 5e-324]),
        lambda: math.log(rng.lognormvariate(0.0, 2.0)),  # log-losses, as loss_spike keeps them
        lambda: rng.choice([1.0, 2.0, 3.0, math.nan, math.inf, -math.inf]),
        lambda: rng.uniform(-1e308, 1e308),
    ]
    for trial in range(20_000):
        make = makers[trial % len(makers)]
        xs = [make() for _ in range(rng.randint(1, 140))]
        assert repr(median_mad(xs)) == repr(definition(xs)), xs


def test_sorted_windows_match_sorting_the_window_at_every_push():
    """``SortedWindows`` keeps a sorted copy of each rolling window by binary insertion and
    removal: after every push it is ``sorted(window)`` exactly (``repr`` tells 0.0 from -0.0,
    and ties sit in window order), with ties, signed zeros, infinities and NaN (a window
    holding one is sorted afresh), windows replaced by a copy (a state loaded from JSON),
    cleared, or more windows than it keeps; the window itself is what ``push`` makes it."""
    import random

    from stethoscope.core.detectors._base import SortedWindows, median_mad, median_mad_sorted, push

    rng = random.Random(11)
    makers = [
        lambda: rng.gauss(0.0, 1.0),
        lambda: float(rng.randint(-3, 3)),
        lambda: rng.choice([0.0, -0.0, 1.0, -1.0]),
        lambda: rng.choice([1.0, 2.0, math.inf, -math.inf]),
        lambda: rng.choice([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, math.nan]),
    ]
    kept = SortedWindows(limit=3)
    for trial in range(600):
        make = makers[trial % len(makers)]
        size = rng.randint(1, 40)
        windows = [[] for _ in range(rng.randint(1, 5))]  # more than the limit, at times
        plain = [[] for _ in windows]
        for _ in range(rng.randint(1, 120)):
            i = rng.randrange(len(windows))
            r = rng.random()
            if r < 0.03:
                windows[i] = list(windows[i])  # a copy: what a state loaded from JSON holds
            elif r < 0.05:
                windows[i].clear()
                plain[i].clear()
            x = make()
            s = kept.push(windows[i], x, size)
            push(plain[i], x, size)
            assert windows[i] == plain[i] or any(v != v for v in plain[i])
            assert repr(s) == repr(sorted(plain[i])), (plain[i], s)
            assert repr(kept.sorted(windows[i])) == repr(sorted(plain[i]))
            assert repr(median_mad_sorted(s, windows[i])) == repr(median_mad(plain[i]))
