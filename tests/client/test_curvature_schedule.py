"""The curvature schedule with a fake clock: logic, not timings. Which estimates run when, what
they are charged (their own time and the slowdown after them), and the edge of stability
watched closely within a bounded overdraft."""

from __future__ import annotations

import math
import statistics

import pytest

from stethoscope.curvature._schedule import AFTER_CALLS, EDGE_OVERDRAFT, CurvatureSchedule


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def simulate(schedule, clock, steps, step_seconds, cost, hvps=lambda step, kind: None, sharpness=None):
    """[(step, kind)] of the estimates the schedule ran; ``cost(step, kind)`` seconds each;
    ``sharpness(step)``: lambda_max / (2/lr) measured there (None: not reported)."""
    ran = []
    for step in range(steps):
        clock.t += step_seconds(step)
        kind = schedule.due(step)
        if kind:
            started = clock()
            clock.t += cost(step, kind)
            edge = {} if sharpness is None else dict(lambda_max=10.0 * sharpness(step), two_over_lr=10.0)
            schedule.ran(step, started, kind, hvps(step, kind), **edge)
            ran.append((step, kind))
    return ran


# A warm lambda_max estimate: 2 products, 0.5 s; a full one (Lanczos and trace): 17, 3 s; the
# first (no vector to start from): 4, 0.8 s. Products cost the same in each, as they do.
COSTS = {"sharpness": (0.5, 2), "full": (3.0, 17)}


def cost(step, kind):
    return COSTS[kind][0] if step else 0.8


def products(step, kind):
    return COSTS[kind][1] if step else 4


def test_every_n_steps():
    clock = FakeClock()
    s = CurvatureSchedule(every=3, clock=clock)
    assert simulate(s, clock, 10, lambda i: 1.0, lambda i, k: 5.0) == [(i, "full") for i in (0, 3, 6, 9)]


def test_lambda_max_every_50_steps_and_the_trace_every_200_when_the_budget_allows():
    clock = FakeClock()
    s = CurvatureSchedule(clock=clock)  # the defaults: 5%, 50 and 200 steps
    ran = simulate(s, clock, 2000, lambda i: 1.0, cost, products)
    assert [step for step, _ in ran] == list(range(0, 2000, 50))
    # a trace takes the place of a lambda_max estimate (both give lambda_max)
    assert [step for step, kind in ran if kind == "full"] == list(range(200, 2000, 200))
    assert s.share <= 0.05


def test_a_short_budget_spaces_lambda_max_by_its_measured_cost():
    clock = FakeClock()
    s = CurvatureSchedule(budget=0.05, clock=clock)
    # 0.1 s steps: a 0.5 s estimate needs 9.5 s of training at 5%; while a trace waits, 10%
    # of the budget is put aside for it, so 10.6 s (106 steps). A cost of 1 s needs twice that.
    ran = simulate(s, clock, 30000, lambda i: 0.1, lambda i, k: cost(i, k) * (2 if i >= 15000 else 1), products)
    assert 0.045 <= s.share <= 0.05
    steps = [step for step, _ in ran]
    gaps = {b: b - a for a, b in zip(steps, steps[1:])}
    early = sorted(g for b, g in gaps.items() if 1000 < b < 15000)
    late = sorted(g for b, g in gaps.items() if b > 16000)
    assert 105 <= statistics.median(early) <= 106 and 210 <= statistics.median(late) <= 212
    # ... and the trace still runs, from what was put aside, without making lambda_max late
    fulls = [step for step, kind in ran if kind == "full"]
    assert len(fulls) == 2 and fulls[0] < 15000 < fulls[1]
    for f in fulls:
        assert gaps[f] <= 212 and gaps[steps[steps.index(f) + 1]] <= 212


def test_estimates_follow_the_budget_and_a_cost_that_overran_is_paid_back():
    clock = FakeClock()
    s = CurvatureSchedule(budget=0.05, sharpness_every=1, clock=clock)
    ran = simulate(s, clock, 2000, lambda i: 0.1, lambda i, k: 0.5 if i < 1000 else 1.0)  # no product counts
    early = [r for r, _ in ran if r < 1000]
    late = [r for r, _ in ran if r >= 1000]
    assert ran[0] == (0, "sharpness")
    assert 0.045 <= s.share - s.first_seconds / s.elapsed <= 0.05  # the first is not paid back
    assert s.first_seconds == 0.5
    # 0.5 s per estimate at 5% needs ~9.5 s (95 steps) of training between estimates
    assert 9 <= len(early) <= 12 and 4 <= len(late) <= 6
    gaps = [b - a for a, b in zip(late, late[1:])]
    # the first estimate at the new cost overran its prediction; the next gap pays it back
    assert gaps[0] > 195


