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

How (details in ``_linalg`` and ``_hvp``): Lanczos with full
reorthogonalisation gives lambda_max (and lambda_min) in typically 8-15 products, where power
iteration stopped at the same 1e-3 tolerance needs 15-40 and is ~100x less accurate (on the
benchmark MLP it needs 57-77 to be as accurate); its Krylov basis then deflates the
Hutchinson trace estimate, whose Rademacher probes are drawn in vmapped blocks until the
standard error is below ``rel_tol`` of the estimate. The monitor refines lambda_max from the
last top eigenvector (restarted Lanczos: 2-3 products instead of 8-15 from a random vector)
every 50 steps and runs the trace every 200 steps, each later when the time budget is short,
and lambda_max sooner when it nears or trends toward 2/lr (``CurvatureSchedule``). Nothing of
the training state changes: parameters, ``.grad``, optimizer, RNG, BatchNorm statistics,
train/eval mode.

The curvature is that of the training loss as the training step sees it: BatchNorm layers in
training mode normalise with the batch's statistics (their running statistics are left alone),
and dropout draws one fixed mask per estimate.

Limits: pass the bare module, not a ``DistributedDataParallel`` wrapper (its forward would
synchronise gradients); with ``SyncBatchNorm`` every rank must run the estimate, since the
forward pass communicates. The Lanczos basis holds up to ``max_iter`` copies of the
parameters (30 by default); lower it for a model that barely fits. ``"auto"`` picks the
double-backward products on a CPU (measured faster there) and times both on an accelerator.
"""

from __future__ import annotations

import torch

from ._estimate import (
    DEFAULT_BUDGET,  # noqa: F401  (re-exported: the default share of training time)
    LANCZOS_MAX_ITER,
    LANCZOS_TOL,
    MAX_HVPS,
    PROBE_BLOCK,
    SERIES,  # noqa: F401  (re-exported: the names of the series sent)
    TRACE_REL_TOL,
    CurvatureEstimate,
    _check_tolerances,
    _estimate,
)
from ._hvp import HessianOperator
from ._monitor import CurvatureMonitor

__all__ = [
    "CurvatureEstimate",
    "CurvatureMonitor",
    "estimate_curvature",
    "hessian_trace",
    "hvp",
    "lambda_max",
]


def estimate_curvature(
    model,
    loss_fn=None,
    batch=None,
    *,
    closure=None,
    rel_tol=TRACE_REL_TOL,
    tol=LANCZOS_TOL,
    max_iter=LANCZOS_MAX_ITER,
    max_hvps=MAX_HVPS,
    deflate=True,
    seed=0,
    backend="auto",
) -> CurvatureEstimate:
    """Trace (with standard error) and extreme eigenvalues of the Hessian of the loss.

    ``batch=(inputs, targets)`` means the loss ``loss_fn(model(inputs), targets)``; or pass
    ``closure`` returning the scalar loss computed by calling ``model`` (it must not call
    ``backward`` or step anything). ``rel_tol``: target relative standard error of the trace;
    ``tol``: relative tolerance of lambda_max; ``max_hvps`` caps the products; ``deflate=False``
    gives plain Hutchinson. ``backend``: ``"auto"``, ``"func"`` or ``"autograd"``.

        est = estimate_curvature(model, torch.nn.functional.cross_entropy, (x, y))
    """
    _check_tolerances(rel_tol, tol, max_iter, max_hvps)
    with HessianOperator(
        model, loss_fn, batch, closure=closure, backend=backend, seed=seed, max_block=PROBE_BLOCK
    ) as op:
        return _estimate(
            op, seed=seed, rel_tol=rel_tol, tol=tol, max_iter=max_iter, max_hvps=max_hvps, deflate=deflate
        )[0]


def hessian_trace(
    model,
    loss_fn=None,
    batch=None,
    *,
    closure=None,
    rel_tol=TRACE_REL_TOL,
    max_hvps=MAX_HVPS,
    deflate=True,
    seed=0,
    backend="auto",
) -> tuple[float, float]:
    """Hutchinson estimate of tr(H) and its standard error, as ``(trace, stderr)``.

    tr, se = hessian_trace(model, loss_fn, (x, y), rel_tol=0.02)
    """
    _check_tolerances(rel_tol, LANCZOS_TOL, LANCZOS_MAX_ITER, max_hvps)
    with HessianOperator(
        model, loss_fn, batch, closure=closure, backend=backend, seed=seed, max_block=PROBE_BLOCK
    ) as op:
        est, _ = _estimate(op, seed=seed, eig=False, rel_tol=rel_tol, max_hvps=max_hvps, deflate=deflate)
    return est.trace, est.trace_stderr


def lambda_max(
    model, loss_fn=None, batch=None, *, closure=None, tol=LANCZOS_TOL, max_iter=LANCZOS_MAX_ITER, seed=0, backend="auto"
) -> float:
    """The largest eigenvalue of the Hessian of the loss (the sharpness), by Lanczos.

    sharpness = lambda_max(model, loss_fn, (x, y))
    """
    _check_tolerances(TRACE_REL_TOL, tol, max_iter, MAX_HVPS)
    with HessianOperator(model, loss_fn, batch, closure=closure, backend=backend, seed=seed) as op:
        return _estimate(op, seed=seed, trace=False, tol=tol, max_iter=max_iter, deflate=False)[0].lambda_max


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
