"""One curvature estimate on a ``HessianOperator``: Lanczos, then the deflated trace."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ._linalg import (
    LANCZOS_MAX_ITER,
    LANCZOS_TOL,
    MIN_PROBES,
    TRACE_REL_TOL,
    deflated_hutchinson,
    lanczos,
)

#: Default share of training wall time the monitor may spend on curvature (the issue's 5%).
DEFAULT_BUDGET = 0.05
#: Default cap on Hessian-vector products per estimate (Lanczos steps plus trace probes).
MAX_HVPS = 200
#: Deflate the trace estimate with this many Ritz vectors, those of largest |eigenvalue|. On
#: the benchmark MLP the top 6 of 13 removed all the variance the whole Lanczos basis did,
#: and each probe's projection costs two passes over these vectors, not over all m.
DEFLATION_RANK = 8
#: Largest block of probes pushed through one vmapped product; halved on out-of-memory. On a
#: CPU a block is no faster per product than a loop, and checking the stopping rule after
#: each probe saves products, so there the block is one probe.
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
    #: What was estimated: ``"full"`` (Lanczos, then the trace), ``"sharpness"`` (lambda_max
    #: alone, perhaps refined from an earlier top eigenvector) or ``"trace"``.
    kind: str = "full"

    def as_series(self, lr: float | None = None) -> dict[str, float]:
        """The ``hessian/*`` series of this estimate; a quantity it did not estimate is left out."""
        values = {
            "hessian/trace": self.trace,
            "hessian/trace_stderr": self.trace_stderr,
            "hessian/lambda_max": self.lambda_max,
        }
        out = {name: v for name, v in values.items() if not math.isnan(v)}
        out["hessian/hvps"] = float(self.hvps)
        out["hessian/seconds"] = self.seconds
        if lr is not None:
            out["hessian/two_over_lr"] = 2.0 / lr if lr > 0 else math.inf
        return out


def _probe_generator(device, seed):
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


def _estimate(
    op,
    *,
    seed,
    trace=True,
    eig=True,
    rel_tol=TRACE_REL_TOL,
    tol=LANCZOS_TOL,
    max_iter=LANCZOS_MAX_ITER,
    max_hvps=MAX_HVPS,
    deflate=True,
    min_probes=MIN_PROBES,
    block=PROBE_BLOCK,
    start=None,
):
    """One estimate on ``op``; returns ``(CurvatureEstimate, top Ritz vector or None)``.

    ``start``: a flat vector to warm-start Lanczos from (the top vector an earlier estimate
    returned); then lambda_max alone is estimated, stopping as soon as the residual bound is
    within ``tol`` (one product when the vector is still an eigenvector), and ``lambda_min``
    is not reported (a Krylov space of a few vectors says little about it).
    """
    t0 = time.perf_counter()
    warm = start is not None and start.numel() == op.n
    if not warm:
        start = None
    else:
        trace = deflate = False
    gen = _probe_generator(op.device, seed)
    common = dict(generator=gen, device=op.device, dtype=op.dtype)
    lam_max = lam_min = math.nan
    basis, base = None, 0.0
    if eig or deflate:
        res = lanczos(
            op.matvec,
            op.n,
            tol=tol,
            max_iter=min(max_iter, max(1, max_hvps - 2)),
            min_iter=1 if warm else min(3, max_iter),
            # From a warm start the Ritz value barely moves while still off: trust the bound.
            stop_when_steady=not warm,
            keep_basis=deflate and trace,
            start=start,
            **common,
        )
        lam_max, lam_min = res.lambda_max, math.nan if warm else res.lambda_min
        if deflate and trace:
            basis, base = res.deflation(DEFLATION_RANK)
    tr = se = math.nan
    if trace:
        if deflate and res.iterations >= op.n:
            tr, se = res.diagonal_sum, 0.0  # the Krylov space is the whole space: the trace is exact
        else:
            out = deflated_hutchinson(
                op.matvec,
                op.n,
                basis=basis,
                base=base,
                rel_tol=rel_tol,
                min_probes=min_probes,
                max_probes=max(2, max_hvps - op.hvps),
                block=block if op.device.type != "cpu" else 1,
                **common,
            )
            tr, se = out.trace, out.stderr
    name = op._products.name if op._products is not None else op.backend
    kind = "full" if trace and eig else "trace" if trace else "sharpness"
    est = CurvatureEstimate(tr, se, lam_max, lam_min, op.hvps, time.perf_counter() - t0, name, kind)
    return est, (res.top_vector if eig or deflate else None)


def _check_tolerances(rel_tol, tol, max_iter, max_hvps):
    if not (isinstance(rel_tol, (int, float)) and 0 < rel_tol < 1):
        raise ValueError(f"rel_tol must be in (0, 1), e.g. 0.05 for a 5% standard error; got {rel_tol!r}")
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"tol must be in (0, 1), e.g. 1e-3; got {tol!r}")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter must be a positive int; got {max_iter!r}")
    if not (isinstance(max_hvps, int) and max_hvps >= 4):
        raise ValueError(f"max_hvps must be an int >= 4; got {max_hvps!r}")
