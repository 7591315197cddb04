"""Continual-evaluation metrics of one run (De Lange et al., ICLR 2023), as pure functions.

Inputs: the ``eval/acc/<task>`` series (accuracy on each task's held-out set) and the task
switches (``task_switch`` events: training on ``task`` starts at ``step``). Outputs, at
every evaluation step ``t`` and as the run's current values:

- min-ACC(t): mean over previous tasks of the minimum accuracy after the task was learned
  (evaluations at or after the switch that ended its training, up to ``t``);
- WC-ACC(t) = (1/k) acc_current(t) + (1 - 1/k) min-ACC(t), with k the number of tasks seen;
- WF^w(t): mean over tasks of the largest drop a_i - a_j (i before j) between two of the
  task's evaluations at most ``w - 1`` evaluations apart, up to ``t`` (w = 10 and 100);
- per switch and previous task: the gap (accuracy just before the switch minus the minimum
  before the next switch) and the recovery time (steps from the switch to the first of
  ``recover_points`` evaluations in a row, after the minimum, back within ``recover_tolerance``
  of the pre-switch level; 0 when the accuracy never left that band; the same rule and
  defaults as the stability-gap detector).

Computed on read, not stored at ingest. Why:

- The metrics depend on which task is current at each evaluation, and that comes from events,
  which travel on their own endpoint; a spooled run synced later, or a batch retried, can bring
  points before the events that place them. Series written at ingest would then be wrong and
  need rewriting; a read sees everything stored.
- Ingest stays as cheap as it is: no state rows, no derived points, no extra queries in the
  transaction (the alert, which must fire while the run goes, comes from the incremental
  ``stability_gap`` detector on ingest).
- The cost on read is one pass over the accuracy points, O(evaluations x tasks): accuracy
  series are sparse next to training series (a few thousand evaluations per task).

Non-finite accuracies are data in the store but carry no accuracy: they are skipped here.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections import deque

from stethoscope.core.detectors.stability_gap import ACC_PREFIX, RECOVER_POINTS, RECOVER_TOLERANCE, TASK_SERIES

from .extremes import Extremes, bucket_of, emit_all

__all__ = [
    "ACC_PREFIX",
    "TASK_SERIES",
    "Summary",
    "Switch",
    "compute",
    "downsample",
    "run_summary",
    "segments",
    "switch_gaps",
    "switches_from_events",
    "task_of",
    "wf_name",
]

#: The windows of WF^w: 10 evaluations for short-lived drops, 100 for longer ones (the two
#: windows De Lange et al. report).
WINDOWS = (10, 100)
#: Names of the derived series in the summary.
MIN_ACC, WC_ACC = "continual/min_acc", "continual/wc_acc"


def wf_name(w: int) -> str:
    return f"continual/wf{w}"


@dataclasses.dataclass(frozen=True)
class Switch:
    """Training on ``task`` starts at ``step`` (evaluations at ``step`` and later are after it)."""

    step: int
    task: str


def switches_from_events(events: list[dict]) -> list[Switch]:
    """Task switches from the run's ``task_switch`` events (``info["task"]``), in step order."""
    out = []
    for e in events:
        if e.get("kind", "task_switch") == "task_switch" and "task" in (e.get("info") or {}):
            out.append(Switch(int(e["step"]), str(e["info"]["task"])))
    return sorted(out, key=lambda s: s.step)


def segments(switches: list[Switch]) -> list[Switch]:
    """Switches with repeats of the same task merged (a resumed job announces its task again)."""
    out: list[Switch] = []
    for s in sorted(switches, key=lambda s: s.step):
        if out and out[-1].step == s.step:
            out[-1] = s  # two switches at one step: the later one stands
            if len(out) > 1 and out[-2].task == s.task:
                out.pop()
        elif not out or out[-1].task != s.task:
            out.append(s)
    return out


@dataclasses.dataclass
class Summary:
    tasks: list[str]
    switches: list[dict]
    current: dict
    #: name -> (steps, values); a value is absent where the metric is not defined yet.
    series: dict[str, tuple[list[int], list[float]]]


