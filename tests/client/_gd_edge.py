"""Full-batch GD that reaches the edge of stability, and a dense reference of its sharpness.

The setting of ``_detector_scenarios._gd`` (a tanh MLP, half squared error on one-hot
targets, 256 samples, plain SGD on the whole batch at lr 0.2): lambda_max rises from a
quarter of 2/lr = 10 to 2/lr around step 375 and then hovers there. Used by
``test_curvature_training.py`` and ``benchmarks/curvature.py``. Runs with the same seed
follow the same trajectory with or without a curvature monitor (an estimate leaves the
training state alone), so the reference is computed in a run of its own.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from _detector_scenarios import _sharpness
from torch import nn

LR = 0.2
STEPS = 1200


def loss_fn(out, target):
    return 0.5 * ((out - target) ** 2).sum(1).mean()


def problem(seed=0):
    """(model, optimizer, (X, Y)): the data from a private generator, the weights from the global one."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    X = torch.randn(256, 16, generator=g)
    Y = F.one_hot(torch.randint(0, 4, (256,), generator=g), 4).float()
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    return model, torch.optim.SGD(model.parameters(), lr=LR), (X, Y)


def train(model, opt, data, steps=STEPS, after_step=None):
    """Full-batch GD; ``after_step(step, loss)`` runs after ``opt.step()`` (where the hook logs)."""
    X, Y = data
    for step in range(steps):
        loss = loss_fn(model(X), Y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(step, loss)


@functools.lru_cache(maxsize=None)
def reference(steps=STEPS, seed=0, every=5, iters=20):
    """{step: lambda_max} every ``every`` steps by ``iters`` power iterations, each warm-started
    from the last vector (50 from a random one at step 0); and the first step it is >= 2/lr.
    Measured after the update of that step, where the monitor measures."""
    model, opt, data = problem(seed)
    X, Y = data
    params = list(model.parameters())
    g = torch.Generator().manual_seed(seed + 1)
    state = {"v": [torch.randn(p.shape, generator=g) for p in params]}
    lam = {}

    def measure(step, _):
        if step % every == 0:
            loss = loss_fn(model(X), Y)
            lam[step], state["v"], _ = _sharpness(loss, params, state["v"], 50 if step == 0 else iters)

    train(model, opt, data, steps, after_step=measure)
    crossing = next((s for s in sorted(lam) if lam[s] >= 2 / LR), None)
    return lam, crossing


def interpolate(measured, step):
    """A value of ``{step: value}`` at ``step``, linear between the nearest measured steps."""
    below = max(s for s in measured if s <= step)
    above = min((s for s in measured if s >= step), default=below)
    if above == below:
        return measured[below]
    w = (step - below) / (above - below)
    return (1 - w) * measured[below] + w * measured[above]
