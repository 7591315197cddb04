"""Lanczos for the top eigenvalue and a deflated Hutchinson estimate of the trace.

Both work on any symmetric operator given as ``matvec(V) -> H V`` for a ``[k, n]`` block.

The trace estimate reuses the Lanczos basis (the Krylov-space sketch of Hutch++, Meyer et al.
2021; Chen & Hallman 2023 for the Krylov variant): with ``Q`` the ``m`` orthonormal Lanczos
vectors,

    tr(H) = tr(Q^T H Q) + tr(P H P),   P = I - Q Q^T.

The first term is the sum of the Lanczos diagonal, known exactly; the second is estimated with
Rademacher probes projected by ``P``, which is unbiased (E[P v v^T P] = P) and has lower
variance than plain Hutchinson because the extreme eigendirections that dominate
sum_{i != j} H_ij^2 are removed. The projected probes are drawn until the standard error of
the mean falls below a target share of the estimate, or a cap on products is reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Default relative tolerance on lambda_max: Lanczos stops when the top Ritz value moved by
#: less than this share over each of the last two steps, or its residual bound is below it.
#: PyHessian's power iteration uses the same 1e-3 on successive estimates.
LANCZOS_TOL = 1e-3
#: Default cap on Lanczos steps. On the 1M-parameter benchmark MLP and the test models the
#: top Ritz value settles in 8-15 steps.
LANCZOS_MAX_ITER = 30
#: Default target for the relative standard error of the trace (5%, the issue's target).
TRACE_REL_TOL = 0.05
#: A standard error needs a few samples to mean anything: with fewer than this many probes,
#: the sample standard deviation is too noisy to stop on.
MIN_PROBES = 5


def rademacher(k, n, generator, device, dtype):
    # 31 random bits per int32 draw (randint's high is exclusive, so 0..2^31-1 is exactly
    # uniform): on a CPU 2x faster than one randint per entry and 4x faster than bernoulli_,
    # which matters at a few ms per million parameters per probe.
    words = -(-(k * n) // 31)
    bits = torch.randint(0, 2**31, (words, 1), generator=generator, device=device, dtype=torch.int32)
    bits = (bits >> torch.arange(31, device=device, dtype=torch.int32)) & 1
    return bits.reshape(-1)[: k * n].reshape(k, n).to(dtype).mul_(2).sub_(1)


@dataclass
class LanczosResult:
    lambda_max: float
    lambda_min: float
    basis: torch.Tensor  # [m, n] orthonormal rows
    diagonal_sum: float  # tr(Q^T H Q)
    iterations: int
    ritz_values: torch.Tensor  # [m] eigenvalues of T = Q^T H Q, ascending (float64, CPU)
    ritz_vectors: torch.Tensor  # [m, m] their eigenvectors in the basis Q (columns)
    top_vector: torch.Tensor  # [n] the Ritz vector of lambda_max, unit norm: the next warm start

    def deflation(self, rank):
        """The ``rank`` Ritz vectors of largest |value| (``[rank, n]``, orthonormal rows) and
        the sum of their Ritz values, which is exactly tr(Y^T H Y) since Q^T H Q = T."""
        order = torch.argsort(self.ritz_values.abs(), descending=True)[:rank]
        S = self.ritz_vectors[:, order].to(device=self.basis.device, dtype=self.basis.dtype)
        return S.T @ self.basis, float(self.ritz_values[order].sum())


def _ritz(alphas, betas):
    m = len(alphas)
    T = torch.zeros(m, m, dtype=torch.float64)
    T[range(m), range(m)] = torch.tensor(alphas, dtype=torch.float64)
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        T[range(m - 1), range(1, m)] = off
        T[range(1, m), range(m - 1)] = off
    return torch.linalg.eigh(T)


def lanczos(
    matvec,
    n,
    *,
    generator,
    device,
    dtype,
    tol=LANCZOS_TOL,
    max_iter=LANCZOS_MAX_ITER,
    min_iter=3,
    keep_basis=True,
    start=None,
    stop_when_steady=True,
):
    """Lanczos with full reorthogonalisation from ``start`` (a flat vector, such as the
    ``top_vector`` of an earlier run: a warm start) or else a normalised Rademacher vector.

    From a warm start that is still close to the top eigenvector the residual bound is small
    after one or two products, so with ``min_iter=1`` the run stops there.

    Memory: the basis, one vector per step (``max_iter * n`` numbers at most); lower
    ``max_iter`` for a model whose parameters barely fit.
    """
    max_iter = max(1, min(int(max_iter), n))
    # The basis grows by doubling: memory follows the steps taken, not max_iter, and the
    # reorthogonalisation stays two matrix-vector products over one contiguous block.
    Q = torch.empty(min(max_iter, 8), n, device=device, dtype=dtype)
    norm = 0.0
    if start is not None:
        start = start.reshape(-1).to(device=device, dtype=dtype)
        norm = float(torch.linalg.vector_norm(start)) if start.numel() == n else 0.0
    if math.isfinite(norm) and norm > 0:
        torch.div(start, norm, out=Q[0])
    else:
        Q[0] = rademacher(1, n, generator, device, dtype)[0] / math.sqrt(n)
    alphas, betas, thetas = [], [], []
    lam_max = lam_min = 0.0
    m = 0
    for j in range(max_iter):
        m = j + 1
        q = Q[j]
        w = matvec(q[None])[0]
        # In place throughout: on a CPU each fresh n-sized temporary costs page faults
        # comparable to the arithmetic itself.
        alpha = float(torch.dot(q, w))
        alphas.append(alpha)
        w.sub_(q, alpha=alpha)
        if j:
            w.sub_(Q[j - 1], alpha=betas[-1])
        # Full reorthogonalisation keeps the basis orthonormal to working precision, which the
        # deflated trace relies on: one classical Gram-Schmidt pass against the whole basis,
        # repeated only when it removed much ("twice is enough", Giraud et al. 2005, with the
        # 1/sqrt(2) test of Daniel et al. 1976). After the three-term step a second pass is
        # rarely needed, and each pass reads the whole basis, the main cost besides products.
        basis = Q[:m]
        norm = float(torch.linalg.vector_norm(w))
        for _ in range(2):
            w.addmv_(basis.T, torch.mv(basis, w), alpha=-1)
            before, norm = norm, float(torch.linalg.vector_norm(w))
            if norm > 0.7071 * before:
                break
        beta = norm
        evals, evecs = _ritz(alphas, betas)
        lam_max, lam_min = float(evals[-1]), float(evals[0])
        thetas.append(lam_max)
        scale = max(abs(lam_max), abs(lam_min), 1e-30)
        if beta <= 100 * torch.finfo(dtype).eps * scale:
            break  # invariant subspace: these Ritz values are eigenvalues
        if m >= min_iter:
            bound = beta * abs(float(evecs[-1, -1]))  # |theta - lambda| <= bound for some eigenvalue
            steady = (
                stop_when_steady
                and len(thetas) >= 3
                and all(abs(thetas[-i] - thetas[-i - 1]) <= tol * max(abs(lam_max), 1e-30) for i in (1, 2))
            )
            if bound <= tol * max(abs(lam_max), 1e-30) or steady:
                break
        if m == max_iter:
            break
        if m == Q.shape[0]:
            grown = torch.empty(min(2 * m, max_iter), n, device=device, dtype=dtype)
            grown[:m] = Q
            Q = grown
        betas.append(beta)
        torch.div(w, beta, out=Q[m])
    top = evecs[:, -1].to(device=device, dtype=dtype) @ Q[:m]
    return LanczosResult(lam_max, lam_min, Q[:m] if keep_basis else None, float(sum(alphas)), m, evals, evecs, top)


@dataclass
class TraceResult:
    trace: float
    stderr: float
    probes: int


def deflated_hutchinson(
    matvec,
    n,
    *,
    generator,
    device,
    dtype,
    basis=None,
    base=0.0,
    rel_tol=TRACE_REL_TOL,
    abs_tol=0.0,
    min_probes=MIN_PROBES,
    max_probes=100,
    block=8,
):
    """``base + tr(P H P)`` with probes drawn in blocks until the standard error is small."""
    samples = []
    max_probes = max(2, int(max_probes))
    min_probes = max(2, min(int(min_probes), max_probes))
    mean = se = 0.0
    while len(samples) < max_probes:
        want = min_probes - len(samples) if len(samples) < min_probes else block
        k = max(1, min(want, block, max_probes - len(samples)))
        V = rademacher(k, n, generator, device, dtype)
        if basis is not None and basis.shape[0]:
            V.addmm_(V @ basis.T, basis, alpha=-1)  # P v = v - Q (Q^T v), in place
        HV = matvec(V)
        samples.extend(torch.bmm(V.unsqueeze(1), HV.unsqueeze(2)).reshape(-1).double().tolist())
        if len(samples) >= min_probes:
            s = torch.tensor(samples, dtype=torch.float64)
            mean, se = float(s.mean()), float(s.std() / math.sqrt(len(samples)))
            if se <= max(rel_tol * abs(base + mean), abs_tol):
                break
    return TraceResult(base + mean, se, len(samples))
