"""The corpus's tiny trainings: one minibatch trainer over three architectures and four
optimizers, with the perturbations that make each phenomenon (seeded, CPU, plain torch).

``minibatch(...)`` trains an MLP on Gaussian blobs, a small CNN on synthetic 1x8x8 images or a
one-layer transformer on short token sequences, and returns the points the hook would send
(``loss``, ``lr``, ``grad/norm``, ``grad/nonfinite``, ``update_ratio/<module>`` every step,
``logits/*`` every ``LOGIT_EVERY`` steps), with the hook's own series names. The schedules and
perturbations are plain data (``Schedule``, ``corrupt``, ``scale``) so a corpus entry is a dict
of parameters that hashes. ``continual(...)`` records the class-incremental run of
``_continual_training``. What happened in a run is decided afterwards from its series
(``_corpus_labels``), never from these parameters.
"""

from __future__ import annotations

import math

import _continual_training as CT
import _detector_scenarios as S
import torch
import torch.nn.functional as F

from stethoscope._metrics import ParamLayout, finish

LOGIT_EVERY = 10  # steps between logit statistics, as the hook's default sampling would give


# -- data ------------------------------------------------------------------------------------


def blobs(n: int, classes: int, noise: float, flip: float, g: torch.Generator, dim: int = 20):
    centers = torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + noise * torch.randn(n, dim, generator=g)
    return x, _flip(y, classes, flip, g)


def images(n: int, classes: int, noise: float, flip: float, g: torch.Generator):
    """1x8x8 images: a random template per class, shifted by up to one pixel, plus noise."""
    templates = torch.randn(classes, 1, 10, 10, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    dx, dy = torch.randint(0, 3, (2, n), generator=g)
    x = torch.stack([templates[c, :, i : i + 8, j : j + 8] for c, i, j in zip(y.tolist(), dx.tolist(), dy.tolist())])
    return x + noise * torch.randn(n, 1, 8, 8, generator=g), _flip(y, classes, flip, g)


VOCAB, SEQ = 16, 8


def sequences(n: int, classes: int, noise: float, flip: float, g: torch.Generator):
    """Token sequences whose class sets which tokens are likely (a bag-of-tokens task);
    ``noise`` is the share of tokens drawn uniformly instead."""
    pref = torch.randint(0, VOCAB, (classes, 3), generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = pref[y].gather(1, torch.randint(0, 3, (n, SEQ), generator=g))
    x = torch.where(torch.rand(n, SEQ, generator=g) < noise, torch.randint(0, VOCAB, (n, SEQ), generator=g), x)
    return x, _flip(y, classes, flip, g)


def _flip(y, classes, flip, g):
    return torch.where(torch.rand(len(y), generator=g) < flip, torch.randint(0, classes, (len(y),), generator=g), y)


# -- models ----------------------------------------------------------------------------------


class TinyTransformer(torch.nn.Module):
    def __init__(self, classes: int, d: int = 32, layers: int = 1):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, d)
        self.pos = torch.nn.Parameter(0.1 * torch.randn(SEQ, d))
        layer = torch.nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.enc(self.emb(x) + self.pos).mean(1))


def model(arch: str, classes: int, width: int = 64) -> torch.nn.Module:
    if arch == "mlp":
        return torch.nn.Sequential(torch.nn.Linear(20, width), torch.nn.ReLU(), torch.nn.Linear(width, classes))
    if arch == "cnn":
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1),
            torch.nn.LeakyReLU(0.1),  # a leaky unit: a too-high LR blows the net up instead of killing it
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1),
            torch.nn.LeakyReLU(0.1),
            torch.nn.Flatten(),
            torch.nn.Linear(16 * 4 * 4, classes),
        )
    if arch == "transformer":
        return TinyTransformer(classes)
    raise ValueError(arch)


DATA = {"mlp": blobs, "cnn": images, "transformer": sequences}
#: Input noise by architecture: each task stays learnable, with a noisy minibatch loss.
NOISE = {"mlp": 1.5, "cnn": 1.0, "transformer": 0.3}


def optimizer(name: str, params, lr: float):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "sgdm":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    raise ValueError(name)


# -- schedules -------------------------------------------------------------------------------


