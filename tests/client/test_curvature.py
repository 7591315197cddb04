"""Curvature estimates against the exact Hessian of tiny seeded models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import one_thread  # noqa: F401  (an autouse fixture)
from torch import nn
from torch.func import functional_call

from stethoscope.curvature import CurvatureMonitor, estimate_curvature, hessian_trace, hvp, lambda_max
from stethoscope.curvature import _hvp as _curvature_hvp
from stethoscope.curvature._hvp import HessianOperator

BACKENDS = ["func", "autograd"]


def exact_hessian(model, loss_fn, batch):
    """torch.autograd.functional.hessian of the loss over the flat trainable parameters."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    sizes = [p.numel() for _, p in named]
    x, y = batch

    def f(theta):
        params = {n: t.view_as(p) for (n, p), t in zip(named, theta.split(sizes))}
        return loss_fn(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(f, flat)


def mse(out, target):
    # Written out: forward-over-reverse through nn.MSELoss fails in torch 2.13 ("ZeroTensors
    # are immutable"); see test_auto_serves_losses_torch_func_cannot.
    return ((out - target) ** 2).mean()


def regression(seed=0, n=48, d=5, width=10, out=2, dtype=torch.float64):
    """A tanh MLP with an MSE loss: a Hessian with outliers and a bulk, like real ones."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, out)).to(
        dtype
    )
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randn(n, out, generator=g, dtype=dtype)
    return model, mse, (x, y)


def classifier(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)
    g = torch.Generator().manual_seed(seed + 100)
    return (
        model,
        nn.CrossEntropyLoss(),
        (torch.randn(32, 6, generator=g, dtype=dtype), torch.randint(0, 3, (32,), generator=g)),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [regression, classifier])
def test_hvp_matches_the_exact_hessian(make, backend):
    model, loss_fn, batch = make()
    H = exact_hessian(model, loss_fn, batch)
    V = torch.randn(5, H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = hvp(model, loss_fn, batch, V, backend=backend)
    torch.testing.assert_close(got, V @ H, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hvp(model, loss_fn, batch, V[0], backend=backend), H @ V[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [regression, classifier])
def test_lambda_max_within_one_percent(make, backend):
    model, loss_fn, batch = make()
    top = float(torch.linalg.eigvalsh(exact_hessian(model, loss_fn, batch))[-1])
    for seed in range(3):
        got = lambda_max(model, loss_fn, batch, seed=seed, backend=backend)
        assert abs(got - top) <= 0.01 * abs(top), (got, top)


def test_lambda_max_float32_model():
    model, loss_fn, batch = regression(dtype=torch.float32)
    H = exact_hessian(model.double(), loss_fn, tuple(t.double() for t in batch))
    model.float()
    top = float(torch.linalg.eigvalsh(H)[-1])
    got = lambda_max(model, loss_fn, batch)
    assert abs(got - top) <= 0.01 * top


@pytest.mark.parametrize("deflate", [True, False])
def test_trace_within_three_standard_errors(deflate):
    """One estimate per seed; nearly all must land within 3 standard errors of tr(H), and
    the errors, in units of standard errors, must not lean to one side (no bias)."""
    model, loss_fn, batch = regression()
    exact = float(exact_hessian(model, loss_fn, batch).trace())
    zs = []
    for seed in range(24):
        # max_iter=4 keeps the deflation partial, so the random part is really tested.
        est = estimate_curvature(model, loss_fn, batch, seed=seed, rel_tol=0.05, max_iter=4, deflate=deflate)
        assert est.trace_stderr > 0
        zs.append((est.trace - exact) / est.trace_stderr)
    inside = sum(abs(z) <= 3 for z in zs)
    assert inside >= 22, zs
    assert abs(sum(zs) / len(zs)) < 1.0, zs


def test_trace_stops_at_the_target_and_deflation_needs_fewer_probes():
    model, loss_fn, batch = regression()
    exact = float(exact_hessian(model, loss_fn, batch).trace())
    plain, deflated = [], []
    for seed in range(6):
        for target, deflate in ((plain, False), (deflated, True)):
            est = estimate_curvature(model, loss_fn, batch, seed=seed, rel_tol=0.05, max_hvps=400, deflate=deflate)
            assert est.hvps < 400
            assert est.trace_stderr <= 0.05 * abs(est.trace)
            assert abs(est.trace - exact) <= 5 * est.trace_stderr
            target.append(est.hvps)
    assert sum(deflated) < sum(plain), (plain, deflated)


def test_hessian_trace_function_and_a_tiny_exact_case():
    model, loss_fn, batch = regression()
    exact = float(exact_hessian(model, loss_fn, batch).trace())
    tr, se = hessian_trace(model, loss_fn, batch, rel_tol=0.03)
    assert abs(tr - exact) <= 4 * se and se <= 0.03 * abs(tr)
    # A model with fewer parameters than Lanczos steps: the Krylov space is everything.
    torch.manual_seed(0)
    lin = nn.Linear(3, 1).double()
    b = (torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64))
    est = estimate_curvature(lin, mse, b, tol=1e-12)
    H = exact_hessian(lin, mse, b)
    assert est.trace_stderr == 0.0  # the Krylov space is the whole space
    assert est.trace == pytest.approx(float(H.trace()), rel=1e-9)
    assert est.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-9)


def test_closure_gives_the_same_estimate_as_a_batch():
    model, loss_fn, (x, y) = regression()
    a = estimate_curvature(model, loss_fn, (x, y), seed=3)
    b = estimate_curvature(model, closure=lambda: loss_fn(model(x), y), seed=3)
    assert a.trace == pytest.approx(b.trace, rel=1e-12)
    assert a.lambda_max == pytest.approx(b.lambda_max, rel=1e-12)
    H = exact_hessian(model, loss_fn, (x, y))
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(hvp(model, closure=lambda: loss_fn(model(x), y), vector=v), H @ v)


class BNNet(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchnorm_curvature_is_that_of_the_training_loss(backend):
    """In training mode BatchNorm normalises with the batch's statistics; the Hessian must be
    of that loss, and the running statistics must not move."""
    torch.manual_seed(0)
    model = BNNet().double().train()
    batch = (torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64))
    reference = copy.deepcopy(model)
    reference.bn.track_running_stats = False  # batch statistics, nothing recorded
    H = exact_hessian(reference, mse, batch)
    stats = [b.clone() for b in model.buffers()]
    V = torch.randn(3, H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(hvp(model, mse, batch, V, backend=backend), V @ H)
    for before, after in zip(stats, model.buffers()):
        assert torch.equal(before, after)
    assert model.bn.track_running_stats
    # and in eval mode it is the Hessian of the eval-mode loss
    model.eval()
    H_eval = exact_hessian(model, mse, batch)
    assert not torch.allclose(H_eval, H)
    torch.testing.assert_close(hvp(model, mse, batch, V, backend=backend), V @ H_eval)
    assert not model.training


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_gives_one_fixed_symmetric_matrix_per_estimate(backend):
    torch.manual_seed(0)
    model = BNNet(dropout=0.5).double().train()
    batch = (torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64))
    with HessianOperator(model, mse, batch, backend=backend, seed=7) as op:
        eye = torch.eye(op.n, dtype=torch.float64)
        M = torch.cat([op.matvec(eye[i : i + 8]) for i in range(0, op.n, 8)])
        again = op.matvec(eye[:3])
    torch.testing.assert_close(M, M.T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(again, M[:3])
    est = estimate_curvature(model, mse, batch, seed=7, backend=backend)
    assert abs(est.lambda_max - float(torch.linalg.eigvalsh(M)[-1])) <= 0.01 * est.lambda_max
    # the mask really is a dropout mask: not the Hessian of the dropout-free loss
    H_nodrop = exact_hessian(copy.deepcopy(model).eval(), mse, batch)
    assert not torch.allclose(M, H_nodrop, atol=1e-6)


class _NoJvpSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class NoJvpNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 1)

    def forward(self, x):
        return self.b(_NoJvpSquare.apply(self.a(x)))


def test_double_backward_serves_models_torch_func_cannot():
    torch.manual_seed(0)
    model = NoJvpNet().double()
    batch = (torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64))
    H = exact_hessian(model, mse, batch)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="autograd.Function"):
        hvp(model, mse, batch, v, backend="func")
    torch.testing.assert_close(hvp(model, mse, batch, v, backend="auto"), H @ v)
    torch.testing.assert_close(hvp(model, mse, batch, v, backend="autograd"), H @ v)


def test_auto_serves_losses_torch_func_cannot():
    """nn.MSELoss breaks forward-over-reverse in torch 2.13; whatever torch does, "auto" must
    give the right product, and "func" must be right or raise, never be wrong."""
    model, _, batch = regression()
    H = exact_hessian(model, mse, batch)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(hvp(model, nn.MSELoss(), batch, v, backend="auto"), H @ v)
    try:
        got = hvp(model, nn.MSELoss(), batch, v, backend="func")
    except RuntimeError:
        pass
    else:
        torch.testing.assert_close(got, H @ v)


def test_auto_falls_back_to_torch_func_when_double_backward_fails(monkeypatch):
    model, loss_fn, batch = regression()
    H = exact_hessian(model, loss_fn, batch)

    def broken(self, *a, **k):
        raise RuntimeError("double backward not supported by this model")

    monkeypatch.setattr(_curvature_hvp._AutogradProducts, "__init__", broken)
    est = estimate_curvature(model, loss_fn, batch, backend="auto")
    assert est.backend == "func"
    assert abs(est.lambda_max - float(torch.linalg.eigvalsh(H)[-1])) <= 0.01 * est.lambda_max


def test_misuse_raises_value_error_at_once():
    model, loss_fn, batch = regression()
    with pytest.raises(ValueError, match="exactly one"):
        CurvatureMonitor(model, loss_fn)
    with pytest.raises(ValueError, match="exactly one"):
        CurvatureMonitor(model, loss_fn, batch, closure=lambda: 0)
    with pytest.raises(ValueError, match="pair"):
        CurvatureMonitor(model, loss_fn, batch=batch[0])
    with pytest.raises(ValueError, match="budget"):
        CurvatureMonitor(model, loss_fn, batch, budget=1.5)
    with pytest.raises(ValueError, match="every"):
        CurvatureMonitor(model, loss_fn, batch, every=0)
    with pytest.raises(ValueError, match="sharpness_every"):
        CurvatureMonitor(model, loss_fn, batch, sharpness_every=0)
    with pytest.raises(ValueError, match="trace_every"):
        CurvatureMonitor(model, loss_fn, batch, trace_every=2.5)
    with pytest.raises(ValueError, match="do not combine"):
        CurvatureMonitor(model, loss_fn, batch, every=10, trace_every=100)
    with pytest.raises(ValueError, match="do not combine"):
        CurvatureMonitor(model, loss_fn, batch, every=10, budget=0.05)
    with pytest.raises(ValueError, match="sharpness_tol"):
        CurvatureMonitor(model, loss_fn, batch, sharpness_tol=1.0)
    with pytest.raises(ValueError, match="clock"):
        CurvatureMonitor(model, loss_fn, batch, clock=0.0)
    with pytest.raises(ValueError, match="kind"):
        CurvatureMonitor(model, loss_fn, batch).estimate("trace")
    with pytest.raises(ValueError, match="backend"):
        CurvatureMonitor(model, loss_fn, batch, backend="jax")
    with pytest.raises(ValueError, match="rel_tol"):
        estimate_curvature(model, loss_fn, batch, rel_tol=0)
    with pytest.raises(ValueError, match="scalar"):
        estimate_curvature(model, nn.MSELoss(reduction="none"), batch)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        lambda_max(frozen, loss_fn, (torch.randn(3, 2), torch.randn(3, 2)))


def test_monitor_returns_the_series_on_schedule():
    model, loss_fn, batch = regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.04)
    curv = CurvatureMonitor(model, loss_fn, batch=batch, optimizer=opt, every=2)
    out = [curv(step) for step in range(5)]
    assert [o is not None for o in out] == [True, False, True, False, True]
    series = out[0]
    assert set(series) == {
        "hessian/trace",
        "hessian/trace_stderr",
        "hessian/lambda_max",
        "hessian/two_over_lr",
        "hessian/hvps",
        "hessian/seconds",
    }
    assert series["hessian/two_over_lr"] == 2 / 0.04
    assert series["hessian/hvps"] >= 5 and series["hessian/seconds"] > 0
    top = float(torch.linalg.eigvalsh(exact_hessian(model, loss_fn, batch))[-1])
    assert abs(series["hessian/lambda_max"] - top) <= 0.01 * top
    assert curv.estimates == 3 and curv.failures == 0
    assert "two_over_lr" not in str(set(CurvatureMonitor(model, loss_fn, batch=batch)(0)))


def test_an_internal_failure_is_reported_not_raised(internal_errors, monkeypatch):
    model, loss_fn, batch = regression()
    curv = CurvatureMonitor(model, loss_fn, batch=batch, every=1)

    def boom(*a, **k):
        raise RuntimeError("bug")

    monkeypatch.setattr("stethoscope.curvature._monitor._estimate", boom)
    assert curv(0) is None
    assert curv.failures == 1
    assert [w for w, _ in internal_errors] == ["curvature"]
    internal_errors.clear()
    assert not math.isnan(curv.schedule.curvature_seconds)


def test_sharpness_estimates_refine_the_last_top_vector():
    """Without training in between, each warm-started estimate continues Lanczos from the
    last top Ritz vector: a few products each, converging on the exact lambda_max, and no
    trace in the series (it was not estimated)."""
    model, loss_fn, batch = regression()
    top = float(torch.linalg.eigvalsh(exact_hessian(model, loss_fn, batch))[-1])
    opt = torch.optim.SGD(model.parameters(), lr=0.04)
    curv = CurvatureMonitor(model, loss_fn, batch=batch, optimizer=opt)
    ests = [curv.estimate("sharpness") for _ in range(5)]
    assert [e.kind for e in ests] == ["sharpness"] * 5
    assert ests[0].hvps == 4 and all(1 <= e.hvps <= 3 for e in ests[1:]), [e.hvps for e in ests]
    errors = [(top - e.lambda_max) / top for e in ests]
    assert all(err >= -1e-9 for err in errors)  # Ritz values: lower bounds
    assert errors[-1] <= 0.01 and errors[-1] < errors[0], errors
    assert math.isnan(ests[-1].lambda_min) and math.isnan(ests[-1].trace)
    assert set(ests[-1].as_series(0.04)) == {
        "hessian/lambda_max",
        "hessian/two_over_lr",
        "hessian/hvps",
        "hessian/seconds",
    }
    # a full estimate starts afresh and leaves its top vector for the next warm one
    full = curv.estimate()
    assert full.kind == "full" and abs(full.lambda_max - top) <= 0.01 * top
    assert curv.estimate("sharpness").hvps <= 2


# -- the linear algebra alone, on explicit matrices ------------------------------------------
def test_lanczos_from_a_warm_start():
    from stethoscope.curvature._linalg import lanczos

    g = torch.Generator().manual_seed(0)
    n = 200
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    evals = torch.cat([torch.tensor([10.0, 9.0, 7.0], dtype=torch.float64), torch.rand(n - 3, generator=g) * 3])
    A = U @ torch.diag(evals) @ U.T

    def run(start, **kw):
        return lanczos(lambda V: V @ A, n, generator=g, device="cpu", dtype=torch.float64, start=start, **kw)

    cold = run(None, tol=1e-4)
    assert cold.lambda_max == pytest.approx(10.0, rel=1e-4)
    assert cold.top_vector.norm() == pytest.approx(1.0) and abs(float(cold.top_vector @ U[:, 0])) > 0.999
    # from the top eigenvector itself the residual is nil: one product
    exact = run(U[:, 0] * 3.0, tol=1e-4, min_iter=1, stop_when_steady=False)
    assert exact.iterations == 1 and exact.lambda_max == pytest.approx(10.0, rel=1e-12)
    # from a nearby vector (the top direction has turned a little), a few
    near = U[:, 0] + 0.05 * U[:, 1] + 0.02 * torch.randn(n, generator=g, dtype=torch.float64) / math.sqrt(n)
    warm = run(near, tol=1e-4, min_iter=1, stop_when_steady=False)
    assert warm.lambda_max == pytest.approx(10.0, rel=1e-4) and warm.iterations < cold.iterations
    # a start vector of the wrong size or not finite is ignored: a random start
    assert run(torch.ones(n + 1), tol=1e-4).lambda_max == pytest.approx(10.0, rel=1e-4)
    assert run(torch.full((n,), math.nan), tol=1e-4).lambda_max == pytest.approx(10.0, rel=1e-4)


def test_lanczos_and_deflated_trace_on_an_explicit_matrix():
    from stethoscope.curvature._linalg import deflated_hutchinson, lanczos

    g = torch.Generator().manual_seed(0)
    n = 300
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    # a few outliers (one negative) over a bulk, like a network's Hessian
    evals = torch.cat(
        [
            torch.tensor([50.0, 20.0, 10.0, -8.0], dtype=torch.float64),
            torch.rand(n - 4, generator=g, dtype=torch.float64),
        ]
    )
    A = U @ torch.diag(evals) @ U.T
    res = lanczos(lambda V: V @ A, n, generator=g, device="cpu", dtype=torch.float64, tol=1e-8)
    assert res.lambda_max == pytest.approx(50.0, rel=1e-6)
    assert res.lambda_min == pytest.approx(-8.0, rel=1e-4)
    Q = res.basis
    torch.testing.assert_close(Q @ Q.T, torch.eye(res.iterations, dtype=torch.float64), atol=1e-10, rtol=0)
    assert res.diagonal_sum == pytest.approx(float(torch.trace(Q @ A @ Q.T)), rel=1e-10)
    zs = []
    for seed in range(20):
        g.manual_seed(seed)
        out = deflated_hutchinson(
            lambda V: V @ A,
            n,
            generator=g,
            device="cpu",
            dtype=torch.float64,
            basis=Q,
            base=res.diagonal_sum,
            rel_tol=0.01,
            block=4,
        )
        assert out.probes % 4 == 1  # min_probes 5, then blocks of 4
        zs.append((out.trace - float(evals.sum())) / out.stderr)
    assert sum(abs(z) <= 3 for z in zs) >= 18, zs


def test_batched_double_backward_block_matches_the_exact_hessian():
    """The vmapped double-backward block is what accelerators use; on a CPU it is off by
    default, so switch it on here to test it."""
    model, loss_fn, batch = classifier()
    H = exact_hessian(model, loss_fn, batch)
    V = torch.randn(6, H.shape[0], dtype=torch.float64)
    with HessianOperator(model, loss_fn, batch, backend="autograd") as op:
        op.matvec(V[:1])
        op._products._batched = True
        got = op.matvec(V)
        assert op._products._batched  # no fallback to the loop happened
    torch.testing.assert_close(got, V @ H)
