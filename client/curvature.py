"""Curvature of the training loss: Hessian trace and sharpness, from Hessian-vector products.

Sharpness says whether the learning rate is past what the loss landscape allows: full-batch
gradient descent is stable only while lambda_max < 2/lr (Cohen et al. 2021, the edge of
stability), and a minimum is linearly stable for SGD only if tr(H) <= 2/lr (Wu & Su 2023).

    from stethoscope.curvature import CurvatureMonitor, estimate_curvature

    est = estimate_curvature(model, loss_fn, (x, y))   # one estimate, now
    print(est.lambda_max, est.trace, "+-", est.trace_stderr)

    curv = CurvatureMonitor(model, loss_fn, batch=(x_fixed, y_fixed), optimizer=opt)
    for step in ...:
        ...training step...
        series = curv(step)    # a dict of hessian/* values when an estimate ran, else None

How (details in ``_curvature_linalg`` and ``_curvature_hvp``): Lanczos with full
reorthogonalisation gives lambda_max (and lambda_min) in typically 8-15 products, where power
iteration needs about twice as many for the same accuracy; its Krylov basis then deflates the
Hutchinson trace estimate, whose Rademacher probes are drawn in vmapped blocks until the
standard error is below ``rel_tol`` of the estimate. Nothing of the training state changes:
parameters, ``.grad``, optimizer, RNG, BatchNorm statistics, train/eval mode.

The curvature is that of the training loss as the training step sees it: BatchNorm layers in
training mode normalise with the batch's statistics (their running statistics are left alone),
and dropout draws one fixed mask per estimate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ._curvature_hvp import HessianOperator
from ._curvature_linalg import (
    LANCZOS_MAX_ITER,
    LANCZOS_TOL,
    MIN_PROBES,
    TRACE_REL_TOL,
    deflated_hutchinson,
    lanczos,
)

__all__ = [
    "CurvatureEstimate",
    "CurvatureMonitor",
    "estimate_curvature",
    "hessian_trace",
    "hvp",
    "lambda_max",
]

#: Default share of training wall time the monitor may spend on curvature (the issue's 5%).
DEFAULT_BUDGET = 0.05
#: Default cap on Hessian-vector products per estimate (Lanczos steps plus trace probes).
MAX_HVPS = 200
#: Largest block of probes pushed through one vmapped product; halved on out-of-memory.
PROBE_BLOCK = 8

SERIES = (
    "hessian/trace",
    "hessian/trace_stderr",
    "hessian/lambda_max",
    "hessian/two_over_lr",
    "hessian/hvps",
    "hessian/seconds",
)


@dataclass(frozen=True)
class CurvatureEstimate:
    """One curvature estimate. ``trace_stderr`` is the standard error of ``trace``; NaN where
    a quantity was not estimated."""

    trace: float
    trace_stderr: float
    lambda_max: float
    lambda_min: float
    hvps: int
    seconds: float
    backend: str

    def as_series(self, lr: float | None = None) -> dict[str, float]:
        out = {
            "hessian/trace": self.trace,
            "hessian/trace_stderr": self.trace_stderr,
            "hessian/lambda_max": self.lambda_max,
            "hessian/hvps": float(self.hvps),
            "hessian/seconds": self.seconds,
        }
        if lr is not None:
            out["hessian/two_over_lr"] = 2.0 / lr if lr > 0 else math.inf
        return out


def _probe_generator(device, seed):
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


def _estimate(op, *, seed, trace=True, eig=True, rel_tol=TRACE_REL_TOL, tol=LANCZOS_TOL,
              max_iter=LANCZOS_MAX_ITER, max_hvps=MAX_HVPS, deflate=True, min_probes=MIN_PROBES,
              block=PROBE_BLOCK):
    t0 = time.perf_counter()
    gen = _probe_generator(op.device, seed)
    common = dict(generator=gen, device=op.device, dtype=op.dtype)
    lam_max = lam_min = math.nan
    basis, base = None, 0.0
    if eig or deflate:
        res = lanczos(op.matvec, op.n, tol=tol, max_iter=min(max_iter, max(1, max_hvps - 2)), **common)
        lam_max, lam_min = res.lambda_max, res.lambda_min
        if deflate:
            basis, base = res.basis, res.diagonal_sum
    tr = se = math.nan
    if trace:
        if basis is not None and basis.shape[0] >= op.n:
            tr, se = base, 0.0  # the Krylov space is the whole space: the trace is exact
        else:
            out = deflated_hutchinson(op.matvec, op.n, basis=basis, base=base, rel_tol=rel_tol,
                                      min_probes=min_probes, max_probes=max(2, max_hvps - op.hvps),
                                      block=block, **common)
            tr, se = out.trace, out.stderr
    name = op._products.name if op._products is not None else op.backend
    return CurvatureEstimate(tr, se, lam_max, lam_min, op.hvps, time.perf_counter() - t0, name)


def estimate_curvature(model, loss_fn=None, batch=None, *, closure=None, rel_tol=TRACE_REL_TOL,
                       tol=LANCZOS_TOL, max_iter=LANCZOS_MAX_ITER, max_hvps=MAX_HVPS, deflate=True,
                       seed=0, backend="auto") -> CurvatureEstimate:
    """Trace (with standard error) and extreme eigenvalues of the Hessian of the loss.

    ``batch=(inputs, targets)`` means the loss ``loss_fn(model(inputs), targets)``; or pass
    ``closure`` returning the scalar loss computed by calling ``model`` (it must not call
    ``backward`` or step anything). ``rel_tol``: target relative standard error of the trace;
    ``tol``: relative tolerance of lambda_max; ``max_hvps`` caps the products; ``deflate=False``
    gives plain Hutchinson. ``backend``: ``"auto"``, ``"func"`` or ``"autograd"``.

        est = estimate_curvature(model, torch.nn.functional.cross_entropy, (x, y))
    """
    _check_tolerances(rel_tol, tol, max_iter, max_hvps)
    with HessianOperator(model, loss_fn, batch, closure=closure, backend=backend, seed=seed,
                         max_block=PROBE_BLOCK) as op:
        return _estimate(op, seed=seed, rel_tol=rel_tol, tol=tol, max_iter=max_iter,
                         max_hvps=max_hvps, deflate=deflate)


def hessian_trace(model, loss_fn=None, batch=None, *, closure=None, rel_tol=TRACE_REL_TOL,
                  max_hvps=MAX_HVPS, deflate=True, seed=0, backend="auto") -> tuple[float, float]:
    """Hutchinson estimate of tr(H) and its standard error, as ``(trace, stderr)``.

        tr, se = hessian_trace(model, loss_fn, (x, y), rel_tol=0.02)
    """
    _check_tolerances(rel_tol, LANCZOS_TOL, LANCZOS_MAX_ITER, max_hvps)
    with HessianOperator(model, loss_fn, batch, closure=closure, backend=backend, seed=seed,
                         max_block=PROBE_BLOCK) as op:
        est = _estimate(op, seed=seed, eig=False, rel_tol=rel_tol, max_hvps=max_hvps, deflate=deflate)
    return est.trace, est.trace_stderr


def lambda_max(model, loss_fn=None, batch=None, *, closure=None, tol=LANCZOS_TOL,
               max_iter=LANCZOS_MAX_ITER, seed=0, backend="auto") -> float:
    """The largest eigenvalue of the Hessian of the loss (the sharpness), by Lanczos.

        sharpness = lambda_max(model, loss_fn, (x, y))
    """
    _check_tolerances(TRACE_REL_TOL, tol, max_iter, MAX_HVPS)
    with HessianOperator(model, loss_fn, batch, closure=closure, backend=backend, seed=seed) as op:
        return _estimate(op, seed=seed, trace=False, tol=tol, max_iter=max_iter, deflate=False).lambda_max


def hvp(model, loss_fn=None, batch=None, vector=None, *, closure=None, backend="auto"):
    """Hessian-vector product(s) ``H v`` of the loss at the current parameters.

    ``vector`` is flat, ``[n]`` or a block ``[k, n]``, ordered like the model's trainable
    ``named_parameters()``; the result has the same shape.

        v = torch.randn(sum(p.numel() for p in model.parameters()))
        hv = hvp(model, loss_fn, (x, y), v)
    """
    if not isinstance(vector, torch.Tensor) or vector.dim() not in (1, 2):
        raise ValueError("vector must be a tensor of shape [n] or [k, n] (n = number of trainable parameters)")
    with HessianOperator(model, loss_fn, batch, closure=closure, backend=backend) as op:
        V = vector.reshape(-1, vector.shape[-1]).to(device=op.device, dtype=op.dtype)
        out = op.matvec(V)
    return out.reshape(vector.shape).to(vector.dtype)


def _check_tolerances(rel_tol, tol, max_iter, max_hvps):
    if not (isinstance(rel_tol, (int, float)) and 0 < rel_tol < 1):
        raise ValueError(f"rel_tol must be in (0, 1), e.g. 0.05 for a 5% standard error; got {rel_tol!r}")
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"tol must be in (0, 1), e.g. 1e-3; got {tol!r}")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter must be a positive int; got {max_iter!r}")
    if not (isinstance(max_hvps, int) and max_hvps >= 4):
        raise ValueError(f"max_hvps must be an int >= 4; got {max_hvps!r}")


from ._curvature_monitor import CurvatureMonitor  # noqa: E402  (uses the functions above)
