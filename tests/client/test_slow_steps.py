"""Slow steps: the rule on step-time schedules, and the hook's perf series under a fake clock."""

from __future__ import annotations

import random

import pytest

from stethoscope.core.detectors import DetectorSet, SlowStepsDetector, SlowStepsParams


def _series(ms):
    return [("perf/step_ms", s, v) for s, v in enumerate(ms)]


def _jitter(n, base=10.0, seed=0):
    rng = random.Random(seed)
    return [base * (1 + 0.1 * rng.random()) for _ in range(n)]


def test_a_jittery_run_with_checkpoint_pauses_raises_nothing():
    ms = _jitter(3000)
    for s in range(200, 3000, 250):
        ms[s] = 2000.0  # a checkpoint or an evaluation: one very slow step
    ms[:5] = [500.0] * 5  # the first steps compile and allocate
    assert SlowStepsDetector().update({}, _series(ms)) == []


def test_a_data_loader_stall_every_few_steps_is_told_after_its_patience_and_resolves():
    ms = _jitter(1500)
    for s in range(600, 1100):
        if s % 4 == 0:
            ms[s] = 40.0  # the loader makes every fourth step wait 30 ms
    changes = SlowStepsDetector().update({}, _series(ms))
    assert [(c.action, c.key) for c in changes] == [("open", "perf/step_ms"), ("resolve", "perf/step_ms")]
    opened, resolved = changes
    assert 600 <= opened.start_step <= 650 and opened.severity == "warning"
    assert opened.evidence["ratio"] >= 1.5 and "baseline" in opened.message
    assert resolved.end_step >= 1100


def test_a_gradual_throttle_is_seen_against_the_fixed_baseline():
    ms = _jitter(2000)
    ms = [v * (1 + max(0, s - 500) / 1000) for s, v in enumerate(ms)]  # +0.1% per step after 500
    (c,) = SlowStepsDetector().update({}, _series(ms))
    assert c.action == "open" and 1000 <= c.start_step <= 1200


def test_a_recompile_every_ten_steps_is_slow_and_one_burst_is_not():
    ms = _jitter(1500)
    for s in range(500, 1500, 10):
        ms[s] = 200.0
    (c,) = SlowStepsDetector().update({}, _series(ms))
    assert c.action == "open" and 500 <= c.start_step <= 560
    burst = _jitter(1500)
    burst[700:730] = [30.0] * 30  # thirty slow steps: shorter than the patience
    assert SlowStepsDetector().update({}, _series(burst)) == []


def test_a_task_switch_measures_the_baseline_afresh():
    ms = _jitter(600) + _jitter(600, base=25.0)  # the second task's model is bigger
    pts = _series(ms)
    pts.insert(600, ("continual/task", 600, 1.0))
    assert SlowStepsDetector().update({}, pts) == []
    assert len(SlowStepsDetector().update({}, _series(ms))) == 1  # without the switch: slow


def test_settings_are_checked():
    with pytest.raises(ValueError):
        SlowStepsParams(ratio=1.2, recover_ratio=1.5)
    with pytest.raises(ValueError):
        DetectorSet({"slow_steps": {"trim": 60}})


# -- the hook: a real tiny training, a fake clock -------------------------------------------------
torch = pytest.importorskip("torch")
F = torch.nn.functional

from helpers import TinyNet, spooled_points, train_step  # noqa: E402

import stethoscope  # noqa: E402


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def stall_schedule(step):
    """Milliseconds of each step: 10 ms, and from step 200 the loader stalls every 4th step 30 ms."""
    return 10.0 + (30.0 if step >= 200 and step % 4 == 0 else 0.0)


def test_the_hook_sends_step_time_and_samples_per_second_from_its_clock_and_flags_a_loader_stall(tmp_path):
    torch.manual_seed(0)
    clock = FakeClock()
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    alerts = []
    mon = stethoscope.attach(model, opt, server="offline", spool_dir=tmp_path, clock=clock)
    mon.on_alert(alerts.extend)
    for step in range(450):
        clock.now += stall_schedule(step) / 1e3  # the step, as the fake clock tells it
        train_step(mon, model, opt, step)
    mon.close()
    got = spooled_points(tmp_path)
    ms = got["perf/step_ms"]
    assert sorted(ms) == list(range(1, 450))  # the first step has no step before it
    assert all(ms[s] == pytest.approx(stall_schedule(s), abs=1e-6) for s in ms)
    sps = got["perf/samples_per_s"]  # 32 samples (the targets' first dimension)
    assert sps[5] == pytest.approx(32 / 0.010) and sps[200] == pytest.approx(32 / 0.040)
    assert "perf/cuda_mem_mb" not in got  # a CPU model
    slow = [a for a in alerts if a["detector"] == "slow_steps"]
    assert slow and slow[0]["key"] == "perf/step_ms" and 200 <= slow[0]["start_step"] <= 260
    # (random labels: the run does not learn, and its plateau is told too; not this test's business)


def test_batch_size_given_at_attach_wins_and_misuse_raises(tmp_path):
    clock = FakeClock()
    model = TinyNet()
    mon = stethoscope.attach(model, None, server="offline", spool_dir=tmp_path, clock=clock, batch_size=128)
    for step in range(3):
        clock.now += 0.5
        mon.log(step=step, loss=1.0)
    mon.close()
    assert spooled_points(tmp_path)["perf/samples_per_s"] == {1: 256.0, 2: 256.0}
    with pytest.raises(ValueError, match="batch_size"):
        stethoscope.attach(model, None, server="offline", spool_dir=tmp_path, batch_size=0)
