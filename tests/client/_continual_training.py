"""A real class-incremental training with experience replay, on Gaussian blobs made here.

Four tasks of two classes each; a small MLP with one head over all eight classes, SGD with momentum,
and a replay buffer of earlier tasks' samples mixed into every batch. When a task starts, the
new classes' logits are pushed up and the old tasks' accuracy collapses; replay brings it
back within tens of steps: the stability gap of De Lange et al. (ICLR 2023). The model is
evaluated on every seen task after every step by ``stethoscope.ContinualEvaluator``.

Used by ``tests/client/test_continual*.py`` and ``tests/server/test_continual*.py``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

import stethoscope

TASKS = 4
CLASSES_PER_TASK = 2
DIM = 16
STEPS_PER_TASK = 120
BATCH = 16  # new-task samples per step
REPLAY = 16  # replayed samples per step (once a task has passed)
BUFFER_PER_CLASS = 40
HELD_OUT = 300  # held-out samples per task
TRAIN_PER_CLASS = 400
LR = 0.05


@dataclasses.dataclass
class Result:
    switches: list  # [(step, task)]
    acc: dict  # task name -> [(step, accuracy)] as the evaluator returned them
    loss: dict  # task name -> [(step, loss)]
    steps: int
    evaluator: object
    model: torch.nn.Module


def blobs(seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(TASKS * CLASSES_PER_TASK, DIM, generator=g)

    def sample(c, n):
        return centers[c] + torch.randn(n, DIM, generator=g), torch.full((n,), c, dtype=torch.long)

    train, test = [], []
    for t in range(TASKS):
        cls = range(t * CLASSES_PER_TASK, (t + 1) * CLASSES_PER_TASK)
        xs, ys = zip(*(sample(c, TRAIN_PER_CLASS) for c in cls))
        train.append((torch.cat(xs), torch.cat(ys)))
        xs, ys = zip(*(sample(c, HELD_OUT // CLASSES_PER_TASK) for c in cls))
        test.append((torch.cat(xs), torch.cat(ys)))
    return train, test


def model_for(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 64), torch.nn.ReLU(), torch.nn.Linear(64, TASKS * CLASSES_PER_TASK))


def class_incremental(
    seed: int = 0, mon=None, every: int | None = 1, steps_per_task: int = STEPS_PER_TASK, on_step=None
) -> Result:
    """Train; with ``mon`` the evaluator is the monitor's collector (values go to the server),
    without one it is called after each step here. Either way its values are returned.
    ``on_step(step, loss, model)``, if given, is called after each backward pass."""
    torch.set_num_threads(1)
    train, test = blobs(seed)
    model = model_for(seed)
    # Momentum makes the first steps on the new classes overshoot: a clear, short gap.
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    ev = stethoscope.ContinualEvaluator(model, every=every)
    acc: dict = {}
    loss_by_task: dict = {}

    def keep(step, out):
        for name, v in (out or {}).items():
            kind, task = name.split("/")[1:]
            (acc if kind == "acc" else loss_by_task).setdefault(task, []).append((step, float(v)))
        return out

    if mon is not None:
        mon.add_collector(lambda step: keep(step, ev(step)))
    g = torch.Generator().manual_seed(seed + 1)
    buf_x, buf_y = [], []
    switches = []
    step = 0
    for t in range(TASKS):
        switches.append((step, str(t)))
        if mon is not None:
            mon.task_switch(t)
        ev.add_task(t, *test[t])
        x_tr, y_tr = train[t]
        for _ in range(steps_per_task):
            i = torch.randint(len(y_tr), (BATCH,), generator=g)
            x, y = x_tr[i], y_tr[i]
            if buf_x:
                bx, by = torch.cat(buf_x), torch.cat(buf_y)
                j = torch.randint(len(by), (REPLAY,), generator=g)
                x, y = torch.cat([x, bx[j]]), torch.cat([y, by[j]])
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            if on_step is not None:
                on_step(step, loss, model)
            opt.step()
            if mon is not None:
                mon.log(step=step, loss=loss)
            else:
                keep(step, ev(step))
            step += 1
        for c in range(t * CLASSES_PER_TASK, (t + 1) * CLASSES_PER_TASK):
            idx = (y_tr == c).nonzero()[:BUFFER_PER_CLASS, 0]
            buf_x.append(x_tr[idx])
            buf_y.append(y_tr[idx])
    return Result(switches, acc, loss_by_task, step, ev, model)
