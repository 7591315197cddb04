"""``CurvatureSchedule``: when to run which curvature estimate, within a share of wall time."""

from __future__ import annotations

import math
import time

from ._estimate import DEFAULT_BUDGET

#: The kinds of estimate: lambda_max alone, warm-started from the last top eigenvector; and
#: lambda_max from a random start (which also finds a new top direction) with the trace.
SHARPNESS, FULL = "sharpness", "full"
#: Steps between lambda_max estimates when the budget allows (more when it does not). On the
#: tests' full-batch GD MLP (lr 0.2) sharpness climbs from 90% of 2/lr, where the
#: edge-of-stability detector opens, to 2/lr in ~25 steps: with an estimate every 50 steps
#: the alert opens at most ~25 steps after the crossing.
SHARPNESS_EVERY = 50
#: Steps between traces when the budget allows. A trace (Lanczos from a random start, then
#: deflated Hutchinson probes) costs ~10 warm lambda_max estimates there (18 products vs 2).
TRACE_EVERY = 200
#: While a trace is due but does not fit, this share of the budget is put aside for it, so a
#: budget that lambda_max alone uses up still yields a trace in a long run. Small, since it
#: spaces lambda_max out by as much (1/0.9: +11%) while it lasts.
TRACE_SHARE = 0.1
#: Products assumed for a kind of estimate not measured yet (its cost is then predicted from
#: the seconds per product of the last estimate): a full estimate took 13-27 on the GD MLP.
EXPECTED_HVPS = {SHARPNESS: 3, FULL: 30}
#: Calls after an estimate whose intervals are timed, so the estimate is also charged the
#: slowdown it leaves behind (caches and allocator refilled): measured on the GD MLP on one
#: CPU thread (process CPU time, medians of ~70 estimates), the three steps after a warm
#: estimate were slower by 0.12, 0.06 and 0.03 ms, ~7% of the estimate's own 3.3 ms; the
#: fourth was not.
AFTER_CALLS = 4

# -- watching the edge of stability ------------------------------------------------------------
# Under a 5% budget on a real clock, a warm lambda_max estimate on the tests' GD MLP costs 3-12
# training steps (shared 2-core machine), so the budget spaces estimates 100-250 steps apart,
# while sharpness goes from 75% of 2/lr to past it in ~40 steps: with even spacing the crossing
# was seen within 100 steps in 1 run of 9. So the schedule spends the budget where it matters:
# when the last estimates say sharpness is near 2/lr or rising toward it, the next estimate
# comes early, on a bounded overdraft of the budget, repaid after the crossing is seen.

#: Sharpness at or above this share of 2/lr has been seen to cross: stop watching closely
#: (the edge-of-stability detector's warning threshold, ``EOS_AT_RATIO``).
EDGE_SEEN = 1.0
#: At or above this share of 2/lr, estimate at least every ``EDGE_EVERY`` steps until the
#: crossing is seen. On the GD MLP sharpness takes ~40 steps from 0.75 to 1.0 of 2/lr.
EDGE_APPROACH = 0.75
#: After a crossing has been seen, sharpness must fall below this share of 2/lr before an
#: approach is watched again (at the edge it hovers within 0.9-1.2 with catapults).
EDGE_REARM = 0.6
#: Closest spacing of estimates near the edge. On the GD MLP sharpness stays above 2/lr for
#: ~70 steps after the crossing (then catapults), so 25 steps leaves two or three readings
#: there; 20 spent the overdraft before the crossing more often (7/9 runs flagged vs 8/9).
EDGE_EVERY = 25
#: While sharpness rises, the next estimate comes after this share of the steps that the trend
#: of the last two (growth exponential in steps, as progressive sharpening is at first) leaves
#: before 2/lr: the trend speeds up, and a later estimate would step over the crossing (0.5:
#: 5/9 runs flagged within 100 steps, the next estimate after one at 0.26 of 2/lr came past it).
EDGE_LEAD = 0.35
#: The overdraft near the edge: this many lambda_max estimates (at their predicted cost) ahead
#: of the budget, at most; repaid before any estimate that is not urgent. The approach from
#: 0.5 to 1.0 of 2/lr took 4-6 urgent estimates on the GD MLP.
EDGE_OVERDRAFT = 6


