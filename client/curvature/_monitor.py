"""``CurvatureMonitor``: curvature estimates on a schedule, as a collector for the hook."""

from __future__ import annotations

import dataclasses
import time

from .. import _errors
from ._estimate import (
    DEFAULT_BUDGET,
    LANCZOS_MAX_ITER,
    LANCZOS_TOL,
    MAX_HVPS,
    PROBE_BLOCK,
    TRACE_REL_TOL,
    CurvatureEstimate,
    _check_tolerances,
    _estimate,
)
from ._hvp import HessianOperator, check_batch

#: The kinds of estimate: lambda_max alone, warm-started from the last top eigenvector; and
#: lambda_max from a random start (which also finds a new top direction) with the trace.
SHARPNESS, FULL = "sharpness", "full"
#: A lambda_max estimate alone (``kind="sharpness"``) stops once the residual bound of its
#: top Ritz value is below this share of it. Restarted every 50 steps from the last top Ritz
#: vector on the tests' GD MLP (lr 0.2) it took 2.1 products on average, within 0.3% while
#: sharpness rose to 2/lr and 0-7% low at the edge, where the top directions keep turning;
#: 1e-2 halved the worst error for 2.7x the products.
SHARPNESS_TOL = 0.03
#: Products of a warm-started lambda_max estimate at most, and of the first one, which has
#: no vector to start from. Few, because under a 5% budget each estimate is paid back before
#: the next can run: on that MLP, with a product costing 1-2 training steps, 6 products for
#: the first (7% low) instead of 4 (10% low) put the next estimate 40-85 steps later, and an
#: uncapped warm estimate after a long gap took 5-7 and made the gap after it longer still.
#: Each restart refines the vector: within 2% by the fourth estimate.
WARM_MAX_ITER = 3
FIRST_SHARPNESS_HVPS = 4
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


def _steps(name, value, default):
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int (steps between estimates) or None; got {value!r}")
    return value


class CurvatureSchedule:
    """When to run which estimate, from the steps and the time measured.

    By default (a time budget): a ``"sharpness"`` estimate once ``sharpness_every`` steps have
    passed since the last lambda_max, a ``"full"`` one once ``trace_every`` steps have passed
    since the last trace, each only if, at the cost predicted for it, curvature time stays
    within ``budget`` of all the time measured, training included. When the budget is short
    the estimates come later than that: the spacing follows the measured cost. A trace runs
    only when the budget also has room for the next lambda_max estimate, so it never makes
    lambda_max late; while it waits, ``TRACE_SHARE`` of the budget accrues to it.

    Costs are predicted from the seconds per product of the last estimate and the products
    the last estimate of that kind took. Training time is the wall time between calls, minus
    the estimates; an estimate's time is all that passes between the clock readings around
    it: the gradient graph built for the products, the products, Lanczos, the probes, putting
    the training state back (on an accelerator also the wait for the training step's queued
    kernels, which an estimate's first read-back syncs on: counted against curvature).

    The first call runs a sharpness estimate (its cost is not known before), so the share is
    above the budget at first and is paid back after it. ``every=N`` instead runs a full
    estimate every N steps, whatever the time.
    """

    def __init__(self, every=None, budget=None, clock=time.perf_counter, *, sharpness_every=None, trace_every=None):
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
        self._clock = clock
        self.train_seconds = 0.0
        self.curvature_seconds = 0.0
        self.runs = 0
        self._last_end = None
        self._first_step = self._last_lambda = self._last_trace = None
        self._rate = None  # seconds per product (a graph build counted as one) of the last estimate
        self._hvps = {}  # kind -> products its last typical estimate took
        self._cost = {}  # kind -> seconds of its last estimate (when products are not reported)
        self._saving_since = None  # train_seconds when a due trace did not fit

    def _predict(self, kind):
        if self._rate is None:
            return self._cost.get(kind, max(self._cost.values(), default=0.0))
        return self._rate * (self._hvps.get(kind, EXPECTED_HVPS[kind]) + 1)

    def due(self, step):
        """Called once per collector call, before any estimate: ``"sharpness"``, ``"full"`` or None."""
        now = self._clock()
        if self._last_end is not None:
            self.train_seconds += max(0.0, now - self._last_end)
        self._last_end = now
        if self._first_step is None:
            self._first_step = step
            return FULL if self.budget is None else SHARPNESS
        since_lambda = step - (self._first_step if self._last_lambda is None else self._last_lambda)
        since_trace = step - (self._first_step if self._last_trace is None else self._last_trace)
        if self.budget is None:
            if since_trace >= self.trace_every:
                return FULL
            return SHARPNESS if since_lambda >= self.sharpness_every else None
        rate = self.budget / (1 - self.budget)
        # an estimate of cost c keeps the share within budget iff c <= allowance
        allowance = rate * self.train_seconds - self.curvature_seconds
        lam = self._predict(SHARPNESS)
        reserve = 0.0
        trace_due = since_trace >= self.trace_every
        if trace_due:
            if self._saving_since is None:
                self._saving_since = self.train_seconds
            reserve = TRACE_SHARE * rate * (self.train_seconds - self._saving_since)
        if since_lambda < self.sharpness_every:
            return None
        # A trace takes the place of a lambda_max estimate, so the cadence stays regular.
        if trace_due and self._predict(FULL) + lam <= allowance:
            self._saving_since = None
            return FULL
        return SHARPNESS if lam + reserve <= allowance else None

    def ran(self, step, started, kind=SHARPNESS, hvps=None):
        """Record an estimate of ``kind`` that began at ``started`` (a clock reading) and just
        ended, having taken ``hvps`` products (None if unknown, as after a failure)."""
        now = self._clock()
        cost = max(0.0, now - started)
        self.curvature_seconds += cost
        self._cost[kind] = cost
        if hvps:
            self._rate = cost / (hvps + 1)
            if not (self.runs == 0 and kind == SHARPNESS):  # the first starts cold: not typical
                self._hvps[kind] = hvps
        self.runs += 1
        self._last_lambda = step
        if kind == FULL:
            self._last_trace = step
        self._last_end = now

    @property
    def share(self):
        total = self.train_seconds + self.curvature_seconds
        return self.curvature_seconds / total if total > 0 else 0.0


