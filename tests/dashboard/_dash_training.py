"""A real tiny training for the dashboard tests: an MLP on CPU, two tasks, every series the
hook sends, computed here with plain torch and posted through the HTTP API.

Task A (classes 0, 1) then task B (classes 2, 3) on one head: class-incremental learning, so
task A's accuracy drops after the switch (the stability gap). One step's learning rate is
multiplied by 30 (a loss spike follows) and one batch carries an inf input (a real NaN loss;
the step is skipped, as a guarded loop would).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import httpx
import torch
from torch import nn

STEPS = 300
SWITCH_STEP = 150
SPIKE_STEP = 220
NAN_STEP = 260
EVAL_EVERY = 5
HESSIAN_EVERY = 10
LR = 0.1
WARMUP = 20


@dataclass
class Training:
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)

    def add(self, name: str, step: int, value: float) -> None:
        steps, values = self.series.setdefault(name, ([], []))
        steps.append(step)
        values.append(float(value))


def _task_data(gen: torch.Generator, classes: tuple[int, int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    centres = {0: (2.0, 0.0), 1: (-2.0, 0.0), 2: (0.0, 2.0), 3: (0.0, -2.0)}
    y = torch.tensor(classes)[torch.randint(0, 2, (n,), generator=gen)]
    x = torch.tensor([centres[int(c)] for c in y]) + 0.9 * torch.randn(n, 2, generator=gen)
    return x, y


def _logit_stats(z: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    z = z.detach().float()
    logz = torch.logsumexp(z, -1)
    logp = z.log_softmax(-1)
    nll = -logp.gather(1, y[:, None])[:, 0]
    others = z.clone()
    others[torch.arange(len(y)), y] = -math.inf
    margin = z.gather(1, y[:, None])[:, 0] - torch.logsumexp(others, -1)
    return {
        "logits/max_abs": z.abs().max().item(),
        "logits/mean_logz": logz.mean().item(),
        # Exactly one-hot in float32: sum exp(z - max z) == 1 (Softmax Collapse).
        "logits/sc_fraction": (torch.exp(z - z.max(-1, keepdim=True).values).sum(-1) == 1).float().mean().item(),
        "logits/zero_loss_fraction": (nll == 0).float().mean().item(),
        "logits/median_margin": margin.median().item(),
        "logits/entropy": -(logp.exp() * logp).sum(-1).mean().item(),
    }


def _curvature(model: nn.Module, loss_fn, x, y, gen: torch.Generator) -> tuple[float, float]:
    """lambda_max by power iteration and tr(H) by Hutchinson, on Hessian-vector products."""
    params = [p for p in model.parameters()]
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)

    def hvp(v):
        return torch.autograd.grad(grads, params, v, retain_graph=True)

    v = [torch.randn(p.shape, generator=gen) for p in params]
    lam = 0.0
    for _ in range(8):
        norm = math.sqrt(sum((t * t).sum().item() for t in v))
        v = [t / norm for t in v]
        hv = hvp(v)
        lam = sum((a * b).sum().item() for a, b in zip(v, hv))
        v = [t.detach() for t in hv]
    trace = 0.0
    probes = 4
    for _ in range(probes):
        r = [torch.randint(0, 2, p.shape, generator=gen).float() * 2 - 1 for p in params]
        trace += sum((a * b).sum().item() for a, b in zip(r, hvp(r))) / probes
    return lam, trace


def train(seed: int = 0) -> Training:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only contend (several times slower on 2 cores)
    try:
        return _train(seed)
    finally:
        torch.set_num_threads(threads)


def _train(seed: int) -> Training:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(2, 32))
    model.add_module("act1", nn.Tanh())
    model.add_module("fc2", nn.Linear(32, 32))
    model.add_module("act2", nn.Tanh())
    model.add_module("head", nn.Linear(32, 4))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tasks = {"A": (0, 1), "B": (2, 3)}
    evals = {t: _task_data(gen, c, 256) for t, c in tasks.items()}
    out = Training()
    min_acc: dict[str, float] = {}
    for step in range(STEPS):
        task = "A" if step < SWITCH_STEP else "B"
        if step in (0, SWITCH_STEP):
            out.events.append(
                {
                    "key": f"switch-{step}",
                    "step": step,
                    "kind": "task_switch",
                    "message": f"now training task {task}",
                    "info": {"task": task},
                }
            )
        lr = LR * min(1.0, (step + 1) / WARMUP) * (30.0 if step == SPIKE_STEP else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = _task_data(gen, tasks[task], 64)
        if step == NAN_STEP:
            x[0, 0] = math.nan  # a corrupt sample: NaN logits, NaN loss
        opt.zero_grad()
        z = model(x)
        loss = loss_fn(z, y)
        loss.backward()
        out.add("loss", step, loss.item())
        out.add("lr", step, lr)
        sq = 0.0
        for name, mod in model.named_children():
            if isinstance(mod, nn.Linear):
                n2 = sum((p.grad.float() ** 2).sum().item() for p in mod.parameters())
                out.add(f"grad/norm/{name}", step, math.sqrt(n2))
                sq += n2
        out.add("grad/norm", step, math.sqrt(sq))
        for name, v in _logit_stats(z, y).items():
            out.add(name, step, v)
        if math.isfinite(loss.item()) and math.isfinite(sq):
            opt.step()  # a non-finite loss or gradient skips the step, as a guarded loop would
        if step % HESSIAN_EVERY == 0:
            lam, tr = _curvature(model, loss_fn, *_task_data(gen, tasks[task], 256), gen)
            out.add("hessian/lambda_max", step, lam)
            out.add("hessian/trace", step, tr)
            out.add("hessian/two_over_lr", step, 2 / lr)
        if step % EVAL_EVERY == 0:
            with torch.no_grad():
                accs = {t: (model(ex).argmax(-1) == ey).float().mean().item() for t, (ex, ey) in evals.items()}
            seen = ["A"] if task == "A" else ["A", "B"]
            for t in seen:
                out.add(f"eval/acc/{t}", step, accs[t])
            if task == "B":
                # De Lange et al. 2023: min-ACC over previous tasks after they were learned.
                min_acc["A"] = min(min_acc.get("A", 1.0), accs["A"])
                k = len(seen)
                out.add("continual/min_acc", step, min_acc["A"])
                out.add("continual/wc_acc", step, accs["B"] / k + (1 - 1 / k) * min_acc["A"])
    return out


def wire(v: float) -> float | str:
    if v != v:
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return v


def post(
    base_url: str,
    run_id: str,
    training: Training,
    project: str = "tiny",
    name: str | None = None,
    config: dict | None = None,
    upto: int | None = None,
    status: str | None = "finished",
) -> None:
    """Send the training (steps < ``upto`` if given) through the REST API, as the hook would."""
    with httpx.Client(base_url=base_url + "/api/v1", timeout=30) as c:
        c.put(
            f"/runs/{run_id}",
            json={"project": project, "name": name or run_id, "config": config or {"lr": LR, "steps": STEPS}},
        ).raise_for_status()
        send_points(c, run_id, training, 0, STEPS if upto is None else upto)
        events = [e for e in training.events if upto is None or e["step"] < upto]
        if events:
            c.post(f"/runs/{run_id}/events", json={"events": events}).raise_for_status()
        if status is not None and upto is None:
            c.patch(f"/runs/{run_id}", json={"status": status}).raise_for_status()


def send_points(c: httpx.Client, run_id: str, training: Training, lo: int, hi: int) -> None:
    batch = []
    for name, (steps, values) in training.series.items():
        pick = [(s, wire(v)) for s, v in zip(steps, values) if lo <= s < hi]
        if pick:
            batch.append({"name": name, "steps": [s for s, _ in pick], "values": [v for _, v in pick]})
    if batch:
        c.post(f"/runs/{run_id}/points", json={"series": batch}).raise_for_status()
