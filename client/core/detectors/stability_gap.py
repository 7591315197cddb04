"""Stability gap: a previous task's accuracy falling right after a task switch, and recovering.

De Lange et al., "Continual evaluation for lifelong learning: identifying the stability gap"
(ICLR 2023): when training moves to a new task, the accuracy on earlier tasks collapses for a
while and then (with replay, distillation, ...) largely comes back. Evaluation at task ends
hides it; evaluation every step or every few steps shows it.

The detector reads two kinds of series, both sent by the hook: ``eval/acc/<task>`` (the
accuracy on a held-out set of each task, see ``stethoscope.ContinualEvaluator``) and
``continual/task`` (one point per task switch, at the first step of the new task, sent by
``Monitor.task_switch``). A switch is a boundary in the point stream, so the detector needs
nothing but points and runs the same in the server and offline in a job.
"""

from __future__ import annotations

import dataclasses

from ._base import ChangeLog, Detector, finite, fmt

#: The hook marks each task switch with a point on this series (value: the task's index).
TASK_SERIES = "continual/task"
#: Accuracies on held-out sets, one series per task: ``eval/acc/<task>``.
ACC_PREFIX = "eval/acc/"
#: Open when a previous task's accuracy is more than 10 points below its level just before the
#: switch. A held-out set of 1,000 samples (the evaluator's default cap) measures accuracy with
#: a standard error of at most sqrt(0.25 / 1000) = 0.016, so a 0.10 drop is over 6 standard
#: errors: not evaluation noise. De Lange et al. report gaps of tens of points for experience
#: replay in class-incremental benchmarks (their Fig. 2).
GAP_DROP = 0.10
#: Recovered when the accuracy is back within 5 points (3 standard errors at 1,000 samples) of
#: its level before the switch ...
RECOVER_TOLERANCE = 0.05
#: ... for 3 evaluations in a row, so one lucky evaluation does not end the episode. The
#: recovery step is the first of them.
RECOVER_POINTS = 3
#: Tasks remembered per run; past this the one evaluated longest ago is forgotten.
MAX_TASKS = 256


@dataclasses.dataclass(frozen=True)
class StabilityGapParams:
    """Settings of :class:`StabilityGapDetector`."""

    drop: float = GAP_DROP  #: accuracy below the pre-switch level that opens an alert
    recover_tolerance: float = RECOVER_TOLERANCE  #: back within this of the pre-switch level = recovered
    recover_points: int = RECOVER_POINTS  #: evaluations in a row needed to call it recovered
    task_series: str = TASK_SERIES
    acc_prefix: str = ACC_PREFIX

    def __post_init__(self):
        if not 0 < self.recover_tolerance <= self.drop or self.recover_points < 1:
            raise ValueError("stability_gap: need 0 < recover_tolerance <= drop and recover_points >= 1")
        if not self.acc_prefix.endswith("/"):
            raise ValueError("stability_gap: acc_prefix must end with '/', e.g. 'eval/acc/'")


