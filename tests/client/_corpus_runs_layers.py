"""The corpus's tiny trainings for issue 17's per-layer gradients (seeded, CPU).

``layers(...)`` trains one of a few small networks and records what the hook sends every step:
``loss``, ``lr``, ``grad/norm``, ``grad/norm/<module>`` for every module and
``grad/nonfinite``, computed by the hook's own ``ParamLayout`` (same module grouping, same
names). ``kind`` picks the network and what goes wrong:

- ``sigmoid``: a deep MLP of sigmoids at PyTorch's default initialisation: the gradient of
  the first layers is 10^-3 to 10^-6 of the last ones' from the first step (Glorot & Bengio
  2010); ``tanh_small``: a deep tanh MLP at a tenth of the default scale, the same.
- ``dead``: a deep ReLU MLP (Kaiming initialisation) whose hidden layer ``layer`` gets a bias
  of -20 at step ``at``: every unit of it dies, and it and every layer below it get exactly
  no gradient from then on.
- ``frozen``: an MLP whose hidden linear layers (no bias) are each followed by LayerNorm; at
  step ``at`` the weights of layer ``layer`` are multiplied by ``factor``: the network's
  output is unchanged (LayerNorm undoes the scale) and the layer's gradient is divided by it.
- ``maxnorm``: the same LayerNorm MLP (or the BatchNorm CNN, ``arch="cnn"``) under a max-norm
  constraint set ``factor`` times below the layer's norm from step ``at`` (renormalised after
  every step): its gradient is multiplied by ~1/factor for as long as the constraint holds,
  while its outputs, the loss and the other layers barely change.
- healthy networks: ``relu`` (deep ReLU MLP, Kaiming), ``ln`` (the LayerNorm MLP),
  ``tanh`` (deep tanh MLP, Xavier), ``bn_cnn`` (conv + BatchNorm), ``cnn`` and
  ``transformer`` (the corpus's own CNN and one-layer transformer).

What happened is decided afterwards from the series (``_corpus_labels``), never from these
parameters.
"""

from __future__ import annotations

import math

import _corpus_runs as R
import _detector_scenarios as S
import torch
import torch.nn.functional as F

from stethoscope._metrics import ParamLayout, finish

DEPTH, WIDTH = 5, 64
#: A bias this negative keeps every unit of the layer off for every input: at -20 a rare batch
#: still revived some units of the corpus MLP within 50 steps.
DEAD_BIAS = -100.0


def _mlp(act, depth=DEPTH, ln=False, scale=None, init=None):
    layers, d = [], 20
    for _ in range(depth):
        layers.append(torch.nn.Linear(d, WIDTH, bias=not ln))
        if ln:
            layers.append(torch.nn.LayerNorm(WIDTH))
        layers.append(act())
        d = WIDTH
    net = torch.nn.Sequential(*layers, torch.nn.Linear(d, 10))
    with torch.no_grad():
        for m in net:
            if isinstance(m, torch.nn.Linear):
                if init is not None:
                    init(m.weight)
                    if m.bias is not None:
                        torch.nn.init.zeros_(m.bias)
                if scale is not None:
                    m.weight.mul_(scale)
    return net


def _bn_cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 16, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 4 * 4, 10),
    )


def _kaiming(w):
    torch.nn.init.kaiming_normal_(w, nonlinearity="relu")


def _xavier(w):
    torch.nn.init.xavier_normal_(w, gain=torch.nn.init.calculate_gain("tanh"))


def _model(kind: str, arch: str):
    if kind == "sigmoid":
        return _mlp(torch.nn.Sigmoid, depth=8)
    if kind == "tanh_small":
        return _mlp(torch.nn.Tanh, depth=6, scale=0.1)
    if kind == "tanh":
        return _mlp(torch.nn.Tanh, depth=6, init=_xavier)
    if kind in ("relu", "dead"):
        return _mlp(torch.nn.ReLU, init=_kaiming)
    if kind == "bn_cnn" or (arch == "cnn" and kind in ("maxnorm", "frozen")):
        return _bn_cnn()
    if kind in ("ln", "frozen", "maxnorm"):
        return _mlp(torch.nn.ReLU, ln=True)
    if kind in ("cnn", "transformer"):
        return R.model(kind, 10)
    raise ValueError(kind)


def _weighted(net) -> list:
    """The modules with a weight to perturb, in order (linear and conv layers)."""
    return [m for m in net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def layers(
    kind: str = "relu",
    seed: int = 0,
    steps: int = 1200,
    batch: int = 32,
    opt: str = "sgdm",
    lr: float = 0.05,
    arch: str = "mlp",
    at: int = 400,
    layer: int = 1,
    factor: float = 1.0,
    init_scale: float = 1.0,
    schedule: dict | None = None,
) -> list:
    """Train and return the points ``[(series, step, value), ...]`` in the hook's order.

    ``layer`` indexes the linear/conv layers (0 = the first); ``schedule`` is a
    ``_corpus_runs.lr_at`` schedule (default: constant ``lr``)."""
    data = arch if kind not in ("cnn", "transformer") else kind
    data = "cnn" if kind == "bn_cnn" else data
    g = torch.Generator().manual_seed(seed)
    x, y = R.DATA[data](4000, 10, R.NOISE[data], 0.1, g)
    torch.manual_seed(seed)
    net = _model(kind, arch)
    params = list(net.parameters())
    layout = ParamLayout(net)
    schedule = schedule or {"lr": lr}
    o = R.optimizer(opt, params, R.lr_at(schedule, 0, steps))
    target = _weighted(net)[layer]
    with torch.no_grad():
        target.weight.mul_(init_scale)
    limit = None
    points: list = []
    for step in range(steps):
        if step == at and kind in ("dead", "frozen", "maxnorm"):
            with torch.no_grad():
                if kind == "dead":
                    target.bias.fill_(DEAD_BIAS)
                elif kind == "frozen":
                    target.weight.mul_(factor)
                else:
                    limit = factor * float(target.weight.norm())
        i = torch.randint(0, len(x), (batch,), generator=g)
        cur = R.lr_at(schedule, step, steps)
        for group in o.param_groups:
            group["lr"] = cur
        loss = F.cross_entropy(net(x[i]), y[i])
        o.zero_grad()
        loss.backward()
        grads = finish(layout.grad_names, layout.grad_stats().tolist())
        S._emit(points, step, {"loss": loss.item(), **dict(zip(layout.grad_names, grads)), "lr": cur})
        o.step()
        if limit is not None:
            with torch.no_grad():
                norm = float(target.weight.norm())
                if norm > limit:
                    target.weight.mul_(limit / norm)
        if not math.isfinite(loss.item()):
            break
    return points