def lr_at(schedule: dict, step: int, steps: int) -> float:
    """``{"lr": base, "warmup": n, "peak": p, "cosine": bool, "jump": [step, lr], "bumps": [[step,
    length, factor], ...]}``: linear warm-up from ``lr`` to ``peak`` over ``warmup`` steps (or
    from ~0 to ``lr`` when no peak), cosine decay after it, a permanent jump, short bumps."""
    base = schedule["lr"]
    warm, peak = schedule.get("warmup", 0), schedule.get("peak")
    if peak is not None:
        lr = base + (peak - base) * min(1.0, step / warm)
    elif warm and step < warm:
        lr = base * (step + 1) / warm
    else:
        lr = base
    if schedule.get("cosine"):
        lr *= 0.5 * (1 + math.cos(math.pi * max(0, step - warm) / max(1, steps - warm)))
    jump = schedule.get("jump")
    if jump and step >= jump[0]:
        lr = jump[1]
    for start, length, factor in schedule.get("bumps", ()):
        if start <= step < start + length:
            lr *= factor
    return lr


# -- the trainer -----------------------------------------------------------------------------


def minibatch(
    arch: str = "mlp",
    opt: str = "sgdm",
    batch: int = 32,
    steps: int = 1000,
    schedule: dict | None = None,
    classes: int = 10,
    n: int = 4000,
    noise: float | None = None,
    flip: float = 0.1,
    corrupt: tuple = (),
    scale: tuple = (),
    seed: int = 0,
    stop_after_nonfinite: int = 5,
) -> list:
    """Train; return the points ``[(series, step, value), ...]`` in the order the hook emits them.

    ``corrupt``: steps whose batch has its inputs scaled by 3 and its labels shuffled.
    ``scale``: ``[[start, length, factor], ...]``, stretches of steps whose inputs are scaled by
    ``factor`` (for token sequences: the logits), the loss jumping for a few steps.
    """
    schedule = schedule or {"lr": 0.05}
    g = torch.Generator().manual_seed(seed)
    x, y = DATA[arch](n, classes, NOISE[arch] if noise is None else noise, flip, g)
    torch.manual_seed(seed)
    net = model(arch, classes)
    params = list(net.parameters())
    layout = ParamLayout(net)
    o = optimizer(opt, params, lr_at(schedule, 0, steps))
    points: list = []
    first_bad = None
    for step in range(steps):
        i = torch.randint(0, len(x), (batch,), generator=g)
        xb, yb = x[i], y[i]
        if step in corrupt:
            xb, yb = 3 * xb, yb[torch.randperm(batch, generator=g)]
        factor = next((f for s0, k, f in scale if s0 <= step < s0 + k), 1.0)
        lr = lr_at(schedule, step, steps)
        for group in o.param_groups:
            group["lr"] = lr
        if arch == "transformer":
            z = factor * net(xb)  # token ids cannot be scaled, layer norm would undo a scaled embedding
        else:
            z = net(factor * xb if factor != 1.0 else xb)
        loss = F.cross_entropy(z, yb)
        o.zero_grad()
        loss.backward()
        values = {"loss": loss.item(), "lr": lr, **S.grad_stats(params)}
        if step % LOGIT_EVERY == 0:
            values.update(S.logit_stats(z, yb))
        if first_bad is None and (values["grad/nonfinite"] or not math.isfinite(values["loss"] + values["grad/norm"])):
            first_bad = step
        layout.take_snapshot()
        o.step()
        stats = finish(layout.update_names, layout.update_stats().tolist())
        values.update((k, v) for k, v in zip(layout.update_names, stats) if k.startswith("update_ratio/"))
        S._emit(points, step, values)
        if first_bad is not None and step >= first_bad + stop_after_nonfinite:
            break
    return points


def continual(seed: int = 0, steps_per_task: int = CT.STEPS_PER_TASK) -> list:
    """The class-incremental run with replay: training loss, lr and gradient norm every step,
    ``continual/task`` at each switch and ``eval/acc/<task>`` for every seen task every step."""
    points: list = []

    def on_step(step, loss, model):
        values = {"loss": loss.item(), "lr": CT.LR, **S.grad_stats(list(model.parameters()))}
        S._emit(points, step, values)

    r = CT.class_incremental(seed=seed, steps_per_task=steps_per_task, on_step=on_step)
    starts = dict(r.switches)
    out = []
    by_step: dict = {}
    for p in points:
        by_step.setdefault(p[1], []).append(p)
    for task, series in r.acc.items():
        for step, v in series:
            by_step.setdefault(step, []).append((f"eval/acc/{task}", step, v))
    for step in sorted(by_step):
        if step in starts:
            out.append(("continual/task", step, float(starts[step])))
        out += by_step[step]
    return out
