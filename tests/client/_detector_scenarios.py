"""Real tiny trainings that show each phenomenon the detectors look for (seeded, CPU).

Each scenario trains a small model with plain torch, computes the series the hook would send
(names as in DESIGN.md) and returns them with the ground truth: the steps where the
phenomenon happened. Used by ``tests/client/test_detectors_real.py`` and by
``benchmarks/detector_quality.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F

torch.set_num_threads(1)  # tiny models: threads only add overhead, and the machine is shared


@dataclasses.dataclass
class Event:
    """Ground truth: ``detector`` should alert for the phenomenon at ``step``.

    An alert of that detector opening at a step in ``[lo, hi]`` detects it; ``lead`` is
    ``step - start_step`` (positive: before the phenomenon).
    """

    detector: str
    step: int
    lo: int
    hi: int
    tag: str = ""  # what kind of event (e.g. "gradual" or "sudden" divergence); labels only


@dataclasses.dataclass
class Scenario:
    name: str
    points: list  # (series, step, value) in the order the hook would emit them
    events: list  # [Event]
    settings: dict = dataclasses.field(default_factory=dict)  # per-project detector settings

    def series(self, name: str) -> list:
        return [(s, v) for n, s, v in self.points if n == name]


def logit_stats(z: torch.Tensor, y: torch.Tensor) -> dict:
    """The hook's logits/* series for one batch, in float32 exactly as training computes.

    A sample is in Softmax Collapse when sum_j exp(z_j - max z) == 1 in float32 (DESIGN.md).
    """
    z = z.detach().float()
    zmax = z.max(1, keepdim=True).values
    sc = (torch.exp(z - zmax).sum(1) == 1.0).float().mean().item()
    per = F.cross_entropy(z, y, reduction="none")
    others = z.scatter(1, y[:, None], -math.inf)
    margin = (z.gather(1, y[:, None])[:, 0] - torch.logsumexp(others, 1)).median().item()
    return {
        "logits/max_abs": z.abs().max().item(),
        "logits/mean_logz": torch.logsumexp(z, 1).mean().item(),
        "logits/sc_fraction": sc,
        "logits/zero_loss_fraction": (per == 0).float().mean().item(),
        "logits/median_margin": margin,
    }


def grad_stats(params) -> dict:
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    bad = sum(int((~torch.isfinite(g)).sum()) for g in grads)
    return {"grad/norm": norm, "grad/nonfinite": float(bad)}


def _emit(points: list, step: int, values: dict) -> None:
    for name, value in values.items():
        points.append((name, step, float(value)))


# -- Softmax Collapse --------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def softmax_collapse_modular(p: int = 23, lr: float = 0.05, steps: int = 3200, seed: int = 0) -> Scenario:
    """(a + b) mod p on half the table, full batch, Adam, float32, no weight decay.

    Training accuracy reaches 100% in ~100 steps; after that only growing logits lower the
    loss (Prieto et al.'s naive loss minimisation) until float32 softmax turns one-hot.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    keep = torch.randperm(p * p, generator=g)[: p * p // 2]
    a, b, y = a[keep], b[keep], ((a + b) % p)[keep]
    emb = torch.nn.Embedding(p, 32)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, p))
    params = list(emb.parameters()) + list(net.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    points: list = []
    collapse = None
    for step in range(steps):
        z = net(torch.cat([emb(a), emb(b)], 1))
        loss = F.cross_entropy(z, y)
        opt.zero_grad()
        loss.backward()
        values = {"loss": loss.item(), "lr": lr, **grad_stats(params)}
        if step % 10 == 0:
            values.update(logit_stats(z, y))
            if collapse is None and values["logits/sc_fraction"] > 0.5:
                collapse = step
        _emit(points, step, values)
        opt.step()
    assert collapse is not None, "the modular run did not reach Softmax Collapse"
    return Scenario("softmax_collapse_modular", points, [Event("softmax_collapse", collapse, 0, collapse)])


# -- loss spikes ---------------------------------------------------------------------------


def _blobs(n: int = 4000, d: int = 20, k: int = 10, noise: float = 1.5, flip: float = 0.1, seed: int = 0):
    """Gaussian blobs with 10% label noise: the minibatch loss stays noisy all run long."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    x = centers[y] + noise * torch.randn(n, d, generator=g)
    y = torch.where(torch.rand(n, generator=g) < flip, torch.randint(0, k, (n,), generator=g), y)
    return x, y, g


def _classifier(
    steps: int,
    lr_at,
    batch: int = 32,
    corrupt=(),
    seed: int = 0,
    adam: bool = False,
    momentum: float = 0.9,
    stop_after_nonfinite: int = 5,
):
    """Minibatch training on the blobs; returns (points, first non-finite step or None)."""
    x, y, g = _blobs(seed=seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    params = list(net.parameters())
    opt = torch.optim.Adam(params, lr=lr_at(0)) if adam else torch.optim.SGD(params, lr=lr_at(0), momentum=momentum)
    points: list = []
    first_bad = None
    for step in range(steps):
        i = torch.randint(0, len(x), (batch,), generator=g)
        xb, yb = x[i], y[i]
        if step in corrupt:  # a corrupted batch: scaled inputs, shuffled labels
            xb, yb = 3 * xb, yb[torch.randperm(batch, generator=g)]
        lr = lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        z = net(xb)
        loss = F.cross_entropy(z, yb)
        opt.zero_grad()
        loss.backward()
        values = {"loss": loss.item(), "lr": lr, **grad_stats(params)}
        if step % 10 == 0:
            values.update(logit_stats(z, yb))
        _emit(points, step, values)
        # The divergence itself: the first non-finite loss or gradient (logit statistics such as
        # log Z can overflow a step earlier; they are not the loss).
        if first_bad is None and (
            values["grad/nonfinite"] or not all(math.isfinite(values[k]) for k in ("loss", "grad/norm"))
        ):
            first_bad = step
        if first_bad is not None and step >= first_bad + stop_after_nonfinite:
            break
        opt.step()
    return points, first_bad


SPIKE_STEPS = (300, 500, 700)


@functools.lru_cache(maxsize=None)
def corrupted_batches(seed: int = 0) -> Scenario:
    points, _ = _classifier(900, lambda s: 0.05, corrupt=SPIKE_STEPS, seed=seed)
    return Scenario(f"corrupted_batches_s{seed}", points, [Event("loss_spike", s, s, s + 2) for s in SPIKE_STEPS])


BUMP_STEPS = (300, 600)
BUMP_FACTOR, BUMP_LENGTH = 50.0, 2


@functools.lru_cache(maxsize=None)
def lr_bumps(seed: int = 0) -> Scenario:
    """The learning rate jumps 50x for 2 steps, twice; the loss shoots up and recovers."""

    def lr_at(s):
        return 0.05 * (BUMP_FACTOR if any(b <= s < b + BUMP_LENGTH for b in BUMP_STEPS) else 1.0)

    points, _ = _classifier(900, lr_at, seed=seed)
    return Scenario(f"lr_bumps_s{seed}", points, [Event("loss_spike", s, s, s + 10) for s in BUMP_STEPS])


# -- divergence ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def divergence_lr_warmup(peak: float = 3.0, warmup: int = 300, seed: int = 0) -> Scenario:
    """Linear warm-up towards a peak learning rate far too high: the run ends in inf/NaN."""
    points, bad = _classifier(2000, lambda s: 0.05 + (peak - 0.05) * min(1.0, s / warmup), seed=seed)
    assert bad is not None, "the run did not diverge"
    return Scenario(f"divergence_lr_warmup_s{seed}", points, [Event("divergence", bad, 0, bad)])


@functools.lru_cache(maxsize=None)
def divergence_constant_lr(lr: float = 1.5, seed: int = 0) -> Scenario:
    """A learning rate too high from the first step: trouble starts before any warm-up."""
    points, bad = _classifier(2000, lambda s: lr, seed=seed)
    assert bad is not None, "the run did not diverge"
    return Scenario(f"divergence_constant_lr_s{seed}", points, [Event("divergence", bad, 0, bad)])


# -- edge of stability ---------------------------------------------------------------------


def _sharpness(loss, params, v, iters):
    """lambda_max by power iteration on Hessian-vector products, warm-started from ``v``."""
    grads = torch.autograd.grad(loss, params, create_graph=True)
    lam = 0.0
    for _ in range(iters):
        norm = math.sqrt(sum(float((a * a).sum()) for a in v))
        v = [a / norm for a in v]
        hv = torch.autograd.grad(grads, params, v, retain_graph=True)
        lam = sum(float((a * b).sum()) for a, b in zip(v, hv))
        v = [h.detach() for h in hv]
    return lam, v, grads


def _trace(grads, params, g, probes):
    """Hutchinson: tr(H) ~ mean of v^T H v over Rademacher probes v."""
    total = 0.0
    for _ in range(probes):
        v = [torch.randint(0, 2, p.shape, generator=g).float() * 2 - 1 for p in params]
        hv = torch.autograd.grad(grads, params, v, retain_graph=True)
        total += sum(float((a * b).sum()) for a, b in zip(v, hv))
    return total / probes


EOS_EVERY = 10  # steps between curvature measurements


def _gd(lr: float, steps: int, seed: int):
    """Full-batch GD on a tanh MLP with MSE; returns (points, first step lambda_max >= 2/lr)."""
    every = EOS_EVERY
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    X = torch.randn(256, 16, generator=g)
    Y = F.one_hot(torch.randint(0, 4, (256,), generator=g), 4).float()
    net = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)
    )
    params = list(net.parameters())
    v = [torch.randn(p.shape, generator=g) for p in params]
    points: list = []
    crossed = None
    for step in range(steps):
        loss = 0.5 * ((net(X) - Y) ** 2).sum(1).mean()
        values = {"loss": loss.item(), "lr": lr}
        if step % every == 0:
            lam, v, grads = _sharpness(loss, params, v, 20 if step == 0 else 8)
            values.update(
                {"hessian/lambda_max": lam, "hessian/two_over_lr": 2 / lr, "hessian/trace": _trace(grads, params, g, 4)}
            )
            if crossed is None and lam >= 2 / lr:
                crossed = step
        grads = torch.autograd.grad(loss, params)
        values["grad/norm"] = math.sqrt(sum(float((a * a).sum()) for a in grads))
        _emit(points, step, values)
        with torch.no_grad():
            for p, gr in zip(params, grads):
                p -= lr * gr
    return points, crossed


@functools.lru_cache(maxsize=None)
def edge_of_stability_gd(lr: float = 0.2, steps: int = 1200, seed: int = 0) -> Scenario:
    """Full-batch GD on a tanh MLP with MSE (Cohen et al. 2021's setting, tiny).

    Sharpness rises (progressive sharpening) until lambda_max ~ 2/lr = 10, then hovers there.
    """
    points, crossed = _gd(lr, steps, seed)
    assert crossed is not None, "GD did not reach the edge of stability"
    # Full batch: the SGD trace criterion does not apply (DESIGN.md, Wu & Su 2023).
    return Scenario(
        "edge_of_stability_gd",
        points,
        [Event("edge_of_stability", crossed, 0, crossed + EOS_EVERY)],
        settings={"edge_of_stability": {"check_trace": False}},
    )


# -- healthy runs --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def healthy_adam_warmup(seed: int = 0) -> Scenario:
    """Adam, linear warm-up over 100 steps then cosine decay, batch 8: noisy, healthy."""
    steps, warm, peak = 1500, 100, 3e-3

    def lr_at(s):
        if s < warm:
            return peak * (s + 1) / warm
        return peak * 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm)))

    points, _ = _classifier(steps, lr_at, batch=8, adam=True, seed=seed)
    return Scenario(f"healthy_adam_warmup_s{seed}", points, [])


@functools.lru_cache(maxsize=None)
def healthy_sgd_small_batch(seed: int = 0) -> Scenario:
    """Plain SGD with momentum, batch 4, constant learning rate: the noisiest healthy loss."""
    points, _ = _classifier(1500, lambda s: 0.02, batch=4, seed=seed)
    return Scenario(f"healthy_sgd_small_batch_s{seed}", points, [])


@functools.lru_cache(maxsize=None)
def healthy_gd_below_edge(seed: int = 0) -> Scenario:
    """The same GD setting at lr = 0.02: 2/lr = 100, far above the sharpness it reaches."""
    points, crossed = _gd(0.02, 1200, seed)
    assert crossed is None
    return Scenario("healthy_gd_below_edge", points, [], settings={"edge_of_stability": {"check_trace": False}})


SCENARIOS = (
    softmax_collapse_modular,
    corrupted_batches,
    lr_bumps,
    divergence_lr_warmup,
    divergence_constant_lr,
    edge_of_stability_gd,
    healthy_adam_warmup,
    healthy_sgd_small_batch,
    healthy_gd_below_edge,
)


# -- replay --------------------------------------------------------------------------------


def alert_rows(changes) -> list:
    """What the server's ``alerts`` table holds after applying ``changes`` in order."""
    rows, open_rows = [], {}
    for c in changes:
        k = (c.detector, c.key)
        if c.action == "open":
            assert k not in open_rows, f"second open alert for {k}"
            open_rows[k] = len(rows)
            rows.append(None)
        assert k in open_rows, f"{c.action} for {k} without an open alert"
        row = c.to_dict()
        del row["action"]  # a row holds the alert, not how it last changed
        rows[open_rows[k]] = row
        if c.action == "resolve":
            del open_rows[k]
    return sorted(rows, key=lambda r: (r["start_step"], r["detector"], r["key"]))


def replay(scenario: Scenario, detector_set, batch_size=None, seed: int = 0, log: list | None = None):
    """Feed a scenario the way ingest does; return (changes, {(detector, key, start): step raised}).

    ``batch_size=None`` feeds one step at a time, so the step at which each alert was raised is
    exact (that is what lead times are measured from). An int feeds random batches of up to
    that many points, with series interleaved as the hook's columns would be. ``log``, if
    given, gets ``(step fed, change)`` for every change.
    """
    import random

    state, changes, raised = {}, [], {}
    if batch_size is None:
        by_step: dict = {}
        for pt in scenario.points:
            by_step.setdefault(pt[1], []).append(pt)
        batches = [(step, pts) for step, pts in by_step.items()]
    else:
        rng, pts, batches = random.Random(seed), scenario.points, []
        i = 0
        while i < len(pts):
            n = rng.randint(1, batch_size)
            chunk = pts[i : i + n]
            rng.shuffle(chunk)  # interleaving across series; each series stays in step order below
            chunk.sort(key=lambda p: (p[0], p[1]))
            batches.append((chunk[-1][1], chunk))
            i += n
    for step, batch in batches:
        for c in detector_set.update(state, batch):
            changes.append(c)
            if log is not None:
                log.append((step, c))
            if c.action == "open":
                raised[(c.detector, c.key, c.start_step)] = step
    return changes, raised, state