class StabilityGapDetector(Detector):
    """One alert per task whose accuracy falls after a switch, key: the task's name.

    At a switch (a ``continual/task`` point at step ``s``), every task evaluated before ``s``
    is watched, against its last accuracy before ``s`` (the pre-switch level). An evaluation
    more than ``drop`` below that level opens a warning; its evidence carries the gap so far
    (pre-switch level minus the minimum since the switch). The alert resolves when the
    accuracy is back within ``recover_tolerance`` of the level for ``recover_points``
    evaluations in a row; the resolving change has ``recovered_step`` and ``recovery_steps``
    (from the switch) in its evidence, and ``end_step`` is the recovery step. An episode that
    has not recovered when the next switch comes stays open, judged against the level before
    the switch that opened it: not recovering is forgetting, not a gap that closed.

    The task being learned is not special: its accuracy rises after its own switch, so it
    never opens an alert. Non-finite accuracies are skipped.

        det = StabilityGapDetector()
        state = {}
        det.update(state, [("eval/acc/a", 99, 0.98), ("continual/task", 100, 1.0),
                           ("eval/acc/a", 100, 0.41)])           # -> an open change, key "a"
    """

    name = "stability_gap"
    Params = StabilityGapParams

    def accepts(self, series: str) -> bool:
        return series == self.params.task_series or series.startswith(self.params.acc_prefix)

    def point(self, state: dict, series: str, step: int, value: float, log: ChangeLog) -> None:
        if series == self.params.task_series:
            self._switch(state, step, value, log)
            return
        if not finite(value):
            return
        task = series[len(self.params.acc_prefix) :]
        last = state.setdefault("last", {})
        prev = last.pop(task, None)  # re-inserted: the dict is ordered by last evaluation
        # The last two evaluations: a switch point may come after an evaluation of its own step
        # in a batch (points of one step are in series order), and then needs the one before.
        last[task] = [[step, value], prev[0]] if prev else [[step, value]]
        if len(last) > MAX_TASKS:
            old = next(iter(last))
            del last[old]
            state.get("watch", {}).pop(old, None)
        self._evaluation(state, task, step, value, log)

    def _switch(self, state: dict, step: int, value: float, log: ChangeLog) -> None:
        watch = state.setdefault("watch", {})
        eps = state.get("episodes", {})
        replay = []
        for task, evals in state.get("last", {}).items():
            before = [e for e in evals if e[0] < step]
            if before and task not in eps:
                watch[task] = {
                    "switch": step,
                    "to": value,
                    "pre": before[0][1],
                    "pre_step": before[0][0],
                    "min": before[0][1],
                    "min_step": before[0][0],
                }
            if evals[0][0] >= step:  # an evaluation of the switch's own step, seen first
                replay.append((task, evals[0][0], evals[0][1]))
        for task, s, v in replay:
            self._evaluation(state, task, s, v, log)

    def _evaluation(self, state: dict, task: str, step: int, value: float, log: ChangeLog) -> None:
        w = state.get("watch", {}).get(task)
        if w is None or step < w["switch"]:
            return
        p = self.params
        if value < w["min"]:
            w["min"], w["min_step"] = value, step
        drop = w["pre"] - value
        if drop > p.drop:
            to = fmt(w["to"]) if finite(w["to"]) else "?"
            self.hold(
                state,
                log,
                task,
                step,
                "warning",
                drop,
                f"Accuracy on task {task} dropped by {fmt(drop)} at step {step}, after the switch to task "
                f"{to} at step {w['switch']}. It fell to {fmt(value)} from {fmt(w['pre'])} before the switch: "
                f"a stability gap.",
                {
                    "task": task,
                    "switch_step": w["switch"],
                    "to_task": w["to"],
                    "pre_switch_acc": w["pre"],
                    "pre_switch_step": w["pre_step"],
                    "acc": value,
                    "drop": drop,
                    "gap": w["pre"] - w["min"],
                    "min_acc": w["min"],
                    "min_step": w["min_step"],
                    "threshold": p.drop,
                },
            )
            ev = state["episodes"][task]["evidence"]
            ev.pop("recovered_step", None)
            ev.pop("recovery_steps", None)
        elif self.is_open(state, task):
            if value >= w["pre"] - p.recover_tolerance:
                ep = state["episodes"][task]
                if ep["clear"] == 0:
                    # Final numbers of the episode, in case this starts its recovery.
                    ep["evidence"].update(
                        recovered_step=step,
                        recovery_steps=step - w["switch"],
                        gap=w["pre"] - w["min"],
                        min_acc=w["min"],
                        min_step=w["min_step"],
                    )
                self.clear(state, log, task, step, p.recover_points)
            else:  # between the two thresholds: neither a new low nor recovered
                self.keep(state, task)
                ev = state["episodes"][task]["evidence"]
                ev.pop("recovered_step", None)
                ev.pop("recovery_steps", None)
