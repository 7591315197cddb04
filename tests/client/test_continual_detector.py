"""The stability-gap detector on hand-made series: lifecycle, evidence, ordering, state (no torch)."""

from __future__ import annotations

import json

import pytest

from stethoscope.core.detectors import DetectorSet, StabilityGapDetector, StabilityGapParams


def accs(task, start, values):
    return [(f"eval/acc/{task}", start + i, v) for i, v in enumerate(values)]


#: Task a learned to 0.95, a switch to task b at step 10, a dip to 0.30 and a recovery
#: (back within 0.05 of 0.95 from step 16 on); task b rises from 0.
GAP = (
    accs("a", 0, [0.5, 0.7, 0.8, 0.9, 0.92, 0.93, 0.94, 0.95, 0.95, 0.95])
    + [("continual/task", 10, 1.0)]
    + accs("a", 10, [0.6, 0.45, 0.3, 0.45, 0.7, 0.86, 0.91, 0.93, 0.94, 0.95])
    + accs("b", 10, [0.1, 0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.9, 0.92, 0.93])
)


def test_a_gap_opens_on_the_drop_and_resolves_on_recovery_with_its_size_and_time():
    changes = StabilityGapDetector().update({}, GAP)
    assert [(c.action, c.key) for c in changes] == [("open", "a"), ("resolve", "a")]
    res = changes[-1]
    # Open at 0.6 (0.35 below 0.95); worst at 0.30 (step 12); back within 0.05 at step 16.
    assert (res.start_step, res.peak_step, res.end_step) == (10, 12, 16)
    ev = res.evidence
    assert ev["switch_step"] == 10 and ev["pre_switch_acc"] == 0.95 and ev["pre_switch_step"] == 9
    assert ev["gap"] == pytest.approx(0.65) and ev["min_acc"] == 0.3 and ev["min_step"] == 12
    assert ev["recovered_step"] == 16 and ev["recovery_steps"] == 6
    assert res.severity == "warning" and "task a" in res.message and "stability gap" in res.message
    json.dumps(ev, allow_nan=False)


def test_point_by_point_and_in_any_batching_the_changes_are_the_same():
    whole = StabilityGapDetector().update({}, GAP)
    det, state, one = StabilityGapDetector(), {}, []
    for p in GAP:
        one += det.update(state, [p])
    # One batch folds the open episode's updates into its open change; the episodes and
    # their resolutions are the same.
    assert [(c.action, c.start_step) for c in one if c.action != "update"] == [(c.action, c.start_step) for c in whole]
    assert one[-1] == whole[-1]
    # The server feeds a batch with one series after another: within a step, the evaluation
    # of the switch's own step may come before the switch point. Same alerts.
    by_series = sorted(GAP, key=lambda p: (p[0] != "eval/acc/a", p[0]))
    ds = DetectorSet()
    mixed = ds.update({}, by_series)
    assert [(c.action, c.start_step, c.end_step, c.evidence) for c in mixed] == [
        (c.action, c.start_step, c.end_step, c.evidence) for c in whole
    ]


def test_feeding_the_same_points_twice_changes_nothing():
    det, state = StabilityGapDetector(), {}
    first = det.update(state, GAP)
    assert first and det.update(state, GAP) == []


def test_one_noisy_evaluation_does_not_end_the_gap_and_small_dips_do_not_open_one():
    pts = (
        accs("a", 0, [0.95] * 5) + [("continual/task", 5, 1.0)] + accs("a", 5, [0.5, 0.93, 0.6, 0.92, 0.93, 0.94, 0.95])
    )
    changes = StabilityGapDetector().update({}, pts)
    assert [(c.action, c.start_step, c.end_step) for c in changes] == [("open", 5, 7), ("resolve", 5, 8)]
    small = accs("a", 0, [0.95] * 5) + [("continual/task", 5, 1.0)] + accs("a", 5, [0.88, 0.86, 0.9, 0.95])
    assert StabilityGapDetector().update({}, small) == []
    # Settings: a tighter threshold does open on it.
    tight = StabilityGapDetector(StabilityGapParams(drop=0.05, recover_tolerance=0.02, recover_points=1))
    assert [(c.action, c.start_step, c.end_step) for c in tight.update({}, small)] == [
        ("open", 5, 6),
        ("resolve", 5, 8),
    ]


def test_no_switch_no_alert_and_a_gap_that_never_closes_stays_open_across_switches():
    falling = accs("a", 0, [0.95, 0.9, 0.5, 0.2, 0.1])
    assert StabilityGapDetector().update({}, falling) == []  # forgetting without a switch: not a gap
    pts = (
        accs("a", 0, [0.95] * 3)
        + [("continual/task", 3, 1.0)]
        + accs("a", 3, [0.4, 0.5, 0.6])
        + [("continual/task", 6, 2.0)]
        + accs("a", 6, [0.6, 0.7, 0.92, 0.93, 0.94])
    )
    changes = StabilityGapDetector().update({}, pts)
    assert [(c.action, c.key) for c in changes] == [("open", "a"), ("resolve", "a")]
    # Judged against 0.95, the level before the switch at step 3 that opened it.
    assert changes[-1].evidence["switch_step"] == 3 and changes[-1].evidence["recovered_step"] == 8
    assert changes[-1].evidence["recovery_steps"] == 5


def test_each_previous_task_has_its_own_alert_and_non_finite_values_are_skipped():
    pts = (
        accs("a", 0, [0.9] * 4)
        + accs("b", 2, [0.8, 0.8])
        + [("continual/task", 4, 2.0)]
        + accs("a", 4, [0.2, float("nan"), 0.88, 0.89, 0.9])
        + accs("b", 4, [0.75, 0.5, 0.8, 0.8, 0.8])
    )
    changes = StabilityGapDetector().update({}, pts)
    assert sorted((c.key, c.action, c.end_step) for c in changes if c.action != "update") == [
        ("a", "open", 4),
        ("a", "resolve", 6),
        ("b", "open", 5),
        ("b", "resolve", 6),
    ]


def test_state_is_json_and_bounded():
    det, state = StabilityGapDetector(), {}
    step = 0
    for task in range(300):
        det.update(state, [("continual/task", step, float(task))] + accs(str(task), step, [0.9, 0.9]))
        step += 2
    assert len(state["last"]) <= 256 and len(state["watch"]) <= 256
    json.loads(json.dumps(state, allow_nan=False))


def test_settings_are_validated():
    with pytest.raises(ValueError, match="recover_tolerance"):
        DetectorSet({"stability_gap": {"drop": 0.05, "recover_tolerance": 0.1}})
    with pytest.raises(ValueError, match="acc_prefix"):
        DetectorSet({"stability_gap": {"acc_prefix": "eval/acc"}})
    ds = DetectorSet({"stability_gap": {"drop": 0.2}})
    assert ds.settings()["stability_gap"] == {
        "enabled": True,
        "drop": 0.2,
        "recover_tolerance": 0.05,
        "recover_points": 3,
        "task_series": "continual/task",
        "acc_prefix": "eval/acc/",
    }
