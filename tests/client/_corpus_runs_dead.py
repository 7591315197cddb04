"""The corpus's tiny trainings for issue 17's dead units and slow steps (seeded, CPU).

``dead(...)`` trains a ReLU network and records what the hook sends: ``loss``, ``lr`` and
``grad/norm`` every step, and every ``every`` steps (the hook's expensive steps; default every
step, ``attach(every=1)``) ``grad/norm/<module>`` (the hook's own ``ParamLayout``) and
``dead/<module>`` for each ReLU module (the hook's own ``dead_share``). Both ride on the same
steps, as in the hook: recorded every step beside dead shares read every 5th, the per-layer
gradients' 10-point patience ran out before the dead units' 3 readings and the consequence
paged before its root (measured: one incident with two loud alerts); the per-layer labels
(``_corpus_labels``) count readings as steps, so sparse readings would move their windows.

``kind`` picks what goes wrong:

- ``bias_shift``: at step ``at`` the bias of hidden layer ``layer`` is lowered by ``shift``
  (a bad update, a corrupted checkpoint): most of its units stop firing for every input.
- ``lr_bump``: the learning rate is multiplied by ``factor`` for ``length`` steps from step
  ``at`` (a schedule bug, a warm-up skipped): the large updates push many units' biases
  and weights to where no input turns them on -- the classic dying ReLU.
- ``conv_shift``: the bias shift, on a conv layer of a CNN: every channel of it goes silent.
- healthy: ``relu`` (deep ReLU MLP, Kaiming, SGD+momentum or Adam) and ``cnn``.

``perf(...)`` is a real tiny training whose step times come from a simulated clock (the
hook's clock is injectable; wall time on a shared machine would be neither reproducible nor
meaningful): ``perf/step_ms`` every step from ``schedule``: ``jitter`` (healthy: +-10% noise
and a 200 ms checkpoint pause every 300 steps), ``stall`` (from step ``at`` every 4th step
waits 3x a step for its data), ``throttle`` (from ``at`` every step 0.1% slower than the
one before: a GPU slowing as it heats), ``recompile`` (from ``at`` every 10th step takes 20x:
a recompilation loop). What happened is decided afterwards from the series
(``_corpus_labels``), never from these parameters.
"""

from __future__ import annotations

import math
import random

import _corpus_runs as R
import _corpus_runs_layers as L
import _detector_scenarios as S
import torch
import torch.nn.functional as F

from stethoscope._dead import dead_share
from stethoscope._metrics import ParamLayout, finish


def _cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 4 * 4, 10),
    )


def dead(
    kind: str = "relu",
    seed: int = 0,
    steps: int = 1000,
    batch: int = 32,
    opt: str = "sgdm",
    lr: float = 0.05,
    at: int = 400,
    layer: int = 1,
    shift: float = 4.0,
    factor: float = 100.0,
    length: int = 3,
    every: int = 1,
) -> list:
    """Train and return the points ``[(series, step, value), ...]`` in the hook's order."""
    arch = "cnn" if kind in ("cnn", "conv_shift") else "mlp"
    g = torch.Generator().manual_seed(seed)
    x, y = R.DATA[arch](4000, 10, R.NOISE[arch], 0.1, g)
    torch.manual_seed(seed)
    net = _cnn() if arch == "cnn" else L._mlp(torch.nn.ReLU, init=L._kaiming)
    layout = ParamLayout(net)
    o = R.optimizer(opt, list(net.parameters()), lr)
    target = L._weighted(net)[layer]
    shares: dict = {}
    active = [False]

    def hook(name):
        def f(module, args, out):
            if active[0]:
                shares[name] = float(dead_share(out.detach()))

        return f

    for name, m in net.named_modules():
        if isinstance(m, torch.nn.ReLU):
            m.register_forward_hook(hook("dead/" + name))
    points: list = []
    for step in range(steps):
        if step == at and kind in ("bias_shift", "conv_shift"):
            with torch.no_grad():
                target.bias.sub_(shift)
        cur = lr * (factor if kind == "lr_bump" and at <= step < at + length else 1.0)
        for group in o.param_groups:
            group["lr"] = cur
        active[0] = step % every == 0
        i = torch.randint(0, len(x), (batch,), generator=g)
        loss = F.cross_entropy(net(x[i]), y[i])
        o.zero_grad()
        loss.backward()
        grads = finish(layout.grad_names, layout.grad_stats().tolist())
        values = {"loss": loss.item(), **dict(zip(layout.grad_names, grads)), "lr": cur}
        if active[0]:
            values.update(shares)
            shares.clear()
        else:  # like the hook: per-module norms ride on the expensive steps, with the dead shares
            values = {k: v for k, v in values.items() if not k.startswith("grad/norm/")}
        S._emit(points, step, values)
        o.step()
        if not math.isfinite(loss.item()):
            break
    return points


def step_ms(schedule: str, step: int, at: int, rng: random.Random, base: float = 10.0) -> float:
    """One step's time on the simulated clock, in milliseconds."""
    ms = base * (1 + 0.1 * (rng.random() - 0.5) * 2)
    if step < 5:
        ms *= 20  # the first steps allocate and compile
    if schedule == "jitter" and step % 300 == 299:
        ms = 200.0  # a checkpoint
    if step >= at:
        if schedule == "stall" and step % 4 == 0:
            ms += 3 * base
        elif schedule == "throttle":
            ms *= 1.001 ** (step - at)
        elif schedule == "recompile" and step % 10 == 0:
            ms *= 20
    return ms


def perf(schedule: str = "jitter", seed: int = 0, steps: int = 1200, at: int = 500, lr: float = 0.05) -> list:
    """A tiny MLP training (``loss``, ``lr``) with ``perf/step_ms`` from the simulated clock."""
    g = torch.Generator().manual_seed(seed)
    x, y = R.DATA["mlp"](4000, 10, R.NOISE["mlp"], 0.1, g)
    torch.manual_seed(seed)
    net = R.model("mlp", 10)
    o = R.optimizer("sgdm", list(net.parameters()), lr)
    rng = random.Random(seed)
    points: list = []
    for step in range(steps):
        i = torch.randint(0, len(x), (32,), generator=g)
        loss = F.cross_entropy(net(x[i]), y[i])
        o.zero_grad()
        loss.backward()
        o.step()
        values = {"loss": loss.item(), "lr": lr}
        ms = step_ms(schedule, step, at, rng)
        if step > 0:  # the hook's first step has no step before it
            values.update({"perf/step_ms": ms, "perf/samples_per_s": 32 / (ms / 1e3)})
        S._emit(points, step, values)
    return points