class CurvatureMonitor:
    """Hessian trace and sharpness of the training loss, on a schedule, as series.

    Call it once per training step (or register it with ``mon.add_collector``); it returns
    the ``hessian/*`` series when it ran an estimate and ``None`` otherwise. The loss is
    ``loss_fn(model(inputs), targets)`` on a fixed ``batch=(inputs, targets)``, or
    ``closure()``.

    By default it keeps within ``budget`` (5%) of the training wall time, measured between
    calls, and within that estimates lambda_max every ``sharpness_every`` (50) steps and the
    trace every ``trace_every`` (200) steps, later when the budget is short (see
    ``CurvatureSchedule``). A lambda_max estimate is a few Lanczos steps restarted from the
    last top eigenvector (2 products on average on the tests' GD MLP), stopped when the
    residual bound is within ``sharpness_tol`` (3%) of the value; it sends no trace. The first
    estimate starts from a random vector; so does each full one, which also finds a top
    direction that a warm start could miss. ``every=N`` runs a full estimate every N steps.
    The monitor keeps one extra copy of the parameters: the top eigenvector.

    ``hessian/two_over_lr`` comes from the first parameter group of ``optimizer`` (for SGD and
    full-batch GD the edge of stability is lambda_max = 2/lr; for Adam the threshold concerns
    the preconditioned Hessian, Cohen et al. 2022, so compare with care). ``hessian/hvps`` is
    the products of that estimate, ``hessian/seconds`` all the wall time it took.

        curv = CurvatureMonitor(model, torch.nn.functional.cross_entropy,
                                batch=(x_fixed, y_fixed), optimizer=opt)
        for step, (x, y) in enumerate(loader):
            ...
            opt.step()
            if (series := curv(step)) is not None:
                print(series["hessian/lambda_max"], series["hessian/two_over_lr"])

    Errors of its own never reach the training loop: an estimate that fails is reported
    (see ``stethoscope._errors``) and the call returns ``None``. Wrong arguments raise
    ``ValueError`` here, at construction.
    """

    def __init__(
        self,
        model,
        loss_fn=None,
        batch=None,
        *,
        closure=None,
        optimizer=None,
        every=None,
        budget=None,
        sharpness_every=None,
        trace_every=None,
        sharpness_tol=SHARPNESS_TOL,
        rel_tol=TRACE_REL_TOL,
        tol=LANCZOS_TOL,
        max_iter=LANCZOS_MAX_ITER,
        max_hvps=MAX_HVPS,
        seed=0,
        backend="auto",
        clock=time.perf_counter,
    ):
        if (batch is None) == (closure is None):
            raise ValueError("pass exactly one of batch=(inputs, targets) or closure=<callable returning the loss>")
        if batch is not None:
            check_batch(batch)
        if optimizer is not None and not getattr(optimizer, "param_groups", None):
            raise ValueError("optimizer must be a torch.optim.Optimizer (its first param group's lr gives 2/lr)")
        _check_tolerances(rel_tol, tol, max_iter, max_hvps)
        if isinstance(sharpness_tol, bool) or not (isinstance(sharpness_tol, (int, float)) and 0 < sharpness_tol < 1):
            raise ValueError(f"sharpness_tol must be in (0, 1), e.g. 0.03; got {sharpness_tol!r}")
        self.schedule = CurvatureSchedule(
            every, budget, clock, sharpness_every=sharpness_every, trace_every=trace_every
        )
        # Validates model, loss_fn and backend now, not on the first training step.
        HessianOperator(model, loss_fn, batch, closure=closure, backend=backend)
        self.model, self.loss_fn, self.batch, self.closure = model, loss_fn, batch, closure
        self.optimizer = optimizer
        self.backend = backend
        self.seed = int(seed)
        self.sharpness_tol = float(sharpness_tol)
        self._options = dict(rel_tol=rel_tol, tol=tol, max_iter=max_iter, max_hvps=max_hvps)
        self.estimates = 0
        self.hvps = 0  # products over all estimates
        self.failures = 0
        self.last: CurvatureEstimate | None = None
        self._vector = None  # the last top Ritz vector: where the next sharpness estimate starts

    def lr(self):
        if self.optimizer is None:
            return None
        return float(self.optimizer.param_groups[0]["lr"])

    def estimate(self, kind=FULL) -> CurvatureEstimate:
        """Run one estimate now, whatever the schedule says: ``"full"`` (lambda_max from a
        random start, and the trace) or ``"sharpness"`` (lambda_max alone, from the last top
        eigenvector). ``seconds`` is all the wall time it took, setting up included."""
        if kind not in (FULL, SHARPNESS):
            raise ValueError(f"kind must be {FULL!r} or {SHARPNESS!r}, not {kind!r}")
        t0 = time.perf_counter()
        seed = self.seed * 1_000_003 + self.estimates
        if kind == FULL:
            options = self._options
        else:
            cap = FIRST_SHARPNESS_HVPS if self._vector is None else WARM_MAX_ITER
            options = dict(
                trace=False,
                deflate=False,
                start=self._vector,
                tol=self.sharpness_tol,
                max_iter=min(cap, self._options["max_iter"]),
                max_hvps=self._options["max_hvps"],
            )
        with HessianOperator(
            self.model,
            self.loss_fn,
            self.batch,
            closure=self.closure,
            backend=self.backend,
            seed=seed,
            max_block=PROBE_BLOCK,
        ) as op:
            est, top = _estimate(op, seed=seed, **options)
        if top is not None:
            self._vector = top
        if self.backend == "auto":
            self.backend = est.backend  # measured once; later estimates skip the timing
        est = dataclasses.replace(est, seconds=time.perf_counter() - t0)
        self.estimates += 1
        self.hvps += est.hvps
        self.last = est
        return est

    def __call__(self, step) -> dict[str, float] | None:
        kind = self.schedule.due(step)
        if kind is None:
            return None
        started = self.schedule._clock()
        hvps = None
        try:
            est = self.estimate(kind)
            hvps = est.hvps
            return est.as_series(self.lr())
        except ValueError:
            raise  # misuse (a loss that is not a scalar, ...): say so at once
        except Exception as exc:  # noqa: BLE001 - never raise into the training loop
            self.failures += 1
            _errors.report("curvature", exc)
            return None
        finally:
            self.schedule.ran(step, started, kind, hvps)

    collect = __call__

    @property
    def overhead(self) -> float:
        """Share of the measured wall time spent on curvature so far."""
        return self.schedule.share

    def __repr__(self):
        last = "none" if self.last is None else f"lambda_max={self.last.lambda_max:.4g}, trace={self.last.trace:.4g}"
        return f"CurvatureMonitor(estimates={self.estimates}, overhead={self.overhead:.1%}, {last})"


__all__ = ["CurvatureMonitor", "CurvatureSchedule"]
