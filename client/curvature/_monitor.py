"""``CurvatureMonitor``: curvature estimates on a schedule, as a collector for the hook."""

from __future__ import annotations

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


class CurvatureSchedule:
    """When to run: every ``every`` steps, or whenever the time spent on curvature stays
    within ``budget`` of all the time measured, training included.

    Training time is the wall time between consecutive calls, minus what the estimates
    themselves took; an estimate runs on a call when, with a cost predicted by the last one,
    curvature time <= budget * total time. The first call runs one estimate (its cost is not
    known before), so the share is above the budget at first and is paid back after it.
    """

    def __init__(self, every=None, budget=DEFAULT_BUDGET, clock=time.perf_counter):
        if every is not None and not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be a positive int (steps between estimates) or None; got {every!r}")
        if not (isinstance(budget, (int, float)) and 0 < budget < 1):
            raise ValueError(f"budget must be a share of training time in (0, 1), e.g. 0.05; got {budget!r}")
        self.every = every
        self.budget = float(budget)
        self._clock = clock
        self.train_seconds = 0.0
        self.curvature_seconds = 0.0
        self._last_cost = None
        self._last_step = None
        self._last_end = None

    def due(self, step):
        """Called once per collector call, before any estimate."""
        now = self._clock()
        if self._last_end is not None:
            self.train_seconds += max(0.0, now - self._last_end)
        self._last_end = now
        if self._last_step is None:
            return True
        if self.every is not None:
            return step - self._last_step >= self.every
        cost = self._last_cost
        spent = self.curvature_seconds + cost
        return spent <= self.budget * (self.train_seconds + spent)

    def ran(self, step, started):
        """Record an estimate that began at ``started`` (a clock reading) and just ended."""
        now = self._clock()
        cost = max(0.0, now - started)
        self.curvature_seconds += cost
        self._last_cost = cost
        self._last_step = step
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
    ``closure()``. ``every=N`` runs every N steps; by default it keeps within ``budget``
    (5%) of the training wall time, measured between calls. ``hessian/two_over_lr`` comes
    from the first parameter group of ``optimizer`` (for SGD and full-batch GD the edge of
    stability is lambda_max = 2/lr; for Adam the threshold concerns the preconditioned
    Hessian, Cohen et al. 2022, so compare with care).

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
        budget=DEFAULT_BUDGET,
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
        self.schedule = CurvatureSchedule(every, budget, clock)
        # Validates model, loss_fn and backend now, not on the first training step.
        HessianOperator(model, loss_fn, batch, closure=closure, backend=backend)
        self.model, self.loss_fn, self.batch, self.closure = model, loss_fn, batch, closure
        self.optimizer = optimizer
        self.backend = backend
        self.seed = int(seed)
        self._options = dict(rel_tol=rel_tol, tol=tol, max_iter=max_iter, max_hvps=max_hvps)
        self.estimates = 0
        self.failures = 0
        self.last: CurvatureEstimate | None = None

    def lr(self):
        if self.optimizer is None:
            return None
        return float(self.optimizer.param_groups[0]["lr"])

    def estimate(self) -> CurvatureEstimate:
        """Run one estimate now, whatever the schedule says."""
        seed = self.seed * 1_000_003 + self.estimates
        with HessianOperator(
            self.model,
            self.loss_fn,
            self.batch,
            closure=self.closure,
            backend=self.backend,
            seed=seed,
            max_block=PROBE_BLOCK,
        ) as op:
            est = _estimate(op, seed=seed, **self._options)
        if self.backend == "auto":
            self.backend = est.backend  # measured once; later estimates skip the timing
        self.estimates += 1
        self.last = est
        return est

    def __call__(self, step) -> dict[str, float] | None:
        if not self.schedule.due(step):
            return None
        started = self.schedule._clock()
        try:
            est = self.estimate()
            return est.as_series(self.lr())
        except ValueError:
            raise  # misuse (a loss that is not a scalar, ...): say so at once
        except Exception as exc:  # noqa: BLE001 - never raise into the training loop
            self.failures += 1
            _errors.report("curvature", exc)
            return None
        finally:
            self.schedule.ran(step, started)

    collect = __call__

    @property
    def overhead(self) -> float:
        """Share of the measured wall time spent on curvature so far."""
        return self.schedule.share

    def __repr__(self):
        last = "none" if self.last is None else f"lambda_max={self.last.lambda_max:.4g}, trace={self.last.trace:.4g}"
        return f"CurvatureMonitor(estimates={self.estimates}, overhead={self.overhead:.1%}, {last})"


__all__ = ["CurvatureMonitor", "CurvatureSchedule"]