def compute(
    acc: dict[str, list[tuple[int, float]]],
    switches: list[Switch],
    windows: tuple[int, ...] = WINDOWS,
    recover_tolerance: float = RECOVER_TOLERANCE,
    recover_points: int = RECOVER_POINTS,
) -> Summary:
    """Every metric of the run from its accuracy series (task -> [(step, accuracy)]) and switches."""
    acc = {t: sorted((s, v) for s, v in pts if v - v == 0) for t, pts in acc.items()}
    segs = segments(switches)
    seg_steps = [s.step for s in segs]
    order = [s.task for s in segs]
    tasks = list(dict.fromkeys(order + sorted(t for t in acc if t not in order)))

    # learned[t]: the step of the switch that ended the task's first training segment.
    learned: dict[str, int] = {}
    for a, b in zip(segs, segs[1:]):
        learned.setdefault(a.task, b.step)

    events = sorted((s, t, v) for t, pts in acc.items() for s, v in pts)
    mins: dict[str, float] = {}
    latest: dict[str, float] = {}
    wf = {w: _Windowed(w) for w in windows}
    series: dict[str, tuple[list[int], list[float]]] = {n: ([], []) for n in (MIN_ACC, WC_ACC, *map(wf_name, windows))}
    seen_count = _SeenCounter(segs)
    current_vals: dict = {}
    i = 0
    while i < len(events):
        step = events[i][0]
        cur = _current(segs, seg_steps, step)
        while i < len(events) and events[i][0] == step:
            _, t, v = events[i]
            i += 1
            latest[t] = v
            if t in learned and step >= learned[t] and t != cur:
                mins[t] = min(mins.get(t, math.inf), v)
            for w in windows:
                wf[w].add(t, v)
        prev = [t for t in mins if t != cur]
        min_acc = sum(mins[t] for t in prev) / len(prev) if prev else None
        k = seen_count.at(step)
        a_cur = latest.get(cur) if cur is not None else None
        wc_acc = None
        if a_cur is not None and k >= 1:
            if k == 1:
                wc_acc = a_cur
            elif min_acc is not None:
                wc_acc = a_cur / k + (1 - 1 / k) * min_acc
        _append(series, MIN_ACC, step, min_acc)
        _append(series, WC_ACC, step, wc_acc)
        for w in windows:
            _append(series, wf_name(w), step, wf[w].value())
        current_vals = {
            "step": step,
            "task": cur,
            "k": k,
            "acc": a_cur,
            "min_acc": min_acc,
            "wc_acc": wc_acc,
            **{f"wf{w}": wf[w].value() for w in windows},
        }
    if not current_vals:
        current_vals = {
            "step": None,
            "task": order[-1] if order else None,
            "k": len(set(order)),
            "acc": None,
            "min_acc": None,
            "wc_acc": None,
            **{f"wf{w}": None for w in windows},
        }
    return Summary(tasks, switch_gaps(acc, segs, recover_tolerance, recover_points), current_vals, series)


def switch_gaps(
    acc: dict[str, list[tuple[int, float]]],
    segs: list[Switch],
    recover_tolerance: float = RECOVER_TOLERANCE,
    recover_points: int = RECOVER_POINTS,
) -> list[dict]:
    """Per switch: each previous task's pre-switch level, minimum, gap and recovery time.

    The previous tasks of a switch at step ``s`` are those evaluated before ``s`` (other than
    the task being switched to); the pre-switch level is the last evaluation before ``s``, the
    minimum is over evaluations in ``[s, next switch)``. ``gap`` and ``recovery_steps`` of the
    switch are those of the task with the largest gap.
    """
    out = []
    for j, sw in enumerate(segs):
        end = segs[j + 1].step if j + 1 < len(segs) else None
        prev_task = segs[j - 1].task if j > 0 else None
        rows = []
        for t, pts in acc.items():
            if t == sw.task:
                continue
            before = [p for p in pts if p[0] < sw.step]
            during = [p for p in pts if p[0] >= sw.step and (end is None or p[0] < end)]
            if not before or not during:
                continue
            pre_step, pre = before[-1]
            min_step, low = min(during, key=lambda p: (p[1], p[0]))
            level = pre - recover_tolerance
            if low >= level:  # no gap to recover from
                rec, steps = None, 0
            else:
                rec = _recovery([p for p in during if p[0] > min_step], level, recover_points)
                steps = None if rec is None else rec - sw.step
            rows.append(
                {
                    "task": t,
                    "pre_step": pre_step,
                    "pre_acc": pre,
                    "min_acc": low,
                    "min_step": min_step,
                    "gap": pre - low,
                    "recovered": steps is not None,
                    "recovered_step": rec,
                    "recovery_steps": steps,
                }
            )
        worst = max(rows, key=lambda r: r["gap"], default=None)
        out.append(
            {
                "step": sw.step,
                "task": sw.task,
                "from_task": prev_task,
                "gap": worst["gap"] if worst else None,
                "gap_task": worst["task"] if worst else None,
                "recovery_steps": worst["recovery_steps"] if worst else None,
                "previous": rows,
            }
        )
    return out


def _recovery(during: list[tuple[int, float]], level: float, points: int) -> int | None:
    """The first step of ``points`` evaluations in a row at or above ``level`` (None if none)."""
    run_start, run = None, 0
    for s, v in during:
        if v >= level:
            if run == 0:
                run_start = s
            run += 1
            if run >= points:
                return run_start
        else:
            run = 0
    return None


