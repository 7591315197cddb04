"""``attach``: resolve the settings, name the run, start (lazily) the sender; exit handling."""

from __future__ import annotations

import atexit
import os
import re
import secrets
import sys
import threading
import time
from pathlib import Path

from . import _spool
from ._budget import DEFAULT_BUDGET, check_budget
from ._ranks import RANK_CHECK_EVERY, check_rank_every
from ._sender import Sender
from ._transport import HttpTransport, check_server_url
from ._watch import Watch, detector_set

#: Run ids travel in URL paths: letters, digits, ``.``, ``_`` and ``-``.
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
#: Seconds the exit handler keeps trying to send what is left before leaving it in the spool.
EXIT_FLUSH_TIMEOUT_S = 10.0

_open: set = set()
_open_lock = threading.Lock()
_installed = False
_failed = False


def attach(
    model,
    optimizer=None,
    run: str | None = None,
    project: str = "default",
    server: str | None = None,
    config: dict | None = None,
    every: int | None = None,
    *,
    budget: float = DEFAULT_BUDGET,
    tags=(),
    module_depth: int | None = None,
    update_ratio: bool = True,
    spool_dir: str | os.PathLike | None = None,
    rank_zero_only: bool = True,
    sync_ranks: bool | None = None,
    rank_check_every: int | None = RANK_CHECK_EVERY,
    detectors: dict | bool | None = None,
    clock=None,
    dead_units: bool = False,
    batch_size: int | None = None,
):
    """Attach a training-health monitor to ``model`` and ``optimizer``; returns a ``Monitor``.

    ``run`` names the run (and is its id; a new one is generated when None), ``project``
    groups runs, ``server`` is a URL, ``"offline"`` (spool to disk; upload later with
    ``stethoscope sync``) or None (``$STETHOSCOPE_SERVER``, else offline). ``config`` is the
    run's hyperparameters (stored with the run).

    Every ``log`` sends the cheap signals (loss, learning rates, your scalars, the global
    gradient norm, non-finite gradient and logit counts, max |logit|): divergence and
    non-finite checks see every step. The expensive ones (per-module gradient, weight and
    update norms, the softmax statistics of the logits, the attention max) are spaced so that
    the hook's own work (on the training thread, and its background thread's CPU time) stays
    within ``budget`` of the step time
    (default 2%; the time between ``log`` calls is the step), and come at least every 100
    steps. ``every=N`` measures everything every N steps instead (``every=1``: every step, at
    whatever it costs). ``clock`` (seconds, for tests) times the hook instead of the real clock;
    the background thread's CPU time, which it cannot measure, is then left out of the budget.

    ``module_depth`` groups per-module series at that many name components (default: leaf
    modules, coarser past 64 series). ``update_ratio=False`` saves the copy of the weights the
    update-to-weight ratio needs. Under ``torch.distributed`` every rank must call ``attach``
    and ``log``; values are combined across ranks (``sync_ranks``, one small all-gather per
    logging step) and rank 0 sends (``rank_zero_only``). With ranks combined, every
    ``rank_check_every`` steps (default 50; None: never) the ranks also compare checksums of
    their replicated weights and optimizer state in one more small all-gather: replicas that
    drift apart (a rank that skipped a step, a weight changed outside DDP's all-reduce) show in
    ``ddp/ranks_disagreeing`` and open a critical ``rank_drift`` alert naming the ranks.

    The server's detectors also run in the hook, on each step's values as the background
    thread takes them, once an ``mon.on_alert`` callback is registered (it hears of a NaN at
    its step, online and offline; the server stays the record and an episode is delivered
    once; until then the last 10,000 records wait for them). ``detectors`` sets them as
    the server's per-project settings do (``{"loss_spike": {"threshold": 8.0}}``; checked
    at once); ``detectors=False`` leaves detection to the server.

    Every step also sends its time (``perf/step_ms``, from one ``log`` to the next), samples
    per second (``batch_size``, else the first dimension of ``targets`` or ``logits``) and, on
    CUDA, the allocator's memory in use and peak (``perf/cuda_mem_mb``, ``perf/cuda_mem_peak_mb``).
    ``dead_units=True`` hooks every ``nn.ReLU``/``nn.ReLU6`` module and sends the share of its
    units that output zero on the whole batch (``dead/<module>``) on the expensive steps: one
    read of each activation on those steps, charged to the budget.

    ``STETHOSCOPE_DISABLED=1`` returns a monitor that does nothing.

    >>> with stethoscope.attach(model, optimizer, project="demo", server="http://localhost:8765") as mon:
    ...     for step in range(1000):
    ...         ...
    ...         mon.log(step=step, loss=loss, logits=logits, targets=targets)
    """
    if os.environ.get("STETHOSCOPE_DISABLED", "").strip().lower() in ("1", "true", "yes", "on"):
        return DisabledMonitor()
    import torch

    from ._monitor import Monitor, finish_values

    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"attach() needs the torch.nn.Module you train, not {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer or None, not {type(optimizer).__name__}")
    check_budget(budget, every)
    check_rank_every(rank_check_every)
    if not isinstance(dead_units, bool):
        raise ValueError(f"dead_units must be True or False, not {dead_units!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int (samples per step) or None, not {batch_size!r}")
    if clock is not None and not callable(clock):
        raise ValueError("clock must be a callable returning seconds, like time.perf_counter")
    if not isinstance(project, str) or not RUN_ID_RE.match(project):
        raise ValueError(f"project must be a short name of letters, digits, '.', '_' or '-', not {project!r}")
    if config is not None and not isinstance(config, dict):
        raise ValueError("config must be a dict of the run's hyperparameters")
    if run is not None and (not isinstance(run, str) or not RUN_ID_RE.match(run)):
        raise ValueError(
            f"run must be 1-200 letters, digits, '.', '_' or '-' (it is the run's id in URLs), not {run!r}"
        )
    dset = detector_set(detectors)
    if server is None:
        server = os.environ.get("STETHOSCOPE_SERVER") or "offline"
    server = server if server == "offline" else check_server_url(server)

    rank, world, dist = _distributed()
    generated = run is None
    run_id = run if run is not None else _new_run_id()
    if world > 1 and generated:
        box = [run_id]
        dist.broadcast_object_list(box, src=0)  # one logical run: every rank uses rank 0's id
        run_id = box[0]
    if sync_ranks is None:
        sync_ranks = world > 1
    sends = rank == 0 or not rank_zero_only
    url = None if server == "offline" else f"{server}/runs/{run_id}"
    sender = None
    if sends:
        meta = {
            "project": project,
            "name": run or run_id,
            "config": _json_config(config or {}),
            "tags": [str(t) for t in tags],
        }
        root = Path(spool_dir) if spool_dir is not None else _spool.default_root()
        transport = None if server == "offline" else HttpTransport(server)
        sender = Sender(run_id, meta, root, transport, Watch(dset, run_id, project, []), finish_values)
    mon = Monitor(
        model,
        optimizer,
        run_id=run_id,
        url=url,
        every=every,
        budget=budget,
        sender=sender,
        module_depth=module_depth,
        update_ratio=update_ratio,
        dist=(dist, world) if sync_ranks and world > 1 else None,
        clock=clock if clock is not None else time.perf_counter,
        charge_sender=clock is None,
        rank_check_every=rank_check_every,
        dead_units=dead_units,
        batch_size=batch_size,
    )
    if sends and generated:
        where = url or f"offline (spooled under {root}; upload with `stethoscope sync`)"
        print(f"stethoscope: run {run_id} -> {where}", file=sys.stderr)
    _remember(mon)
    return mon


