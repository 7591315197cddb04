"""The corpus's tiny trainings for issue 17: plateaus, oscillation, overfitting (seeded, CPU).

- ``stuck(...)``: a minibatch MLP that does not learn: a learning rate far too low, a first
  layer whose ReLUs are all dead from the start, or a deep tanh net initialised so small that
  the signal vanishes (a saddle it may escape late).
- ``edge(...)``: softmax regression trained by full-batch gradient descent (with or without
  momentum), or by large-batch SGD, whose learning rate is raised past the edge of stability,
  ``factor * 2 (1 + momentum) / lambda_max`` with lambda_max measured at the switch by power
  iteration. On this convex, non-quadratic loss the iterate flips along the top direction
  every step and the loss alternates up/down with a growing amplitude until it settles in a
  period-2 cycle above its old level; ``factor < 1`` is the healthy counterpart.
- ``held_out(...)``: an MLP on a training set of ``n_train`` samples with label noise and a
  separate held-out set of the same distribution, ``eval/loss`` and ``eval/acc`` logged every
  ``eval_every`` steps: a small training set memorises (held-out loss rising while the
  training loss falls), a large one does not.

Each returns the points the hook would send (``loss``, ``lr``, ``grad/norm``,
``grad/nonfinite`` every step), in the hook's order. What happened is decided afterwards from
the series (``_corpus_labels``), never from these parameters.
"""

from __future__ import annotations

import math

import _corpus_runs as R
import _detector_scenarios as S
import torch
import torch.nn.functional as F

EVAL_N = 1000  # held-out samples: accuracy to within ~1.6 points (standard error)


def _step_values(loss, params, lr):
    return {"loss": loss.item(), "lr": lr, **S.grad_stats(params)}


def stuck(kind: str = "lr_low", seed: int = 0, steps: int = 1200, batch: int = 32, lr: float = 0.05) -> list:
    """``kind``: ``lr_low`` (SGD+momentum at ``lr``, meant to be far too low), ``dead`` (first
    layer biases at -10: every ReLU outputs zero for every input), ``saddle`` (four tanh
    layers initialised at a fiftieth of their default scale)."""
    g = torch.Generator().manual_seed(seed)
    x, y = R.blobs(4000, 10, R.NOISE["mlp"], 0.1, g)
    torch.manual_seed(seed)
    if kind == "saddle":
        layers = [torch.nn.Linear(20, 64), torch.nn.Tanh()]
        for _ in range(3):
            layers += [torch.nn.Linear(64, 64), torch.nn.Tanh()]
        net = torch.nn.Sequential(*layers, torch.nn.Linear(64, 10))
        with torch.no_grad():
            for m in net:
                if isinstance(m, torch.nn.Linear):
                    m.weight.mul_(0.02)
    else:
        net = R.model("mlp", 10)
        if kind == "dead":
            with torch.no_grad():
                net[0].bias.fill_(-10.0)
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    points: list = []
    for step in range(steps):
        i = torch.randint(0, len(x), (batch,), generator=g)
        loss = F.cross_entropy(net(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        S._emit(points, step, _step_values(loss, params, lr))
        opt.step()
    return points


def edge(
    factor: float = 1.1,
    seed: int = 0,
    momentum: float = 0.0,
    batch: int | None = None,
    before: int = 200,
    steps: int = 700,
    lr0: float = 0.5,
    curvature: bool = False,
) -> list:
    """Softmax regression (20 inputs, 4 classes, 512 samples), lr ``lr0`` for ``before``
    steps, then ``factor`` times the edge. ``batch``: minibatch size (None: full batch).
    ``curvature``: also send ``hessian/lambda_max`` and ``hessian/two_over_lr`` every
    ``S.EOS_EVERY`` steps, as ``watch_curvature`` would."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = R.blobs(512, 4, 2.0, 0.0, g)
    net = torch.nn.Linear(20, 4)
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=lr0, momentum=momentum)
    v = [torch.randn(p.shape, generator=g) for p in params]
    lr, points = lr0, []
    for step in range(steps):
        if batch is None:
            xb, yb = x, y
        else:
            i = torch.randint(0, len(x), (batch,), generator=g)
            xb, yb = x[i], y[i]
        loss = F.cross_entropy(net(xb), yb)
        measure = curvature and step % S.EOS_EVERY == 0
        if step == before or measure:
            lam, v, _ = S._sharpness(F.cross_entropy(net(x), y), params, v, 30 if step == before else 8)
            if step == before:
                lr = factor * 2 * (1 + momentum) / lam
                for group in opt.param_groups:
                    group["lr"] = lr
        opt.zero_grad()
        loss.backward()
        values = _step_values(loss, params, lr)
        if measure:
            values.update({"hessian/lambda_max": lam, "hessian/two_over_lr": 2 / lr})
        S._emit(points, step, values)
        opt.step()
        if not math.isfinite(values["loss"]):
            break
    return points


def held_out(
    n_train: int = 200,
    seed: int = 0,
    flip: float = 0.2,
    width: int = 256,
    opt: str = "adam",
    lr: float = 1e-3,
    steps: int = 1500,
    batch: int = 32,
    eval_every: int = 10,
    weight_decay: float = 0.0,
) -> list:
    """An MLP (one hidden layer of ``width``) on ``n_train`` noisy samples; ``eval/loss`` and
    ``eval/acc`` on ``EVAL_N`` held-out samples of the same distribution every ``eval_every``
    steps (after the step's training point, as an evaluation loop would log it)."""
    g = torch.Generator().manual_seed(seed)
    x, y = R.blobs(n_train + EVAL_N, 10, R.NOISE["mlp"], flip, g)
    xt, yt, xe, ye = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(20, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))
    params = list(net.parameters())
    o = R.optimizer(opt, params, lr)
    for group in o.param_groups:
        group["weight_decay"] = weight_decay
    points: list = []
    for step in range(steps):
        i = torch.randint(0, n_train, (batch,), generator=g)
        loss = F.cross_entropy(net(xt[i]), yt[i])
        o.zero_grad()
        loss.backward()
        values = _step_values(loss, params, lr)
        o.step()
        if step % eval_every == 0:
            with torch.no_grad():
                z = net(xe)
                values["eval/loss"] = F.cross_entropy(z, ye).item()
                values["eval/acc"] = (z.argmax(1) == ye).float().mean().item()
        S._emit(points, step, values)
    return points