def _steps(name, value, default):
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int (steps between estimates) or None; got {value!r}")
    return value


class CurvatureSchedule:
    """When to run which estimate, from the steps, the time measured and the last sharpness.

    By default (a time budget): a ``"sharpness"`` estimate once ``sharpness_every`` steps have
    passed since the last lambda_max, a ``"full"`` one once ``trace_every`` steps have passed
    since the last trace, each only if, at the cost predicted for it, the time charged to
    curvature stays within ``budget`` of all the wall time measured. When the budget is short
    the estimates come later than that: the spacing follows the measured cost. A trace runs
    only when the budget also has room for the next lambda_max estimate, so it never makes
    lambda_max late; while it waits, ``TRACE_SHARE`` of the budget accrues to it.

    What an estimate is charged: all the wall time between the clock readings around it (the
    gradient graph built for the products, the products, Lanczos, the probes, freeing it all,
    putting the training state back; on an accelerator also the wait for the training step's
    queued kernels, which an estimate's first read-back syncs on), plus the slowdown it leaves
    behind: the ``AFTER_CALLS`` calls after it are timed one by one and their excess over the
    mean call in the stretch that follows is charged too. The calls in between cost no clock
    reading: the schedule reads the clock only on calls where an estimate could be due.

    Near the edge of stability (``watch_edge``, on by default; needs ``two_over_lr`` passed to
    ``ran``): once lambda_max reaches ``EDGE_APPROACH`` of 2/lr, or its trend over the last two
    estimates points at 2/lr, the next estimate is due sooner (every ``EDGE_EVERY`` steps at
    least, and at ``EDGE_LEAD`` of the steps left by the trend), and may run on an overdraft
    of ``EDGE_OVERDRAFT`` estimates past the budget; after the crossing is seen the debt is
    repaid before any other estimate. So the share is within ``budget`` plus that overdraft
    (a few estimates) over the time measured, and back within it after repayment.

    The first call runs a sharpness estimate (its cost is not known before). Its time is
    charged (``share`` counts it) but not paid back by spacing the next ones: over a run the
    share is within ``budget`` plus that one estimate. ``every=N`` instead runs a full
    estimate every N steps, whatever the time. ``clock`` is injectable (tests use a fake).

        sched = CurvatureSchedule(budget=0.05)
        kind = sched.due(step)            # "sharpness", "full" or None
        if kind:
            started = sched.clock()
            ...run the estimate...
            sched.ran(step, started, kind, hvps, lambda_max=lam, two_over_lr=2 / lr)
    """

    def __init__(
        self,
        every=None,
        budget=None,
        clock=time.perf_counter,
        *,
        sharpness_every=None,
        trace_every=None,
        watch_edge=True,
    ):
        if every is not None:
            every = _steps("every", every, None)
            if budget is not None or sharpness_every is not None or trace_every is not None:
                raise ValueError(
                    "every=N runs a full estimate every N steps whatever the time; "
                    "do not combine it with budget, sharpness_every or trace_every"
                )
        elif budget is None:
            budget = DEFAULT_BUDGET
        elif isinstance(budget, bool) or not (isinstance(budget, (int, float)) and 0 < budget < 1):
            raise ValueError(f"budget must be a share of training time in (0, 1), e.g. 0.05; got {budget!r}")
        self.every = every
        self.budget = None if budget is None else float(budget)
        self.sharpness_every = every or _steps("sharpness_every", sharpness_every, SHARPNESS_EVERY)
        self.trace_every = every or _steps("trace_every", trace_every, TRACE_EVERY)
        if not callable(clock):
            raise ValueError("clock must be a callable returning seconds, like time.perf_counter")
        self.clock = clock
        self.watch_edge = bool(watch_edge) and every is None
        self.elapsed = 0.0  # wall seconds from the first call to the last clock reading
        self.curvature_seconds = 0.0  # the estimates' own wall time
        self.after_seconds = 0.0  # measured slowdown of the calls after them (a signed sum)
        self.first_seconds = 0.0  # the first estimate's own time: charged, not paid back
        self.calls = 0
        self.runs = 0
        self.urgent_runs = 0  # estimates brought forward near the edge of stability
        self._t0 = self._last = None  # clock readings: the first, the last
        self._first_step = self._last_lambda = self._last_trace = None
        self._rate = None  # seconds per product (a graph build counted as one) of the last estimate
        self._hvps = {}  # kind -> products its last typical estimate took
        self._cost = {}  # kind -> seconds of its last estimate (when products are not reported)
        self._saving_since = None  # train_seconds when a due trace did not fit
        self._next_step = 0  # no clock reading on calls before this step
        self._after = None  # [calls left, seconds] while timing the calls after an estimate
        self._pending = None  # (seconds, calls) of a timed window not yet compared with the mean
        self._gap = (0.0, 0)  # (elapsed, calls) where the current untimed stretch began
        self._edge = []  # (step, lambda_max / (2/lr)) of the last lambda_max estimates, at most 2
        self._deadline = None  # step from which the next estimate is urgent
        self._armed = True  # watching for a crossing (not seen since sharpness was last low)

    # -- accounting --------------------------------------------------------------------------
    @property
    def charged_seconds(self):
        """Wall seconds charged to curvature: the estimates' own time and the slowdown after."""
        return self.curvature_seconds + max(0.0, self.after_seconds)

    @property
    def train_seconds(self):
        return max(0.0, self.elapsed - self.charged_seconds)

    @property
    def share(self):
        """Share of the measured wall time charged to curvature."""
        return self.charged_seconds / self.elapsed if self.elapsed > 0 else 0.0

    def _read(self):
        now = self.clock()
        if self._t0 is None:
            self._t0 = now
        if self._after is not None:  # one of the calls after an estimate
            self._after[1] += max(0.0, now - self._last)
            self._after[0] -= 1
            if self._after[0] == 0:
                self._pending = (self._after[1], AFTER_CALLS)
                self._after = None
                self._gap = (now - self._t0, self.calls)
        self._last = now
        self.elapsed = now - self._t0
        gap_seconds, gap_calls = self.elapsed - self._gap[0], self.calls - self._gap[1]
        if self._pending is not None and self._after is None and gap_calls >= AFTER_CALLS:
            seconds, calls = self._pending
            self.after_seconds += seconds - calls * gap_seconds / gap_calls
            self._pending = None

    def _predict(self, kind):
        if self._rate is None:
            return self._cost.get(kind, max(self._cost.values(), default=0.0))
        return self._rate * (self._hvps.get(kind, EXPECTED_HVPS[kind]) + 1)

    # -- the decision ----------------------------------------------------------------------------
    def due(self, step):
        """Called once per collector call, before any estimate: ``"sharpness"``, ``"full"`` or None."""
        self.calls += 1
        if self._first_step is None:
            self._read()
            self._first_step = step
            return FULL if self.budget is None else SHARPNESS
        if self._after is None and step < self._next_step:
            return None  # nothing can be due: no clock reading
        self._read()
        kind = self._decide(step)
        if kind is not None:
            self._gap = (self.elapsed, self.calls)  # an unfinished stretch is not a mean call
        return kind

    def _decide(self, step):
        since_lambda = step - (self._first_step if self._last_lambda is None else self._last_lambda)
        since_trace = step - (self._first_step if self._last_trace is None else self._last_trace)
        if self.budget is None:
            if since_trace >= self.trace_every:
                return FULL
            return SHARPNESS if since_lambda >= self.sharpness_every else None
        rate = self.budget / (1 - self.budget)
        # an estimate of cost c keeps the share (less the first estimate) within budget iff
        # c <= allowance
        allowance = rate * self.train_seconds - (self.charged_seconds - self.first_seconds)
        lam = self._predict(SHARPNESS)
        urgent = self._deadline is not None and step >= self._deadline
        if urgent:
            if lam <= allowance + EDGE_OVERDRAFT * lam:
                self.urgent_runs += 1
                return SHARPNESS
            return self._wait(step, lam - allowance - EDGE_OVERDRAFT * lam, rate)
        reserve = 0.0
        trace_due = since_trace >= self.trace_every
        if trace_due:
            if self._saving_since is None:
                self._saving_since = self.train_seconds
            reserve = TRACE_SHARE * rate * (self.train_seconds - self._saving_since)
        if since_lambda < self.sharpness_every:
            self._next_step = self._last_lambda + self.sharpness_every
            if self._deadline is not None:
                self._next_step = min(self._next_step, self._deadline)
            return None
        # A trace takes the place of a lambda_max estimate, so the cadence stays regular.
        if trace_due and self._predict(FULL) + lam <= allowance:
            self._saving_since = None
            return FULL
        if lam + reserve <= allowance:
            return SHARPNESS
        return self._wait(step, lam + reserve - allowance, rate)

    def _wait(self, step, deficit, rate):
        """Nothing fits yet: skip the clock for half the calls the deficit predicts (the mean
        call so far earns ``rate`` times itself), so the estimate runs on the first call it
        fits; and not past the deadline of an urgent one."""
        calls = self.calls - 1
        per_call = self.train_seconds / max(1, calls)
        if per_call > 0 and calls > 0:
            steps_per_call = max(1.0, (step - self._first_step) / calls)
            skip = max(1, int(0.5 * deficit / (rate * per_call) * steps_per_call))
            self._next_step = step + skip
            if self._deadline is not None and step < self._deadline:
                self._next_step = min(self._next_step, self._deadline)
        return None

    def ran(self, step, started=None, kind=SHARPNESS, hvps=None, *, lambda_max=None, two_over_lr=None):
        """Record an estimate of ``kind`` that began at ``started`` (a clock reading; default the
        one ``due`` took) and just ended, having taken ``hvps`` products (None if unknown, as
        after a failure), with its ``lambda_max`` and the ``two_over_lr`` bound, if known."""
        now = self.clock()
        start = self._last if started is None else started
        cost = max(0.0, now - start)
        self.curvature_seconds += cost
        self._cost[kind] = cost
        if hvps:
            self._rate = cost / (hvps + 1)
            if not (self.runs == 0 and kind == SHARPNESS):  # the first starts cold: not typical
                self._hvps[kind] = hvps
        self._last_lambda = step
        if kind == FULL:
            self._last_trace = step
        self._last = now
        self.elapsed = now - self._t0
        if self.runs == 0:
            # A cold start whose cost nothing predicted, often inflated by one-off work, and
            # followed by the job's own first steps, which are slow anyway: paid back, it held
            # the next estimate back by 100-600 steps on the GD MLP (real clock, shared CPU).
            self.first_seconds = cost
        else:
            self._after = [AFTER_CALLS, 0.0]
        self.runs += 1
        self._watch_edge(step, lambda_max, two_over_lr)
        self._next_step = step + self.sharpness_every
        if self._deadline is not None:
            self._next_step = min(self._next_step, self._deadline)

    def _watch_edge(self, step, lambda_max, two_over_lr):
        if not self.watch_edge:
            return
        try:
            ratio = float(lambda_max) / float(two_over_lr)
        except (TypeError, ValueError, ZeroDivisionError):
            return
        if not math.isfinite(ratio) or ratio <= 0:
            return
        self._deadline = None
        if ratio >= EDGE_SEEN:
            self._armed = False
        elif not self._armed and ratio < EDGE_REARM:
            self._armed = True
        previous = self._edge[-1] if self._edge else None
        self._edge = [(step, ratio)] if previous is None else [previous, (step, ratio)]
        if not self._armed:
            return
        if ratio >= EDGE_APPROACH:
            self._deadline = step + EDGE_EVERY
        if previous is not None and step > previous[0] and ratio > previous[1]:
            growth = math.log(ratio / previous[1]) / (step - previous[0])
            # Far from the edge the deadline is far too, and the plain cadence comes first.
            deadline = step + max(EDGE_EVERY, math.ceil(EDGE_LEAD * math.log(1 / ratio) / growth))
            self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)


__all__ = ["CurvatureSchedule"]