# -- what an estimate is charged ---------------------------------------------------------------
def test_an_estimate_is_charged_the_slowdown_of_the_calls_after_it():
    """The calls right after an estimate run slower (caches, allocator): 0.3 s and 0.2 s more
    here. The schedule times them against the mean call after, charges the excess to
    curvature, and spaces the estimates so that all they cost stays within the budget."""
    clock = FakeClock()
    s = CurvatureSchedule(budget=0.05, clock=clock)
    last = [-1000]
    extra = {1: 0.3, 2: 0.2}

    def step_seconds(step):
        return 0.1 + extra.get(step - last[0], 0.0)

    def cost(step, kind):
        last[0] = step
        return 0.5

    ran = simulate(s, clock, 20000, step_seconds, cost, lambda step, kind: 2)
    n = len(ran)
    # all but the first's (a cold start followed by the job's first steps: not timed)
    assert s.after_seconds == pytest.approx(0.5 * (n - 1), rel=1e-6)
    assert s.charged_seconds == pytest.approx(0.5 * n + 0.5 * (n - 1), rel=1e-6)
    # what the estimates really cost, the first aside, within the budget
    true_cost = 0.5 * n + 0.5 * n
    assert 0.045 <= (true_cost - 1.0) / s.elapsed <= 0.05
    steps = [step for step, _ in ran]
    # 1 s charged each at 5% needs 19 s (190 steps) of training, twice the 95 without the
    # slowdown; 211 with 10% of the budget put aside for a trace, as above
    assert 205 <= statistics.median(b - a for a, b in zip(steps, steps[1:])) <= 215


def test_the_clock_is_read_only_where_an_estimate_could_be_due():
    """A clock reading on every call is overhead on every training step (a few microseconds,
    ~1% of a 1 ms step): between estimates the schedule reads it only when one could be due."""
    clock = FakeClock()
    reads = [0]

    def counting():
        reads[0] += 1
        return clock()

    s = CurvatureSchedule(budget=0.05, clock=counting)
    ran = simulate(s, clock, 20000, lambda i: 0.1, lambda i, k: 0.5, lambda step, kind: 2)
    steps = [step for step, _ in ran]
    assert 90 <= statistics.median(b - a for a, b in zip(steps, steps[1:])) <= 110
    # per estimate: the readings around it, the calls timed after it, and a few while it waits
    assert reads[0] <= len(ran) * (2 + AFTER_CALLS + 12)
    assert reads[0] < 20000 / 5


# -- the edge of stability ---------------------------------------------------------------------
#: lambda_max / (2/lr) every 25 steps on the tests' GD MLP (tests/client/_gd_edge.py, dense
#: reference): progressive sharpening that speeds up, crossing 2/lr at step ~377, then hovering.
SHARPENING = [0.236, 0.239, 0.244, 0.251, 0.261, 0.276, 0.297, 0.327, 0.367, 0.423, 0.496, 0.586, 0.688, 0.795]
SHARPENING += [0.898, 0.995, 1.084, 1.166, 1.202, 0.979, 1.031, 1.077, 1.083, 0.974, 1.013]
CROSSING = 377


def gd_sharpness(step):
    """The curve above, linear between its points, then hovering at 1.0-1.05; warm estimates
    read it 1% low (Ritz values are lower bounds)."""
    i, w = divmod(step, 25)
    if i + 1 >= len(SHARPENING):
        return 0.99 * (1.025 + 0.025 * math.sin(step / 17))
    return 0.99 * ((1 - w / 25) * SHARPENING[i] + w / 25 * SHARPENING[i + 1])


def edge_run(watch_edge, steps=3000, estimate_seconds=8.0):
    """Steps of 1 s, estimates of ``estimate_seconds`` (the first in 4 products, then 2): as on
    the real clock, where an estimate costs several training steps and 5% spaces them ~150+
    steps apart."""
    clock = FakeClock()
    s = CurvatureSchedule(budget=0.05, clock=clock, watch_edge=watch_edge)
    charged_over = []

    def cost(step, kind):
        # the debt (the first estimate aside) never exceeds the overdraft
        charged_over.append(s.charged_seconds - s.first_seconds - 0.05 / 0.95 * s.train_seconds)
        return estimate_seconds

    ran = simulate(s, clock, steps, lambda i: 1.0, cost, lambda step, kind: 2 if step else 4, gd_sharpness)
    return s, [step for step, _ in ran], max(charged_over)


def test_near_the_edge_estimates_come_sooner_and_see_the_crossing():
    """Evenly spaced by the budget (~150 steps) the estimates step over the crossing of 2/lr;
    watching the edge, the trend of the last two brings the next ones forward, and one of
    them reads lambda_max >= 2/lr within 100 steps of the crossing, on a bounded overdraft
    repaid afterwards."""
    plain, plain_steps, _ = edge_run(watch_edge=False)
    gaps = [b - a for a, b in zip(plain_steps, plain_steps[1:])]
    assert min(gaps[1:]) > 140  # the budget's even spacing
    seen = [st for st in plain_steps if gd_sharpness(st) >= 1.0]
    assert not seen or seen[0] > CROSSING + 100, plain_steps  # the crossing is missed

    s, steps, debt = edge_run(watch_edge=True)
    seen = [st for st in steps if gd_sharpness(st) >= 1.0]
    assert seen and abs(seen[0] - CROSSING) <= 100, steps
    near = [st for st in steps if CROSSING - 150 <= st <= seen[0]]
    assert len(near) >= 3 and s.urgent_runs >= 2, steps  # brought forward near the edge
    # the overdraft is bounded: at most EDGE_OVERDRAFT estimates ahead of the budget ...
    assert debt <= EDGE_OVERDRAFT * 8.0 + 1e-9
    assert debt > 8.0  # ... and was used
    # ... and repaid: no estimate for a while after the crossing is seen, and the long-run
    # share is back within the budget
    assert min(st for st in steps if st > seen[0]) - seen[0] > 150
    assert s.share <= 0.05
    # after the crossing (sharpness hovering at 2/lr) no more estimates are brought forward
    assert all(b - a > 140 for a, b in zip(steps, steps[1:]) if a > seen[0])