def _new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def _distributed():
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size(), dist
    except Exception:  # noqa: BLE001 - a broken torch.distributed means: not distributed
        pass
    return 0, 1, None


def _json_config(config: dict) -> dict:
    import json

    from ._checks import _jsonable

    try:
        return json.loads(json.dumps(config, default=_jsonable, allow_nan=False))
    except ValueError:
        raise ValueError("config must be JSON-serialisable (no NaN or infinity)") from None


# -- exit, fork and crash handling ------------------------------------------------------
def _remember(mon) -> None:
    global _installed
    with _open_lock:
        _open.add(mon)
        if not _installed:
            _installed = True
            atexit.register(_close_all)
            os.register_at_fork(after_in_child=_after_fork_in_child)
            previous = sys.excepthook

            def excepthook(tp, value, tb):
                global _failed
                _failed = True  # runs before atexit: the runs this process leaves are "failed"
                previous(tp, value, tb)

            sys.excepthook = excepthook


def forget(mon) -> None:
    with _open_lock:
        _open.discard(mon)


def _close_all() -> None:
    for mon in list(_open):
        try:
            mon.close("failed" if _failed else "finished", timeout=EXIT_FLUSH_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - interpreter shutdown; nothing may escape
            pass


def _after_fork_in_child() -> None:
    # The child has copies of the monitors but not their threads; each sender starts a new
    # thread (and its own spool directory) if the child logs. The lock may have been held.
    global _open_lock
    _open_lock = threading.Lock()
    for mon in list(_open):
        if mon._sender is not None:
            mon._sender.after_fork()


class DisabledMonitor:
    """What ``attach`` returns under ``STETHOSCOPE_DISABLED=1``: every call does nothing."""

    run_id = None
    url = None
    dropped = 0
    collector_errors = 0
    detector_errors = 0
    overhead = 0.0

    def log(self, step=None, loss=None, logits=None, targets=None, **scalars) -> None:
        pass

    def event(self, kind, **info) -> None:
        pass

    def task_switch(self, task, step=None) -> None:
        pass

    def add_collector(self, fn) -> None:
        pass

    def watch_curvature(self, model, loss_fn=None, batch=None, **options) -> None:
        return None

    def on_alert(self, fn) -> None:
        pass

    def flush(self, timeout: float = 10.0) -> bool:
        return True

    def close(self, status: str = "finished", timeout: float = 10.0) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass
