"""Curvature inside real (tiny) trainings: it never disturbs them, it sees the edge of
stability, and it reaches the server's series through the hook."""

from __future__ import annotations

import pytest
import torch
from helpers import one_thread, spooled_points  # noqa: F401  (one_thread: an autouse fixture)
from torch import nn

import stethoscope
from stethoscope.curvature import CurvatureMonitor, estimate_curvature


class Net(nn.Module):
    """BatchNorm (running statistics), dropout (RNG) and a frozen layer: everything an
    estimate could disturb."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(6, 6).requires_grad_(False)
        self.fc1 = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(self.frozen(x))))))


def run(curvature, backend="auto", steps=4):
    """Train with the global RNG in play (data, dropout); return everything training owns."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)
    loss_fn = nn.CrossEntropyLoss()
    fixed = (torch.randn(24, 6), torch.randint(0, 3, (24,)))
    # few products: this test is about what an estimate leaves behind, not its accuracy
    cheap = dict(every=1, backend=backend, max_hvps=8, max_iter=4)
    curv = CurvatureMonitor(model, loss_fn, batch=fixed, optimizer=opt, **cheap)
    closure_curv = CurvatureMonitor(model, closure=lambda: loss_fn(model(fixed[0]), fixed[1]), **cheap)
    for step in range(steps):
        x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        if curvature:
            # between backward and step: .grad is live and must come through untouched
            assert curv(step) is not None and closure_curv(step) is not None
        opt.step()
        sched.step()
        if curvature:
            estimate_curvature(model, loss_fn, fixed, seed=step, backend=backend, max_hvps=8, max_iter=4)
        if step == steps // 2:
            model.eval()  # the mode must survive an estimate too
            if curvature:
                curv.estimate()
            model.train()
    assert curv.failures == 0 and closure_curv.failures == 0
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "opt": opt.state_dict(),
        "sched": sched.state_dict(),
        "modes": [m.training for m in model.modules()],
        "track": [getattr(m, "track_running_stats", None) for m in model.modules()],
        "rng": torch.get_rng_state(),
        "next_draw": torch.randn(5),
    }


@pytest.mark.parametrize("backend", ["func", "autograd"])
def test_training_is_bit_for_bit_the_same_with_and_without_curvature(backend):
    plain, watched = run(False), run(True, backend)
    for a, b in zip(plain["params"], watched["params"]):
        assert torch.equal(a, b)
    for a, b in zip(plain["grads"], watched["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert plain["buffers"].keys() == watched["buffers"].keys()
    for name in plain["buffers"]:
        assert torch.equal(plain["buffers"][name], watched["buffers"][name]), name
    assert plain["opt"]["param_groups"] == watched["opt"]["param_groups"]
    for i, state in plain["opt"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, watched["opt"]["state"][i][key]), (i, key)
    assert plain["sched"] == watched["sched"]
    assert plain["modes"] == watched["modes"] and plain["track"] == watched["track"]
    assert torch.equal(plain["rng"], watched["rng"])
    assert torch.equal(plain["next_draw"], watched["next_draw"])


# -- progressive sharpening ------------------------------------------------------------
LR = 0.05


def test_full_batch_gd_sharpens_to_two_over_lr():
    """Cohen et al. 2021: under full-batch gradient descent lambda_max rises until it reaches
    2/lr and then hovers there (the edge of stability), while the loss keeps falling. A
    tanh MLP on 64 random regression targets shows it in a few hundred steps."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 10, generator=g), torch.randn(64, 1, generator=g)
    model = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    loss_fn = lambda out, target: ((out - target) ** 2).mean()  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    # only lambda_max matters here: a loose trace keeps the test fast
    curv = CurvatureMonitor(model, loss_fn, batch=(x, y), optimizer=opt, every=25, rel_tol=0.2, max_hvps=30)
    sharpness, losses = {}, []
    for step in range(700):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        series = curv(step)
        if series is not None:
            assert series["hessian/two_over_lr"] == pytest.approx(2 / LR)
            sharpness[step] = series["hessian/lambda_max"] / series["hessian/two_over_lr"]
    steps = sorted(sharpness)
    ratio = [sharpness[s] for s in steps]
    assert len(ratio) == 28
    assert ratio[0] < 0.3, ratio  # starts far below the edge
    first_edge = next(i for i, r in enumerate(ratio) if r >= 0.9)
    assert 0 < first_edge < 20, ratio  # sharpens to the edge ...
    assert all(0.85 <= r <= 1.3 for r in ratio[first_edge + 4 :]), ratio  # ... and stays there
    assert ratio[-1] == pytest.approx(1.0, abs=0.05)
    assert losses[-1] < 0.05 * losses[0]


# -- through the hook ------------------------------------------------------------------


def test_watch_curvature_sends_the_series_offline(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    fixed = (torch.randn(32, 5), torch.randint(0, 3, (32,)))
    mon = stethoscope.attach(model, opt, server="offline", spool_dir=tmp_path)
    curv = mon.watch_curvature(model, loss_fn, batch=fixed, every=2)
    exact = {}
    for step in range(6):
        x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        mon.log(step=step, loss=loss)
        flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
        sizes = [p.numel() for p in model.parameters()]
        names = [n for n, _ in model.named_parameters()]

        def f(theta, names=names, sizes=sizes):
            params = {n: t.view(p.shape) for n, t, p in zip(names, theta.split(sizes), model.parameters())}
            return loss_fn(torch.func.functional_call(model, params, (fixed[0].double(),)), fixed[1])

        H = torch.autograd.functional.hessian(f, flat)
        exact[step] = float(torch.linalg.eigvalsh(H)[-1])
    mon.close()
    got = spooled_points(tmp_path)
    for name in (
        "hessian/trace",
        "hessian/trace_stderr",
        "hessian/lambda_max",
        "hessian/two_over_lr",
        "hessian/hvps",
        "hessian/seconds",
    ):
        assert sorted(got[name]) == [0, 2, 4], name
    for step in (0, 2, 4):
        assert got["hessian/lambda_max"][step] == pytest.approx(exact[step], rel=0.01)
        assert got["hessian/two_over_lr"][step] == pytest.approx(20.0)
        assert got["hessian/hvps"][step] >= 5
    assert curv.estimates == 3 and mon.collector_errors == 0


def test_watch_curvature_is_a_no_op_when_disabled(monkeypatch, tmp_path):
    monkeypatch.setenv("STETHOSCOPE_DISABLED", "1")
    model = nn.Linear(3, 1)
    mon = stethoscope.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), server="offline", spool_dir=tmp_path)
    assert mon.watch_curvature(model, nn.MSELoss(), batch=(torch.randn(4, 3), torch.randn(4, 1))) is None