class _Windowed:
    """WF^w as evaluations arrive: per task, the largest drop within ``w`` consecutive
    evaluations so far (a monotone deque of the last ``w - 1`` values gives each new value's
    window maximum in O(1) amortised); the value is the mean over tasks evaluated."""

    def __init__(self, w: int) -> None:
        self.w = w
        self.best: dict[str, float] = {}
        self._win: dict[str, deque] = {}
        self._n: dict[str, int] = {}

    def add(self, task: str, v: float) -> None:
        q = self._win.setdefault(task, deque())  # (index, value), values decreasing
        n = self._n.get(task, 0)
        while q and q[0][0] <= n - self.w:
            q.popleft()
        drop = q[0][1] - v if q else 0.0
        self.best[task] = max(self.best.get(task, 0.0), drop)
        while q and q[-1][1] <= v:
            q.pop()
        q.append((n, v))
        self._n[task] = n + 1

    def value(self) -> float | None:
        return sum(self.best.values()) / len(self.best) if self.best else None


class _SeenCounter:
    """k(t): distinct tasks switched to at or before ``t``."""

    def __init__(self, segs: list[Switch]) -> None:
        self._steps: list[int] = []
        self._counts: list[int] = []
        seen: set[str] = set()
        for s in segs:
            seen.add(s.task)
            self._steps.append(s.step)
            self._counts.append(len(seen))

    def at(self, step: int) -> int:
        i = bisect.bisect_right(self._steps, step)
        return self._counts[i - 1] if i else 0


def _current(segs: list[Switch], seg_steps: list[int], step: int) -> str | None:
    i = bisect.bisect_right(seg_steps, step)
    return segs[i - 1].task if i else None


def _append(series: dict, name: str, step: int, value: float | None) -> None:
    if value is not None:
        series[name][0].append(step)
        series[name][1].append(value)


def task_of(series_name: str) -> str | None:
    """``eval/acc/<task>`` -> ``<task>``; None for any other series."""
    return (
        series_name[len(ACC_PREFIX) :]
        if series_name.startswith(ACC_PREFIX) and len(series_name) > len(ACC_PREFIX)
        else None
    )


def downsample(steps: list[int], values: list[float], max_points: int) -> tuple[list[int], list[float], bool]:
    """At most ``max_points`` points: consecutive buckets of points each keep their extremes
    (``extremes.Extremes``: minimum, maximum, first NaN), so a gap's bottom is never averaged away."""
    n = len(steps)
    if n <= max_points:
        return steps, values, False
    # The summary's series are finite (non-finite accuracies are skipped), so a bucket gives at
    # most two points, its minimum and maximum; a NaN would add a third.
    per_bucket = 3 if any(v != v for v in values) else 2
    n_buckets = max(1, max_points // per_bucket)
    buckets: dict[int, Extremes] = {}
    for i in range(n):
        ex = buckets.get(b := bucket_of(i, n, n_buckets))
        if ex is None:
            ex = buckets[b] = Extremes()
        ex.add_point(steps[i], values[i])
    out_s, out_v = emit_all(buckets.values())
    return out_s, out_v, True


# -- reading a run (the only part that touches the database) ----------------------------------


def run_summary(store, run_id: str, max_points: int = 2000) -> dict:
    """The run's summary as the API serves it (``NotFound`` for an unknown run): tasks,
    switches with their gaps, current metrics, and the ``continual/*`` series downsampled to
    ``max_points``. The dashboard can call this in-process instead of reading stored series.

        body = run_summary(app.state.store, "run-1")
        body["current"]["wc_acc"], body["series"]["continual/min_acc"]["steps"]
    """
    from sqlalchemy import select

    from . import runs as _runs
    from .models import Event, Point, Series

    S, PT, E = Series.__table__, Point.__table__, Event.__table__

    def points(sid):
        q = select(PT.c.step, PT.c.value).where(PT.c.series_id == sid).order_by(PT.c.step)
        return [(s, v) for s, v in conn.execute(q) if v is not None]  # NULL is how NaN is stored

    with store.reading() as conn:
        _runs.get_run(conn, run_id)
        acc = {}
        for sid, name in conn.execute(
            select(S.c.id, S.c.name).where(S.c.run_id == run_id, S.c.name.startswith(ACC_PREFIX, autoescape=True))
        ):
            task = task_of(name)
            if task is not None:
                acc[task] = points(sid)
        q = select(E.c.step, E.c.info).where(E.c.run_id == run_id, E.c.kind == "task_switch").order_by(E.c.step, E.c.id)
        switches = switches_from_events([{"step": r.step, "info": r.info or {}} for r in conn.execute(q)])
        if not switches:  # points posted without events: the hook's continual/task series
            sid = conn.execute(select(S.c.id).where(S.c.run_id == run_id, S.c.name == TASK_SERIES)).scalar()
            switches = [Switch(s, str(int(v))) for s, v in points(sid) if v - v == 0] if sid is not None else []
    summary = compute(acc, switches)
    series = {}
    for name, (steps, values) in summary.series.items():
        steps, values, down = downsample(steps, values, max_points)
        series[name] = {"steps": steps, "values": values, "downsampled": down}
    return {
        "run_id": run_id,
        "tasks": summary.tasks,
        "switches": summary.switches,
        "current": summary.current,
        "series": series,
    }
