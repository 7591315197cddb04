"""``CurvatureMonitor``: curvature estimates on a schedule, as a collector for the hook."""

from __future__ import annotations

import dataclasses
import time

from .. import _errors
from ._estimate import (
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
from ._schedule import FULL, SHARPNESS, CurvatureSchedule

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


class CurvatureMonitor:
    """Hessian trace and sharpness of the training loss, on a schedule, as series.

    Call it once per training step (or register it with ``mon.add_collector``); it returns
    the ``hessian/*`` series when it ran an estimate and ``None`` otherwise. The loss is
    ``loss_fn(model(inputs), targets)`` on a fixed ``batch=(inputs, targets)``, or
    ``closure()``.

    By default it keeps the wall time charged to curvature within ``budget`` (5%) of all the
    wall time measured between calls, and within that estimates lambda_max every
    ``sharpness_every`` (50) steps and the trace every ``trace_every`` (200) steps, later when
    the budget is short (see ``CurvatureSchedule``). An estimate is charged its own wall time
    and the slowdown of the calls after it; the first one (a cold start) is charged but not
    paid back. Near the edge of stability (lambda_max at 75% of 2/lr, or its trend pointing
    there) lambda_max is estimated sooner, on an overdraft of at most six estimates, repaid
    once the crossing is seen; ``watch_edge=False`` turns that off. What it really costs a
    run, measured against the same run without it, is in the README
    (``benchmarks/curvature_cost.py``).

    A lambda_max estimate is a few Lanczos steps restarted from the last top eigenvector (2
    products on average on the tests' GD MLP), stopped when the residual bound is within
    ``sharpness_tol`` (3%) of the value; it sends no trace. The first estimate starts from a
    random vector; so does each full one, which also finds a top direction that a warm start
    could miss. ``every=N`` runs a full estimate every N steps. The monitor keeps one extra
    copy of the parameters: the top eigenvector.

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
        watch_edge=True,
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
            every, budget, clock, sharpness_every=sharpness_every, trace_every=trace_every, watch_edge=watch_edge
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
        hvps = lam = bound = None
        try:
            est = self.estimate(kind)
            series = est.as_series(self.lr())
            hvps, lam, bound = est.hvps, est.lambda_max, series.get("hessian/two_over_lr")
            return series
        except ValueError:
            raise  # misuse (a loss that is not a scalar, ...): say so at once
        except Exception as exc:  # noqa: BLE001 - never raise into the training loop
            self.failures += 1
            _errors.report("curvature", exc)
            return None
        finally:
            # from the clock reading ``due`` took: all the monitor's time on this call is charged
            self.schedule.ran(step, None, kind, hvps, lambda_max=lam, two_over_lr=bound)

    collect = __call__

    @property
    def overhead(self) -> float:
        """Share of the measured wall time spent on curvature so far."""
        return self.schedule.share

    def __repr__(self):
        last = "none" if self.last is None else f"lambda_max={self.last.lambda_max:.4g}, trace={self.last.trace:.4g}"
        return f"CurvatureMonitor(estimates={self.estimates}, overhead={self.overhead:.1%}, {last})"


__all__ = ["CurvatureMonitor", "CurvatureSchedule"]
