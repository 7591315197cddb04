"""The monitor: what ``stethoscope.attach`` returns. The hot path lives here.

``log`` does no I/O and reads nothing back from the device: it runs the metric kernels,
concatenates their results into one small tensor, queues it with the host-side numbers
(learning rates, Python floats) and returns; the sender thread copies the tensor to the
host. On a CPU model (one device, no process group) reading a value costs no stall, and each
small kernel costs more than its arithmetic: the metrics are read there at once and travel
as host floats, already finished (norms, ratios), with no packing. Every step carries the
cheap signals; the expensive ones ride on the steps the cost
budget picks (``_budget``). Gradients and updates are seen from optimizer step hooks, so
``log`` may be called before or after ``optimizer.step()`` (the first call decides which).
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
import uuid

import torch

from . import _attention, _errors, _logits, _metrics, _perf, _ranks, _spool
from ._budget import DISTRIBUTED_EVERY, CostBudget
from ._checks import _check_log_args, _check_name, _check_step, _jsonable
from ._metrics import MAX, MEAN, SUM
from .core.wire import MAX_NAME_LENGTH

#: The hot path's guards, made once (a guard holds nothing but its name): see _errors.swallowed.
_IN_POST_STEP = _errors.swallowed("optimizer post-step hook")


class Monitor:
    """Watches one training run; made by ``stethoscope.attach``.

    >>> mon = stethoscope.attach(model, optimizer, project="demo")
    >>> for step, (x, y) in enumerate(loader):
    ...     logits = model(x); loss = F.cross_entropy(logits, y)
    ...     loss.backward(); optimizer.step(); optimizer.zero_grad()
    ...     mon.log(step=step, loss=loss, logits=logits, targets=y)
    >>> mon.close()
    """

    def __init__(
        self,
        model,
        optimizer,
        *,
        run_id: str,
        url: str | None,
        every: int | None,
        sender,
        budget: float = 0.02,
        module_depth: int | None = None,
        update_ratio: bool = True,
        dist=None,
        clock=time.perf_counter,
        charge_sender: bool = False,
        rank_check_every: int | None = None,
        dead_units: bool = False,
        batch_size: int | None = None,
    ):
        self.run_id = run_id
        #: The run's dashboard page, or None offline.
        self.url = url
        if every is None and dist is not None:
            every = DISTRIBUTED_EVERY  # ranks must agree on which steps carry what (see _budget)
        self._budget = CostBudget(budget, every, clock)
        self._clock = clock
        self._sender = sender  # None on ranks that do not send
        self._dist = dist  # (torch.distributed, world size) when ranks are combined
        self._layout = _metrics.ParamLayout(model, module_depth)
        # On a CPU model the cheap signals are read on the host at once (reading costs no
        # stall there) and travel as floats: fewer kernels, no packing, less for the sender.
        self._host = self._layout.device.type == "cpu" and not self._layout._multi_device and dist is None
        self._optimizer = optimizer
        self._update_ratio = update_ratio and optimizer is not None
        self._calls = 0
        self._next_step = 0
        self._last_step = 0
        self._top_step = -1  # the highest step logged by this process
        self._warned_backwards = False
        self._mode = None  # "after" / "before": is log() called after or before optimizer.step()?
        self._pending_grads = None
        self._pending_update = None
        self._snapped = False
        self._post_step = None
        self._collectors: list = []
        self._tasks: dict = {}  # task name -> index, for task_switch
        self.collector_errors = 0
        self._in_collectors = 0.0  # seconds collectors took in the log() in progress
        self._sender_cpu = 0.0  # the sender thread's CPU seconds already charged to the budget
        self._charge_sender = charge_sender and sender is not None
        self._alert_callbacks = sender.watch.callbacks if sender is not None else []
        self._closed = False
        self._lock = threading.Lock()
        self._hooks = []
        if optimizer is not None:
            self._hooks = [
                optimizer.register_step_pre_hook(self._pre_step),
                optimizer.register_step_post_hook(self._post_step_hook),
            ]
        self._lr_names = _lr_names(optimizer)
        self._logits = _logits.LogitStats()
        self._ranks = None  # the replicas' weights compared every rank_check_every calls (_ranks)
        if dist is not None and rank_check_every is not None:
            with _errors.swallowed("rank check setup"):
                params = _ranks.replicated(model, self._layout.params)
                if params:
                    self._ranks = _ranks.RankCheck(params, optimizer, dist[0], dist[1], rank_check_every)
        _attention.set_active(True)  # the first step carries everything
        self._perf = _perf.StepPerf(self._layout.device, batch_size)
        self._dead = None
        if dead_units:
            from ._dead import DeadUnits

            self._dead = DeadUnits(model, self._budget.charge, clock)
            self._dead.active = True

    # -- public API ------------------------------------------------------------------
    def log(self, step=None, loss=None, logits=None, targets=None, **scalars) -> None:
        """Record one training step. Call once per step, after ``loss.backward()``.

        Steps should grow. A step lower than one this process logged before is accepted with
        a warning (once): the server keeps the first value of each step, so values at steps
        it already has are ignored. A job restarted from a checkpoint in a new process is a
        resume, recognised by itself: see ``stethoscope._resume``.
        """
        start = self._clock()
        if self._closed:
            raise ValueError("this monitor is closed; attach a new one to keep logging")
        self._calls += 1
        if step is None:
            step = self._next_step
        elif step.__class__ is not int or step < 0:
            step = _check_step(step)
        top = self._top_step
        if step > top:
            self._top_step = step
        elif step < top and not self._warned_backwards:
            self._warned_backwards = True
            _errors.logger.warning(
                "stethoscope: step %d is lower than step %d, which this process logged before (run %s); the "
                "server keeps the first value of each step, so values at steps it already has are ignored. "
                "Pass growing steps (a job resumed from a checkpoint in a new process is recognised by itself)",
                step,
                top,
                self.run_id,
            )
        self._next_step = step + 1
        self._last_step = step
        if self._mode is None:
            self._mode = "before"  # logged before any optimizer step
        batch = _check_log_args(loss, logits, targets, scalars)
        budget = self._budget
        full = budget.full
        self._in_collectors = 0.0
        # try/except, not ``with _errors.swallowed(...)``: the same guard, a few context-manager
        # calls fewer on every step (see _errors).
        try:
            self._record(step, loss, logits, targets, scalars, full, start, batch)
        except Exception as exc:  # noqa: BLE001 - our bug: reported, never raised into training
            _errors.report("log", exc)
        if self._ranks is not None and self._ranks.due(self._calls):
            with _errors.swallowed("rank check"):
                self._ranks.run(step, self._sender)
        try:
            if self._charge_sender:
                # The background thread's CPU is the hook's too: it takes a core, and the GIL.
                cpu = self._sender.cpu_s
                if cpu != self._sender_cpu:
                    if cpu > self._sender_cpu:
                        budget.charge(cpu - self._sender_cpu)
                    self._sender_cpu = cpu
            budget.step_done(start, self._clock(), full, self._in_collectors)
        except Exception as exc:  # noqa: BLE001
            _errors.report("cost budget", exc)
        full = budget.full
        _attention.set_active(full)
        if self._dead is not None:
            self._dead.active = full

    def event(self, kind: str, *, step=None, message: str = "", **info) -> None:
        """Record an event (``"task_switch"``, ``"checkpoint"``, ``"note"``...) on the step axis.

        ``step`` defaults to the step in progress: the one the next ``log()`` records (one more
        than the last step logged, 0 before the first). ``log()`` closes a step, so an event
        raised while a step runs (a corrupted batch seen before ``log(step=300)``) lands at
        that step, 300. For an event about a step already logged (a checkpoint saved after
        ``log(step=300)``) pass ``step=300``. The rest of ``info`` is stored as JSON.

        >>> mon.event("corrupted_batch", message="NaN in batch 17")   # before mon.log(step=step)
        >>> mon.event("checkpoint", step=step, path=path)             # after mon.log(step=step)
        """
        if not isinstance(kind, str) or not kind or len(kind) > MAX_NAME_LENGTH:
            raise ValueError(f"event kind must be a non-empty string of at most {MAX_NAME_LENGTH} characters")
        message = str(message)
        step = self._next_step if step is None else _check_step(step)
        try:
            info = json.loads(json.dumps(info, default=_jsonable, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"event info must be JSON-serialisable: {exc}") from None
        if self._sender is not None:
            self._sender.put(
                (
                    "event",
                    {
                        "key": uuid.uuid4().hex,
                        "step": step,
                        "kind": kind,
                        "message": message,
                        "info": info,
                        "wall": time.time(),
                    },
                )
            )

    def task_switch(self, task, step=None) -> None:
        """Training on ``task`` (an int or a name) starts at ``step``, by default the next step logged.

        Sends a ``task_switch`` event with ``{"task": task, "index": i}`` and a point
        ``continual/task = i`` at that step: the event is for people and the continual summary,
        the point puts the boundary in the point stream, where the incremental stability-gap
        detector sees it (detectors read points only). ``i`` is ``task`` when it is an int, else
        the order in which this monitor first saw the name (0, 1, ...). Call it before the new
        task's first training step; evaluations at ``step`` and later count as after the switch.

        >>> for task, loader in enumerate(task_loaders):
        ...     mon.task_switch(task)
        ...     for x, y in loader: ...
        """
        if self._closed:
            raise ValueError("this monitor is closed; attach a new one to keep logging")
        if isinstance(task, bool) or not isinstance(task, (int, str)) or task == "":
            raise ValueError(f"task must be an int or a non-empty string, not {task!r}")
        step = self._next_step if step is None else _check_step(step)
        index = task if isinstance(task, int) else self._tasks.setdefault(task, len(self._tasks))
        self.event("task_switch", step=step, task=task, index=index)
        self._send_scalars(step, {"continual/task": index})

    def add_collector(self, fn) -> None:
        """Call ``fn(step) -> dict[str, float | tensor] | None`` on every logging step.

        Its values are sent as series under the names it returns (slash paths, such as
        ``hessian/trace``). An exception in ``fn`` is logged and counted in
        ``stethoscope/collector_errors``, never raised into the training loop.
        """
        if not callable(fn):
            raise ValueError("add_collector takes a callable fn(step) -> dict of name: value")
        self._collectors.append(fn)

    def watch_curvature(self, model, loss_fn=None, batch=None, **options):
        """Send ``hessian/*`` series (trace, its standard error, lambda_max, 2/lr, HVPs,
        seconds) from estimates on a fixed ``batch=(inputs, targets)`` or ``closure=``, charged
        within 5% of the wall time by default (their own time and the slowdown after them; the
        first estimate and, near 2/lr, an overdraft of up to six estimates come on top until
        repaid; see the README for the measured cost); ``options`` go to
        ``stethoscope.curvature.CurvatureMonitor``, which this returns.

        >>> mon.watch_curvature(model, F.cross_entropy, batch=(x_fixed, y_fixed))
        """
        from .curvature import CurvatureMonitor

        options.setdefault("optimizer", self._optimizer)
        curvature = CurvatureMonitor(model, loss_fn, batch, **options)
        self.add_collector(curvature)
        return curvature

    def on_alert(self, fn) -> None:
        """Call ``fn(alerts)`` from the sender thread with this run's alerts (the server's dicts)
        as they open or escalate: from the hook's detectors at the step that raised them
        (``"source": "hook"``, offline too), else from the server's reply; each episode once,
        a consequence with its root in ``cause`` (see ``stethoscope._watch``). The hook's
        detectors run only while a callback is registered: the first one has them catch up on
        the last ``_watch.MAX_BACKLOG`` records first."""
        if not callable(fn):
            raise ValueError("on_alert takes a callable fn(alerts)")
        self._alert_callbacks.append(fn)

    def _send_scalars(self, step: int, values: dict) -> None:
        """Host numbers for ``step`` outside the log() cadence (framework adapters use it)."""
        if self._sender is not None and values:
            names = list(values)
            for n in names:
                _check_name(n)
            self._sender.put(
                ("points", step, time.time(), (), (), None, None, names, [float(values[n]) for n in names])
            )

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until what was logged so far is sent (or spooled); True if it finished in time."""
        return self._sender.flush(timeout) if self._sender is not None else True

    @property
    def overhead(self) -> float:
        """Share of the step time (between ``log`` calls) the hook has spent so far: ``log``
        and its optimizer-step hooks on the training thread, and the CPU time of its background
        thread (detectors, batching, the spool); not collectors (curvature and continual
        evaluation keep budgets of their own)."""
        return self._budget.overhead

    @property
    def detector_errors(self) -> int:
        """Failures of the hook's detectors (bugs): logged once, counted, never raised."""
        return self._sender.watch.errors if self._sender is not None else 0

    @property
    def dropped(self) -> int:
        """Records dropped: the queue was full, or the disk and the spool's memory fallback were."""
        return self._sender.dropped + self._sender.spool_dropped if self._sender is not None else 0

    def close(self, status: str = "finished", timeout: float = 10.0) -> None:
        """Stop monitoring: remove the hooks, send what is left (up to ``timeout`` s), mark the run."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for h in self._hooks:
            h.remove()
        if self._dead is not None:
            self._dead.remove()
        self._layout.release_snapshot()
        _attention.set_active(False)
        _attention.take()
        from . import _attach

        _attach.forget(self)
        if self._sender is not None:
            self._sender.put(("status", status))
            self._sender.close(timeout)
            message = _close_message(self.run_id, status, self._sender)
            if message:
                import sys

                print(message, file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close("failed" if exc_type is not None else "finished")

    # -- optimizer hooks -------------------------------------------------------------
    def _pre_step(self, optimizer, args, kwargs):
        clock = self._clock
        t0 = clock()
        try:
            mode = self._mode
            if mode is None:
                mode = self._mode = "after"
            if mode == "after":
                full = self._budget.full
                self._pending_grads = (full, self._grads(full))
                if full:
                    self._snap()
            elif self._post_step is not None:
                self._snap()
        except Exception as exc:  # noqa: BLE001 - our bug: reported, never raised into training
            _errors.report("optimizer pre-step hook", exc)
        self._budget.charge(clock() - t0)

    def _snap(self):
        if self._update_ratio:
            self._layout.take_snapshot()
            self._snapped = True

    def _post_step_hook(self, optimizer, args, kwargs):
        if not self._snapped:
            return
        t0 = self._clock()
        with _IN_POST_STEP:
            self._snapped = False
            L = self._layout
            stats = L.update_host() if self._host else L.update_stats()
            if self._mode == "after":
                self._pending_update = stats
            elif self._post_step is not None and stats is not None:
                step, self._post_step = self._post_step, None
                if self._host:
                    self._emit(step, [], [], [], list(L.update_names), stats)
                else:
                    self._emit(step, [stats], [L.update_names], [L.update_ops], [], [])
        self._budget.charge(self._clock() - t0)

    # -- the record ------------------------------------------------------------------
    def _record(self, step, loss, logits, targets, scalars, full, start=None, batch=None):
        host = self._host
        host_names, host_values = [], []
        if start is not None:
            try:
                self._perf.record(start, batch, host_names, host_values)
            except Exception as exc:  # noqa: BLE001
                _errors.report("step time", exc)
        tensors, names, ops = dev = [], [], []
        if loss is not None:
            cls = loss.__class__
            if cls is float:
                host_names.append("loss")
                host_values.append(loss)
            elif cls is _TENSOR or isinstance(loss, torch.Tensor):
                if host and loss.is_cpu:
                    host_names.append("loss")
                    host_values.append(float(loss.item()))  # item(): no detach, no grad warning
                else:
                    tensors.append(loss.detach().reshape(1).float())
                    names.append(("loss",))
                    ops.append((MEAN,))
            else:
                host_names.append("loss")
                host_values.append(float(loss))
        pending = self._pending_grads
        if pending is not None and pending[0] == full:
            grads = pending[1]
        else:  # no optimizer, log() before step(), or the step was skipped
            grads = self._grads(full)
        if grads is not None:
            L = self._layout
            if host:  # host floats, finished (see _grads)
                host_names += L.grad_names if full else L.grad_total_names
                host_values += grads
            elif full:
                _add(dev, grads, L.grad_names, L.grad_ops)
            else:
                _add(dev, grads, L.grad_total_names, L.grad_total_ops)
        update = self._pending_update
        if update is not None:
            L = self._layout
            if host:
                host_names += L.update_names
                host_values += update
            else:
                _add(dev, update, L.update_names, L.update_ops)
            self._pending_update = None
        self._pending_grads = None
        if full and self._mode == "before" and self._update_ratio:
            self._post_step = step
        att = _attention.take()
        if att is not None:
            _add(dev, att, ("attention/max_logit",), (MAX,))
        if self._dead is not None:
            dead = self._dead.take()
            if dead is not None:
                shares, dead_names = dead
                if len(shares) > 1:  # a model split over devices: one tensor, on the device of the rest
                    dv = tensors[0].device if tensors else shares[0].device
                    shares = torch.cat([t.to(dv, non_blocking=True) for t in shares])
                else:
                    shares = shares[0]
                _add(dev, shares, dead_names, (MEAN,) * len(dead_names))
        opt = self._optimizer
        if opt is not None:
            for name, group in zip(self._lr_names, opt.param_groups):
                lr = group["lr"]
                if lr.__class__ is float:
                    host_names.append(name)
                    host_values.append(lr)
                else:
                    _add_value(name, lr, dev, host_names, host_values)
        if scalars:
            for name, v in scalars.items():
                _add_value(name, v, dev, host_names, host_values)
        # Collectors keep budgets of their own (curvature, continual evaluation): called every
        # step under the cost budget, on the full steps under a fixed ``every``.
        if self._collectors and (full or self._budget.every is None):
            t0 = self._clock()
            for fn in self._collectors:
                self._collect(fn, step, dev, host_names, host_values)
            self._in_collectors = self._clock() - t0
        job = None
        if logits is not None:
            if host and logits.is_cpu:
                if full:
                    lnames, lvalues = self._logits.host(logits, targets)
                    host_names += lnames
                    host_values += lvalues
                else:
                    host_names += _logits.EXTREME_NAMES
                    host_values += _logits.extremes_host(logits)
            else:
                job = (logits, targets, full)
        self._emit(step, tensors, names, ops, host_names, host_values, job)

    def _grads(self, full):
        """This step's gradient statistics: a tensor (``full``: per module), or on the host
        path (a CPU model) finished host floats: every kernel costs more than its arithmetic
        on a small CPU model, and reading a value there costs no stall."""
        if not self._host:
            return self._layout.grad_stats(full)
        return self._layout.grad_host() if full else self._layout.grad_total_host()

    def _collect(self, fn, step, dev, host_names, host_values):
        errors = self.collector_errors
        try:
            out = fn(step)
            if out:
                for name, v in out.items():
                    _check_name(name)
                    _add_value(name, v, dev, host_names, host_values)
        except Exception as exc:  # noqa: BLE001 - the collector is not our code
            self.collector_errors += 1
            if self.collector_errors == 1:
                _errors.logger.warning("stethoscope: collector %r raised %r (counted, training continues)", fn, exc)
        if self.collector_errors != errors:
            host_names.append("stethoscope/collector_errors")
            host_values.append(float(self.collector_errors))

    def _emit(self, step, tensors, names, ops, host_names, host_values, logit_job=None):
        """Pack the step's device values into one tensor, start its copy to the host, queue it.

        On CUDA the logit statistics, the packing and the copy run on a side stream that waits
        for the training stream but is never waited for by it, nor by the host: the sender
        thread waits on the copy's event. Tensors the side stream reads are marked with
        ``record_stream`` so the caching allocator does not hand their memory to the training
        stream before the side stream is done with them.
        """
        if not tensors and logit_job is None:  # host numbers only (a CPU model's cheap step)
            if self._sender is not None:
                self._sender.put_points(("points", step, time.time(), (), (), None, None, host_names, host_values))
            return
        packed = ready = None
        side = None
        if logit_job is not None and logit_job[0].device.type == "cuda":
            side = self._logits.side_stream(logit_job[0].device)
        elif tensors and tensors[0].device.type == "cuda":
            side = self._logits.side_stream(tensors[0].device)
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(side.device))
            for t in tensors:
                if t.is_cuda:
                    t.record_stream(side)
        with torch.cuda.stream(side) if side is not None else _NO_STREAM:
            if logit_job is not None:
                logits, targets, full = logit_job
                values, lnames, lops = self._logits(logits, targets, full)
                if side is not None:
                    logits.record_stream(side)
                    if targets is not None and targets.is_cuda:
                        targets.record_stream(side)
                tensors.append(values)
                names.append(lnames)
                ops.append(lops)
            if tensors:
                packed = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
                names = sum(names, ())
                ops = sum(ops, ())
                if self._dist is not None:
                    dist, world = self._dist
                    out = packed.new_empty(world * packed.numel())
                    dist.all_gather_into_tensor(out, packed)
                    packed = out.view(world, -1)
                if packed.device.type != "cpu":
                    host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
                    host.copy_(packed, non_blocking=True)
                    ready = torch.cuda.Event() if packed.device.type == "cuda" else None
                    if ready is not None:
                        ready.record()  # on the side stream: the sender thread waits on it
                    packed = host
            else:
                names = ops = ()
        if self._sender is not None:
            self._sender.put(("points", step, time.time(), names, ops, packed, ready, host_names, host_values))


_NO_STREAM = contextlib.nullcontext()
_TENSOR = torch.Tensor


def _close_message(run_id: str, status: str, sender) -> str | None:
    """What the user must know at close: what was lost and why, and where the rest waits."""
    lost = []
    if sender.dropped:
        lost.append(f"{sender.dropped} because the queue was full (the sender fell behind)")
    if sender.spool_dropped:
        lost.append(
            f"{sender.spool_dropped} because the spool disk was full while the server was unreachable "
            f"(memory holds the newest {_spool.MEMORY_FALLBACK_ENTRIES} entries, and only while the job runs)"
        )
    parts = []
    if lost:
        parts.append(f"{sender.dropped + sender.spool_dropped} records (steps or events) were lost: " + "; ".join(lost))
    if sender.status_lost:
        parts.append(f"its final status ({status!r}) could not be saved")
    where = sender.spool_path
    if sender.unsent and where is not None:
        hint = f" --server {sender.transport.base_url}" if sender.transport else ""
        upload = f"in {where}; upload it with `stethoscope sync {where}{hint}`"
        if not parts:
            return f"stethoscope: run {run_id} is saved {upload}"
        parts.append(f"what was kept is {upload}")
    if not parts:
        return None
    return f"stethoscope: run {run_id}: " + "; ".join(parts)


def finish_values(names, ops, packed) -> list[float]:
    """Host side of a record (the sender thread): combine ranks, then squares to norms."""
    if ops and ops[0] == _ranks.OP:
        return _ranks.summarise(packed)  # the replicas' checksums, compared (None: not sent)
    if packed.dim() == 2:
        rows = packed.tolist()
        values = []
        for j, op in enumerate(ops):
            col = [r[j] for r in rows]
            if op == SUM:
                values.append(math.fsum(col))
            elif op == MAX:
                values.append(math.nan if any(c != c for c in col) else max(col))
            else:
                values.append(math.fsum(col) / len(col))
    else:
        values = packed.tolist()
    return _metrics.finish(names, values)


def _lr_names(optimizer):
    if optimizer is None:
        return []
    groups = optimizer.param_groups
    if len(groups) == 1:
        return ["lr"]
    return [f"lr/{g.get('name', i)}" for i, g in enumerate(groups)]


def _add(dev, t, names, ops):
    """A device tensor of the record, with its names and reductions (``dev``: the record's
    [tensors, names, ops])."""
    dev[0].append(t)
    dev[1].append(names)
    dev[2].append(ops)


def _add_value(name, v, dev, host_names, host_values):
    if isinstance(v, torch.Tensor):
        _add(dev, v.detach().reshape(1).float(), (name,), (MEAN,))
    else:
        host_names.append(name)
        host_values.append(float(v))
