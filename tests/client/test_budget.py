"""The hook's cost budget: cheap signals every step, expensive ones spaced to hold the budget.

Time is a fake clock the tests move: "training" advances it between steps, and the expensive
work (the softmax statistics of the logits) advances it by a fixed cost each time it runs, so
every schedule here is exact and no test depends on how fast this machine is.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TinyNet, spooled_points, train_step

import stethoscope
from stethoscope import _budget, _logits
from stethoscope._budget import MAX_SPACING, CostBudget


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def run_budget(budget, steps, step_s, cheap_s, full_s, every=None):
    """Drive a CostBudget through ``steps`` steps; returns it and the steps that were full."""
    clock = FakeClock()
    b = CostBudget(budget, every, clock)
    full_steps = []
    for step in range(steps):
        clock.now += step_s  # training
        start = clock.now
        full = b.full
        clock.now += cheap_s + (full_s if full else 0.0)  # the hook's work
        b.step_done(start, clock.now, full)
        if full:
            full_steps.append(step)
    return b, full_steps


def test_expensive_steps_are_spaced_to_hold_the_budget():
    # 10 ms steps, 2% budget = 0.2 ms a step; cheap work 0.05 ms, the expensive set 1.5 ms more:
    # the 0.15 ms a step left pays for an expensive step every 10 steps.
    b, full = run_budget(0.02, 2000, 0.010, 0.00005, 0.0015)
    gaps = [b - a for a, b in zip(full[5:], full[6:])]
    assert set(gaps) <= {9, 10, 11}, gaps[:20]
    assert sum(gaps) / len(gaps) == pytest.approx(10, abs=0.5)  # the step includes the hook
    assert b.overhead <= 0.02 * 1.01
    assert b.overhead >= 0.02 * 0.9, "the budget is used, not wasted"
    assert b.steps == 2000 and b.full_steps == len(full)


def test_a_cheap_expensive_set_runs_every_step():
    b, full = run_budget(0.02, 200, 0.010, 0.00002, 0.00005)
    assert full == list(range(200))
    assert b.overhead <= 0.02


def test_cheap_signals_over_the_budget_leave_the_expensive_set_at_its_floor():
    # A ~1 ms step whose cheap signals alone cost 3%: the expensive set still comes, every
    # MAX_SPACING steps, and the debt does not grow without bound.
    b, full = run_budget(0.02, 1000, 0.001, 0.00003, 0.0005)
    assert full[:2] == [0, 1]  # the first step warms up, the second measures the cost
    assert [b - a for a, b in zip(full[1:], full[2:])] == [MAX_SPACING] * (len(full) - 2)
    assert b.credit >= -2 * b.full_s - 1e-12


def test_a_pause_buys_one_expensive_step_not_a_burst():
    clock = FakeClock()
    b = CostBudget(0.02, clock=clock)
    full = []
    for step in range(300):
        clock.now += 60.0 if step == 150 else 0.010  # a minute of evaluation at step 150
        start = clock.now
        f = b.full
        clock.now += 0.00005 + (0.0015 if f else 0.0)
        b.step_done(start, clock.now, f)
        full.append(f)
    assert sum(full[150:160]) <= 2, full[150:160]
    assert b.step_s == pytest.approx(0.010, rel=0.5), "the pause does not make steps look long"


def test_every_overrides_the_budget():
    b, full = run_budget(0.02, 30, 0.010, 0.00005, 0.05, every=3)  # far over budget: still every 3
    assert full == list(range(0, 30, 3))


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"budget": 0}, "budget"),
        ({"budget": 1}, "budget"),
        ({"budget": 1.5}, "budget"),
        ({"budget": -0.02}, "budget"),
        ({"budget": "2%"}, "budget"),
        ({"budget": True}, "budget"),
        ({"budget": math.nan}, "budget"),
        ({"every": 0}, "every"),
        ({"every": 2.5}, "every"),
        ({"every": True}, "every"),
        ({"clock": 3.0}, "clock"),
    ],
)
def test_misuse_raises_at_once(tmp_path, kwargs, word):
    with pytest.raises(ValueError, match=word):
        stethoscope.attach(TinyNet(), None, server="offline", spool_dir=tmp_path, **kwargs)
    with pytest.raises(ValueError):
        CostBudget(**{k: v for k, v in kwargs.items() if k != "clock"} or {"budget": 0})


# -- through attach: a real loop, a fake clock -------------------------------------------------
STEP_S = 0.010  # what a training step takes on the fake clock
SOFTMAX_S = 0.002  # what the softmax statistics of the logits take


@pytest.fixture
def clock(monkeypatch):
    """A fake clock, advanced by SOFTMAX_S whenever the expensive logit statistics run."""
    clock = FakeClock()
    real = _logits.softmax_row_stats

    def costly(*args, **kwargs):
        clock.now += SOFTMAX_S
        return real(*args, **kwargs)

    monkeypatch.setattr(_logits, "softmax_row_stats", costly)
    return clock


def train(mon, model, opt, clock, steps, poison_at=None):
    for step in range(steps):
        clock.now += STEP_S
        if step == poison_at:
            with torch.no_grad():
                model.head.weight[0, 0] = math.nan
        train_step(mon, model, opt, step)


def test_attach_spaces_the_expensive_metrics_and_keeps_the_cheap_ones_every_step(tmp_path, clock):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = stethoscope.attach(model, opt, server="offline", spool_dir=tmp_path, clock=clock)
    train(mon, model, opt, clock, 200)
    # 2% of 10 ms buys 0.2 ms a step: the 2 ms softmax statistics every 10 steps.
    overhead = mon.overhead
    mon.close()
    got = spooled_points(tmp_path)
    every = list(range(200))
    for name in ("loss", "lr", "grad/norm", "grad/nonfinite", "logits/max_abs", "logits/nonfinite"):
        assert sorted(got[name]) == every, name
    full = sorted(got["logits/sc_fraction"])
    assert full[:2] == [0, 1]  # the first step warms up, the second measures what it costs
    gaps = [b - a for a, b in zip(full[1:], full[2:])]
    assert gaps[0] <= 20, "step 1's cost is paid back first"
    assert set(gaps[1:]) <= {9, 10, 11}, gaps
    assert sum(gaps[1:]) / len(gaps[1:]) == pytest.approx(10, abs=0.5)
    # The other expensive series ride on the same steps.
    for name in ("grad/norm/head", "update_ratio/head", "weight/norm/body.0", "logits/median_margin"):
        assert sorted(got[name]) == full, name
    # What the hook measured of itself: the budget, less the expensive step it was saving for.
    assert 0.02 - SOFTMAX_S / (200 * STEP_S) <= overhead <= 0.02 + SOFTMAX_S / (200 * STEP_S)


def test_every_wins_over_the_budget(tmp_path, clock):
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = stethoscope.attach(model, opt, server="offline", spool_dir=tmp_path, clock=clock, every=1, budget=0.01)
    train(mon, model, opt, clock, 30)
    mon.close()
    got = spooled_points(tmp_path)
    assert sorted(got["logits/sc_fraction"]) == sorted(got["update_ratio/head"]) == list(range(30))


def test_nan_on_a_thinned_step_is_caught_at_that_step(tmp_path, clock):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    heard = []
    mon = stethoscope.attach(model, opt, server="offline", spool_dir=tmp_path, clock=clock)
    mon.on_alert(heard.extend)
    train(mon, model, opt, clock, 40, poison_at=25)  # expensive steps: 0, 1, 11, 21, 31
    assert mon.flush(10)
    mon.close()
    got = spooled_points(tmp_path)
    assert 25 not in got["logits/sc_fraction"], "the poisoned step is a thinned one"
    assert math.isnan(got["loss"][25])
    assert got["grad/nonfinite"][25] > 0
    assert got["logits/nonfinite"][25] > 0 and math.isnan(got["logits/max_abs"][25])
    assert got["grad/nonfinite"][24] == 0 and got["logits/nonfinite"][24] == 0
    nonfinite = [a for a in heard if a["detector"] == "divergence" and a["key"] == "nonfinite"]
    assert nonfinite and nonfinite[0]["start_step"] == 25 and nonfinite[0]["severity"] == "critical"


class FakeDist:
    """torch.distributed for one rank: the all-gather copies."""

    def all_gather_into_tensor(self, out, t):
        out.copy_(t)


class CapturingSender:
    def __init__(self):
        self.records = []
        self.watch = type("W", (), {"callbacks": []})()

    def put(self, rec):
        self.records.append(rec)


def test_distributed_ranks_get_a_fixed_spacing_on_the_device_path(clock):
    # Ranks are gathered into one tensor per step, so they must agree on what each step holds:
    # the spacing is fixed, whatever each rank's clock says.
    from stethoscope._monitor import Monitor

    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sender = CapturingSender()
    mon = Monitor(model, opt, run_id="r", url=None, every=None, sender=sender, dist=(FakeDist(), 1), clock=clock)
    train(mon, model, opt, clock, 25)
    for h in mon._hooks:
        h.remove()
    stethoscope._attention.set_active(False)
    names = {rec[1]: rec[3] for rec in sender.records if rec[0] == "points"}
    full = [s for s, n in sorted(names.items()) if "logits/sc_fraction" in n]
    assert full == list(range(0, 25, _budget.DISTRIBUTED_EVERY))
    for step, n in names.items():
        assert {"loss", "grad/norm", "grad/nonfinite", "logits/max_abs", "logits/nonfinite"} <= set(n), step
        if step not in full:
            assert not any(x.startswith(("grad/norm/", "update_ratio/", "weight/norm/")) for x in n), step
