"""Continual evaluation: accuracy on every task seen so far, every step or every few.

De Lange et al. (ICLR 2023) show that evaluating previous tasks only at task ends hides the
stability gap: right after a new task starts, accuracy on the old ones collapses and then
recovers. :class:`ContinualEvaluator` keeps a small held-out set per task and evaluates the
model on all of them on a schedule, without disturbing training, sending ``eval/acc/<task>``
and ``eval/loss/<task>``. The server turns these series and the task switches into min-ACC,
WC-ACC, WF^10, WF^100 and per-switch gaps; the ``stability_gap`` detector alerts on them.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from . import _errors

#: Held-out samples kept per task. De Lange et al. evaluate every iteration on subsets of this
#: size; at 1,000 samples an accuracy has a standard error of at most 0.016 (sqrt(0.25/1000)),
#: well below the gaps of tens of points they report.
MAX_SAMPLES = 1000
#: Share of the wall time that evaluation may take when no fixed ``every`` is given. Continual
#: evaluation is what a continual-learning user attaches this for, so it may cost more than
#: the 5% curvature gets; a cheap evaluation (small sets, small model) runs every step.
DEFAULT_BUDGET = 0.25
#: After a new task is added, evaluate every step for this many steps whatever the budget says
#: (the time is paid back later): the gap opens within the first steps of a task (De Lange et
#: al., Fig. 2), and that is what a sparse schedule would miss.
DENSE_AFTER_SWITCH = 20
#: Samples per forward pass of the evaluation (all tasks' sets are evaluated together).
BATCH_SIZE = 4096


class ContinualEvaluator:
    """Evaluates the model on a held-out set of every task seen so far, on a schedule.

    Register it with a monitor (``monitor=``, or ``mon.add_collector(ev)``): on logging
    steps it sends ``eval/acc/<task>`` and ``eval/loss/<task>`` for each task added so far.
    Add a task's held-out set when training on it starts, next to ``mon.task_switch``.

        mon = stethoscope.attach(model, opt, project="continual")
        ev = stethoscope.ContinualEvaluator(model, mon)
        for task, (train_loader, (x_test, y_test)) in enumerate(tasks):
            mon.task_switch(task)
            ev.add_task(task, x_test, y_test)      # kept on the model's device, capped at 1,000
            for x, y in train_loader:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(); loss.backward(); opt.step()
                mon.log(loss=loss)                 # evaluates here

    ``every=N`` evaluates every N calls; by default every call while evaluation stays within
    ``budget`` of the wall time (so every step when it is cheap), and every call for
    ``dense_after_switch`` calls after a new task. Training is left as it was: the modules'
    train/eval modes, the CPU and CUDA random states, BatchNorm statistics (evaluation runs
    in eval mode) and gradients (under ``torch.no_grad``). ``forward(model, inputs) -> logits``
    replaces ``model(inputs)`` (to mask heads, say); ``loss_fn(logits, targets)`` gives the
    loss (cross-entropy by default). Accuracies computed elsewhere go in with :meth:`record`.

    Called directly, ``ev(step)`` returns the values (tensors on the model's device) or None.
    """

    def __init__(
        self,
        model,
        monitor=None,
        *,
        every=None,
        budget=DEFAULT_BUDGET,
        max_samples=MAX_SAMPLES,
        batch_size=BATCH_SIZE,
        loss_fn=None,
        forward=None,
        dense_after_switch=DENSE_AFTER_SWITCH,
        seed=0,
        clock=time.perf_counter,
    ):
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        if every is not None and not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
            raise ValueError(f"every must be a positive int (calls between evaluations) or None; got {every!r}")
        if not (isinstance(budget, (int, float)) and 0 < budget < 1):
            raise ValueError(f"budget must be a share of wall time in (0, 1), e.g. 0.25; got {budget!r}")
        for name, v in (("max_samples", max_samples), ("batch_size", batch_size)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if not (isinstance(dense_after_switch, int) and dense_after_switch >= 0):
            raise ValueError(f"dense_after_switch must be an int >= 0; got {dense_after_switch!r}")
        for name, fn in (("loss_fn", loss_fn), ("forward", forward)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be callable")
        self.model = model
        self.monitor = monitor
        self.every = every
        self.budget = float(budget)
        self.max_samples = max_samples
        self.batch_size = batch_size
        self.loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
        self.forward = forward
        self.dense_after_switch = dense_after_switch
        self.seed = int(seed)
        self._clock = clock
        self._tasks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._packed = None  # all sets concatenated, rebuilt when a task is added
        self._bounds: list = []
        self._calls = 0
        self._dense_left = 0
        self._last_eval_call = None
        self._last_end = None
        self._last_cost = 0.0
        #: Seconds spent evaluating, and seconds between calls outside evaluation (training).
        self.eval_seconds = 0.0
        self.train_seconds = 0.0
        self.evaluations = 0
        if monitor is not None:
            monitor.add_collector(self)

    # -- tasks -------------------------------------------------------------------------
    def add_task(self, task, inputs, targets) -> None:
        """Keep ``(inputs, targets)`` as ``task``'s held-out set and evaluate it from now on.

        At most ``max_samples`` are kept (a fixed random subset); they move to the model's
        device once, here. Adding a task again replaces its set.
        """
        name = _task_name(task)
        if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise ValueError("inputs and targets must be tensors (a held-out set: inputs [N, ...], class indices [N])")
        if targets.dim() != 1 or targets.is_floating_point() or inputs.shape[:1] != targets.shape or len(targets) == 0:
            raise ValueError(
                f"targets must be class indices of shape [N] with N = len(inputs) >= 1; "
                f"got inputs {tuple(inputs.shape)}, targets {tuple(targets.shape)} {targets.dtype}"
            )
        n = len(targets)
        if n > self.max_samples:
            # A generator of our own: the global random state is the user's.
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + len(self._tasks))
            idx = torch.randperm(n, generator=g)[: self.max_samples].sort().values
            inputs, targets = inputs[idx.to(inputs.device)], targets[idx.to(targets.device)]
        device = _device_of(self.model)
        new = name not in self._tasks
        self._tasks[name] = (inputs.detach().to(device), targets.detach().to(device))
        self._packed = None
        if new:
            self._dense_left = self.dense_after_switch

    def _pack(self) -> None:
        xs, ys = zip(*self._tasks.values())
        sizes = [len(y) for y in ys]
        device = ys[0].device
        ids = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
        self._packed = (torch.cat(xs), torch.cat(ys), ids, torch.tensor(sizes, dtype=torch.float32, device=device))
        ends = torch.tensor(sizes).cumsum(0).tolist()
        self._bounds = list(zip([0] + ends[:-1], ends))

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def record(self, task, accuracy, loss=None, step=None) -> None:
        """Send an accuracy (a share in [0, 1]) computed elsewhere as ``eval/acc/<task>``.

        Goes through the monitor at ``step`` (default: the last step logged); the same as
        ``mon.log(step=..., **{"eval/acc/<task>": accuracy})`` without waiting for a log call.
        """
        if self.monitor is None:
            raise ValueError("record() sends through a monitor: pass monitor= when creating the evaluator")
        name = _task_name(task)
        acc = float(accuracy)
        if acc == acc and not 0.0 <= acc <= 1.0:
            raise ValueError(f"accuracy must be a share in [0, 1] (not a percentage); got {acc!r}")
        values = {f"eval/acc/{name}": acc}
        if loss is not None:
            values[f"eval/loss/{name}"] = float(loss)
        send = getattr(self.monitor, "_send_scalars", None)  # a DisabledMonitor has none
        if send is not None:
            from ._monitor import _check_step

            send(getattr(self.monitor, "_last_step", 0) if step is None else _check_step(step), values)

    # -- the collector -----------------------------------------------------------------
    def __call__(self, step=None) -> dict | None:
        if not self._due():
            return None
        started = self._clock()
        try:
            return self.evaluate()
        finally:
            self._ran(started)

    def evaluate(self) -> dict:
        """Evaluate every task now, whatever the schedule says; returns tensors on the device."""
        if not self._tasks:
            return {}
        if self._packed is None:
            self._pack()
        x, y, task_ids, counts = self._packed
        model = self.model
        modes = [(m, m.training) for m in model.modules()]
        device = y.device
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        try:
            model.eval()
            with torch.no_grad():
                # All tasks' sets in one pass: one forward per batch_size samples, not per task
                # (on a small model the per-call overhead is most of the cost).
                logits = [
                    self.forward(model, x[i : i + self.batch_size])
                    if self.forward is not None
                    else model(x[i : i + self.batch_size])
                    for i in range(0, len(y), self.batch_size)
                ]
                logits = logits[0] if len(logits) == 1 else torch.cat(logits)
                n_tasks = len(counts)
                correct = torch.zeros(n_tasks, device=device).index_add_(0, task_ids, (logits.argmax(-1) == y).float())
                accs = correct / counts
                if self.loss_fn is F.cross_entropy:
                    per = F.cross_entropy(logits.float(), y, reduction="none")
                    losses = torch.zeros(n_tasks, device=device).index_add_(0, task_ids, per) / counts
                else:
                    bounds = self._bounds
                    losses = torch.stack([self.loss_fn(logits[a:b], y[a:b]).float() for a, b in bounds])
        finally:
            # ``m.training = t``, not ``m.train(t)``: train() recurses into children, whose
            # own modes may differ from their parent's (a frozen, eval-mode backbone).
            for m, t in modes:
                m.training = t
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, device)
        out = {}
        for i, name in enumerate(self._tasks):
            out[f"eval/acc/{name}"] = accs[i]
            out[f"eval/loss/{name}"] = losses[i]
        self.evaluations += 1
        return out

    collect = __call__

    # -- the schedule --------------------------------------------------------------------
    def _due(self) -> bool:
        now = self._clock()
        if self._last_end is not None:
            self.train_seconds += max(0.0, now - self._last_end)
        self._last_end = now
        n = self._calls
        self._calls = n + 1
        if not self._tasks:
            return False
        if self.every is not None:
            return self._last_eval_call is None or n - self._last_eval_call >= self.every
        if self._dense_left > 0 or self._last_eval_call is None:
            return True
        spent = self.eval_seconds + self._last_cost
        return spent <= self.budget * (self.train_seconds + spent)

    def _ran(self, started: float) -> None:
        if self.every is None and _device_of(self.model).type == "cuda":
            # The adaptive schedule needs the real cost; kernels are asynchronous. One
            # synchronisation per evaluation, only when no fixed ``every`` was given.
            with _errors.swallowed("continual evaluation timing"):
                torch.cuda.synchronize(_device_of(self.model))
        now = self._clock()
        cost = max(0.0, now - started)
        self.eval_seconds += cost
        self._last_cost = cost
        self._last_eval_call = self._calls - 1
        self._last_end = now
        if self._dense_left > 0:
            self._dense_left -= 1

    @property
    def overhead(self) -> float:
        """Share of the measured wall time spent evaluating so far."""
        total = self.train_seconds + self.eval_seconds
        return self.eval_seconds / total if total > 0 else 0.0

    def __repr__(self):
        return f"ContinualEvaluator(tasks={self.tasks}, evaluations={self.evaluations}, overhead={self.overhead:.1%})"


def _task_name(task) -> str:
    if isinstance(task, bool) or not isinstance(task, (int, str)):
        raise ValueError(f"task must be an int or a name, not {type(task).__name__}")
    name = str(task)
    if not name or "/" in name or any(c.isspace() for c in name) or len(name) > 100:
        raise ValueError(
            f"task name {name!r}: use a non-empty name without '/' or spaces (at most 100 "
            f"characters); it becomes the series eval/acc/<task>"
        )
    return name


def _device_of(model) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


__all__ = ["ContinualEvaluator"]
