"""Ground truth for a corpus run, read from the run's own recorded series.

What a scenario meant to do does not decide its labels; what the series show does:

- divergence: the first step whose loss or gradient norm is non-finite or whose gradient has a
  non-finite entry (tagged ``gradual`` or ``sudden`` by the scenario that made it).
- loss_spike: a loss at least ``SPIKE_RATIO`` times its robust baseline (the median of the
  previous ``SPIKE_BASELINE`` finite losses) that also stands out of the loss's own noise: at
  least ``SPIKE_NOISE_RATIO`` times the 90th percentile of the previous ``SPIKE_NOISE_POINTS``.
  (A batch-4 loss is 5x its median every hundred steps or so with nothing wrong; in this corpus
  such healthy excursions reach 3.6x the 90th percentile, injected spikes 5.7x to 15x.)
  Jumping steps less than ``SPIKE_MERGE`` steps apart are one event, at the first. Two kinds
  of jump are not spike events: one that never comes back below the threshold before the run
  goes non-finite, or that comes while the loss of a run that goes non-finite is already above
  its starting level (it is the divergence itself, kept in ``notes``), and one within
  ``SWITCH_STEPS`` of an announced task switch (expected, kept in ``notes``).
  A jump must also rise by ``SPIKE_MIN_RISE`` of the run's starting loss: a converged loss
  moving from 0.001 to 0.005 is no spike. And it must go above the highest loss of the
  previous ``SPIKE_NOISE_POINTS``: a loss back at a level it reached a few dozen steps before
  has not left its own range. (Near zero the 90th percentile says little of that range: the
  class-incremental runs with replay train their current task to 1e-8..1e-2 and a replayed
  batch lifts it to 0.02-0.4 every twenty steps or so.)
- softmax_collapse: the first logit reading at which the SC fraction averaged over the last
  ``SC_READINGS`` readings exceeds ``SC_LEVEL``; the peak of that average is kept in ``notes``
  (runs that hover below the level have no event but a peak of, say, 0.15). In a run that
  goes non-finite, a collapse while the loss is above its starting level is the divergence's
  doing, not an event of its own (kept in ``notes``).
- edge_of_stability: the first measurement with ``hessian/lambda_max >= hessian/two_over_lr``.
- stability_gap: each task switch after which some previous task's accuracy falls more than
  ``GAP_DROP`` below its last value before the switch (before the next switch).
- plateau: a stretch of at least ``PLATEAU_STEPS`` steps in which the loss (geometric mean of
  the last ``PLATEAU_SMOOTH`` points) stays within ``PLATEAU_BAND`` of its starting level (the
  median of its first ``SPIKE_MIN_POINTS``) while the learning rate is at least
  ``PLATEAU_LR_FLOOR`` of its largest value: the run is not learning. The event is
  ``PLATEAU_FROM`` steps into the stretch (the shortest window that can tell), detected by an
  alert raised inside the stretch.
- oscillation: a stretch of at least ``OSC_ALTERNATIONS`` consecutive loss differences that
  change sign at every step, each at least ``OSC_AMPLITUDE`` of the loss (minibatch noise in
  this corpus alternates for at most 19 steps in a row). The event is the stretch's first
  step; an alert up to ``OSC_WINDOW`` steps later detects it.
- overfitting: per held-out loss series (``eval/loss``...), smoothed by a median of 3: it ends
  the run at least ``OVERFIT_END_RISE`` above its minimum, reached before the end, while the
  training loss (median of 50 points) at the end is at most ``OVERFIT_TRAIN`` of its value at
  the minimum. The event is the first evaluation after the minimum that is ``OVERFIT_RISE``
  above it; an alert from the minimum to the end detects it.

- layer_gradients: per module (``grad/norm/<module>``, log10 of the norm, an exact zero taken
  as 1e-30), its level now (median of the last ``LAYER_SMOOTH`` points) against its earlier
  level (median of the ``LAYER_EARLIER`` points before those): ``vanishing`` when it fell by
  ``LAYER_DECADES`` or more while the median change of the other modules did not (it fell
  ``LAYER_DECADES`` more than they did), or when its level is ``LAYER_FAR`` decades or more
  below the median level of the other modules for ``LAYER_FAR_HOLD`` steps; ``exploding``
  the same upwards. A stretch must hold ``LAYER_HOLD`` steps; stretches of one kind less than
  ``LAYER_MERGE`` steps apart are one event, at the first step; an alert from
  ``LAYER_SMOOTH`` steps before it to ``LAYER_WINDOW`` steps after it (or to the end of the
  stretch, if later) detects it.
- rank_drift: the first step at which the two replicas' weights differ at all
  (``truth/replica_max_abs_diff`` > 0, the corpus generator's full comparison of every
  weight); an alert up to ``RANK_WINDOW`` steps later (one check spacing) detects it.

- dead_units: per ``dead/<module>`` series (read every few steps), a stretch of at least
  ``DEAD_HOLD`` readings in a row at ``DEAD_LEVEL`` or more and ``DEAD_RISE`` or more above the
  median of the module's first ``DEAD_EARLY`` readings: units of that layer died during the
  run. The event is the stretch's first reading; stretches of any module that start before
  an earlier event's window ends are that event. An alert from ``DEAD_BEFORE`` steps before
  it to ``DEAD_WINDOW`` steps after it (or the end of the stretch, if later) detects it.
- slow_steps: ``perf/step_ms`` against its baseline (the median of the readings
  ``SLOW_SKIP`` to ``SLOW_SKIP + SLOW_BASE``): a stretch of at least ``SLOW_HOLD`` steps whose
  mean over the last ``SLOW_MEAN`` steps, each capped at ``SLOW_CAP`` times the baseline (a
  checkpoint pause counts as a few slow steps, not as hundreds), is ``SLOW_LABEL_RATIO`` times
  the baseline or more. The event is the stretch's first step; an alert from ``SLOW_MEAN``
  steps before it to ``SLOW_WINDOW`` steps after it (or the end of the stretch) detects it.

An alert of the event's detector raised at a step in ``[lo, hi]`` detects it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

from _detector_scenarios import Event

SPIKE_RATIO = 5.0
SPIKE_BASELINE = 32
SPIKE_MIN_POINTS = 16  # losses before the baseline is trusted
SPIKE_NOISE_RATIO = 4.0
SPIKE_NOISE_POINTS = 64
SPIKE_NOISE_QUANTILE = 0.9
SPIKE_MERGE = 10
SPIKE_MIN_RISE = 0.05
SPIKE_WINDOW = 10  # an alert raised up to this many steps after the jump detects it
SWITCH_STEPS = 2
SC_READINGS = 3
SC_LEVEL = 0.5
SC_WINDOW = 30
EOS_WINDOW = 200
GAP_DROP = 0.10
DIVERGENCE_WINDOW = 5  # the runs stop 5 steps after the first non-finite value
PLATEAU_SMOOTH = 50
PLATEAU_BAND = 0.05
PLATEAU_STEPS = 400
PLATEAU_FROM = 200
PLATEAU_LR_FLOOR = 0.1
OSC_ALTERNATIONS = 24
OSC_AMPLITUDE = 1e-3
OSC_WINDOW = 100
OVERFIT_SMOOTH = 3
OVERFIT_END_RISE = 0.2
OVERFIT_RISE = 0.1
OVERFIT_TRAIN = 0.9
OVERFIT_TRAIN_POINTS = 50
LAYER_SMOOTH = 9
LAYER_EARLIER = 100
LAYER_DECADES = 2.0
LAYER_FAR = 3.0
LAYER_FAR_HOLD = 200
LAYER_HOLD = 30
LAYER_MERGE = 200
LAYER_WINDOW = 300
LAYER_ZERO = -30.0
DEAD_LEVEL = 0.5
DEAD_RISE = 0.2
DEAD_EARLY = 5
DEAD_HOLD = 5
DEAD_BEFORE = 10
DEAD_WINDOW = 200
SLOW_SKIP = 20
SLOW_BASE = 50
SLOW_MEAN = 100
SLOW_CAP = 10.0
SLOW_LABEL_RATIO = 1.5
SLOW_HOLD = 50
SLOW_WINDOW = 300


@dataclasses.dataclass
class Labels:
    events: list  # [Event]
    steps: int  # training steps recorded
    notes: dict  # what else the series show (sc_peak, jumps in a divergence, expected jumps)


def _series(points, name):
    return [(s, v) for n, s, v in points if n == name]


def first_nonfinite(points) -> int | None:
    for n, s, v in points:
        if (n in ("loss", "grad/norm") and not math.isfinite(v)) or (n == "grad/nonfinite" and v != 0):
            return s
    return None


def loss_jumps(points) -> list[int]:
    """Steps where a loss jump starts (``SPIKE_RATIO`` x its baseline), one per jump."""
    losses = [(s, v) for s, v in _series(points, "loss") if math.isfinite(v)]
    if len(losses) <= SPIKE_MIN_POINTS:
        return []
    start = statistics.median(v for _, v in losses[:SPIKE_MIN_POINTS])
    out, last = [], None
    for i in range(SPIKE_MIN_POINTS, len(losses)):
        s, v = losses[i]
        base = statistics.median(v for _, v in losses[max(0, i - SPIKE_BASELINE) : i])
        noise = sorted(v for _, v in losses[max(0, i - SPIKE_NOISE_POINTS) : i])
        high = noise[int(SPIKE_NOISE_QUANTILE * (len(noise) - 1))]
        if (
            v >= SPIKE_RATIO * base
            and v >= SPIKE_NOISE_RATIO * high
            and v > noise[-1]
            and v - base >= SPIKE_MIN_RISE * start
        ):
            if last is None or s - last >= SPIKE_MERGE:
                out.append(s)
            last = s
    return out


def _recovers(points, step, bad) -> bool:
    """Whether the loss comes back below the jump's threshold between ``step`` and ``bad``."""
    losses = _series(points, "loss")
    before = [v for s, v in losses if s < step and math.isfinite(v)][-SPIKE_BASELINE:]
    level = SPIKE_RATIO * statistics.median(before)
    return any(v < level for s, v in losses if step < s < bad)


def _running_away(points, step) -> bool:
    """Whether the loss (median of the last 8) is above its starting level at ``step``."""
    losses = [v for s, v in _series(points, "loss") if math.isfinite(v)]
    upto = [v for s, v in _series(points, "loss") if s <= step and math.isfinite(v)]
    return statistics.median(upto[-8:]) > statistics.median(losses[:SPIKE_MIN_POINTS])


def sc_collapse(points) -> tuple[int | None, float]:
    """(first step the SC fraction averaged over ``SC_READINGS`` readings exceeds ``SC_LEVEL``,
    peak of that average)."""
    sc = [(s, v) for s, v in _series(points, "logits/sc_fraction") if math.isfinite(v)]
    first, peak = None, 0.0
    for i in range(SC_READINGS - 1, len(sc)):
        avg = sum(v for _, v in sc[i - SC_READINGS + 1 : i + 1]) / SC_READINGS
        peak = max(peak, avg)
        if first is None and avg > SC_LEVEL:
            first = sc[i][0]
    return first, peak


def eos_crossing(points) -> int | None:
    two = dict(_series(points, "hessian/two_over_lr"))
    return next((s for s, v in _series(points, "hessian/lambda_max") if s in two and v >= two[s]), None)


def stability_gaps(points) -> list[tuple[int, int, list]]:
    """[(switch step, next switch step or end, [tasks whose accuracy fell > GAP_DROP])]."""
    switches = [s for s, _ in _series(points, "continual/task")]
    end = max(s for _, s, _ in points) + 1
    acc: dict = {}
    for n, s, v in points:
        if n.startswith("eval/acc/") and math.isfinite(v):
            acc.setdefault(n[len("eval/acc/") :], []).append((s, v))
    out = []
    for i, sw in enumerate(switches):
        nxt = switches[i + 1] if i + 1 < len(switches) else end
        fell = []
        for task, series in acc.items():
            before = [v for s, v in series if s < sw]
            after = [v for s, v in series if sw <= s < nxt]
            if before and after and before[-1] - min(after) > GAP_DROP:
                fell.append(task)
        if fell:
            out.append((sw, nxt, sorted(fell)))
    return out


def plateaus(points) -> list[tuple[int, int, int]]:
    """[(event step, first step, last step)] of each stretch where the loss sits at its start."""
    losses = [(s, v) for s, v in _series(points, "loss") if math.isfinite(v) and v > 0]
    if len(losses) <= PLATEAU_SMOOTH:
        return []
    lr = dict(_series(points, "lr"))
    lr_max = max((v for v in lr.values() if math.isfinite(v)), default=None)
    start = statistics.median(v for _, v in losses[:SPIKE_MIN_POINTS])
    logs = [math.log(v) for _, v in losses]
    out, since = [], None
    for i in range(PLATEAU_SMOOTH - 1, len(losses) + 1):
        s = losses[i][0] if i < len(losses) else None
        flat = False
        if s is not None:
            level = math.exp(statistics.fmean(logs[i - PLATEAU_SMOOTH + 1 : i + 1]))
            up = lr_max is None or lr.get(s, lr_max) >= PLATEAU_LR_FLOOR * lr_max
            flat = abs(level / start - 1) <= PLATEAU_BAND and up
        if flat and since is None:
            since = losses[i - PLATEAU_SMOOTH + 1][0]
        elif not flat and since is not None:
            last = losses[i - 1][0]
            if last - since >= PLATEAU_STEPS:
                out.append((since + PLATEAU_FROM, since, last))
            since = None
    return out


def oscillations(points) -> list[int]:
    """First steps of stretches where the loss goes up and down at every step."""
    losses = [(s, v) for s, v in _series(points, "loss") if math.isfinite(v)]
    out, run = [], 0
    for i in range(2, len(losses)):
        (_, a), (_, b), (_, c) = losses[i - 2 : i + 1]
        big = min(abs(b - a), abs(c - b)) >= OSC_AMPLITUDE * max(abs(a), abs(b), abs(c))
        run = run + 1 if (b - a) * (c - b) < 0 and big else 0
        if run == OSC_ALTERNATIONS:
            out.append(losses[i - OSC_ALTERNATIONS][0])
    return out


def overfits(points) -> list[tuple[int, int, int, str]]:
    """[(event step, step of the minimum, last step, series)] per held-out loss that overfits."""
    train = [(s, v) for s, v in _series(points, "loss") if math.isfinite(v)]
    names = sorted(
        {n for n, _, _ in points if n in ("eval/loss", "val/loss") or n.startswith(("eval/loss/", "val/loss/"))}
    )
    out = []
    for name in names:
        ev = [(s, v) for s, v in _series(points, name) if math.isfinite(v)]
        sm = [
            (ev[i][0], statistics.median(v for _, v in ev[max(0, i - OVERFIT_SMOOTH + 1) : i + 1]))
            for i in range(len(ev))
        ]
        if len(sm) < 2 * OVERFIT_SMOOTH:
            continue
        b, m = min(sm, key=lambda x: x[1])
        if b >= sm[-1][0] or sm[-1][1] < (1 + OVERFIT_END_RISE) * m:
            continue
        at_min = statistics.median([v for s, v in train if s <= b][-OVERFIT_TRAIN_POINTS:])
        at_end = statistics.median(v for _, v in train[-OVERFIT_TRAIN_POINTS:])
        if at_end > OVERFIT_TRAIN * at_min:
            continue
        rise = next(s for s, v in sm if s > b and v >= (1 + OVERFIT_RISE) * m)
        out.append((rise, b, max(s for _, s, _ in points), name))
    return out


def layer_gradient_events(points) -> list[tuple[int, int, int, str]]:
    """[(event step, lo, hi, "vanishing" | "exploding")] from the per-module gradient norms."""
    mods: dict = {}
    for n, s, v in points:
        if n.startswith("grad/norm/") and math.isfinite(v):
            mods.setdefault(n, {})[s] = math.log10(v) if v > 0 else LAYER_ZERO
    if len(mods) < 2:
        return []
    steps = sorted(set.intersection(*(set(m) for m in mods.values())))
    xs = {n: [m[s] for s in steps] for n, m in mods.items()}
    flags: dict = {"vanishing": [], "exploding": [], "far": []}
    for i in range(LAYER_SMOOTH - 1, len(steps)):
        now = {n: statistics.median(x[i - LAYER_SMOOTH + 1 : i + 1]) for n, x in xs.items()}
        j = i - LAYER_SMOOTH + 1
        change = {}
        if j >= LAYER_EARLIER:
            change = {n: now[n] - statistics.median(x[j - LAYER_EARLIER : j]) for n, x in xs.items()}
        down = up = far = False
        for n in xs:
            others = [v for k, v in now.items() if k != n]
            far = far or now[n] - statistics.median(others) <= -LAYER_FAR
            if change:
                rel = change[n] - statistics.median(v for k, v in change.items() if k != n)
                down = down or (change[n] <= -LAYER_DECADES and rel <= -LAYER_DECADES)
                up = up or (change[n] >= LAYER_DECADES and rel >= LAYER_DECADES)
        for kind, on in (("vanishing", down), ("exploding", up), ("far", far)):
            if on:
                flags[kind].append(steps[i])
    out = []
    for kind, hold in (("vanishing", LAYER_HOLD), ("exploding", LAYER_HOLD), ("far", LAYER_FAR_HOLD)):
        for first, last in _stretches(flags[kind], steps):
            if last - first + 1 >= hold:
                out.append((first, max(0, first - LAYER_SMOOTH), max(last, first + LAYER_WINDOW), kind))
    events: list = []
    for first, lo, hi, kind in sorted(out):
        kind = "vanishing" if kind == "far" else kind
        same = [e for e in events if e[3] == kind and first - e[2] <= LAYER_MERGE]
        if same:
            e = same[-1]
            events[events.index(e)] = (e[0], e[1], max(e[2], hi), kind)
        else:
            events.append((first, lo, hi, kind))
    return events


def dead_unit_events(points) -> list[tuple[int, int, int]]:
    """[(event step, lo, hi)] from the per-module dead shares."""
    mods: dict = {}
    for n, s, v in points:
        if n.startswith("dead/") and math.isfinite(v):
            mods.setdefault(n, []).append((s, v))
    found = []
    for xs in mods.values():
        early = statistics.median(v for _, v in xs[:DEAD_EARLY])
        run: list = []
        for s, v in xs + [(None, 0.0)]:
            if s is not None and v >= DEAD_LEVEL and v >= early + DEAD_RISE:
                run.append(s)
                continue
            if len(run) >= DEAD_HOLD:
                found.append((run[0], run[0] - DEAD_BEFORE, max(run[-1], run[0] + DEAD_WINDOW)))
            run = []
    events: list = []
    for e in sorted(found):
        if events and e[0] <= events[-1][2]:
            events[-1] = (events[-1][0], events[-1][1], max(events[-1][2], e[2]))
        else:
            events.append(e)
    return events


def slow_step_events(points) -> list[tuple[int, int, int]]:
    """[(event step, lo, hi)] from the step times."""
    xs = _series(points, "perf/step_ms")
    if len(xs) < SLOW_SKIP + SLOW_BASE + SLOW_MEAN:
        return []
    base = statistics.median(v for _, v in xs[SLOW_SKIP : SLOW_SKIP + SLOW_BASE])
    capped = [min(v, SLOW_CAP * base) for _, v in xs]
    flagged = []
    for i in range(SLOW_SKIP + SLOW_BASE + SLOW_MEAN, len(xs) + 1):
        if sum(capped[i - SLOW_MEAN : i]) / SLOW_MEAN >= SLOW_LABEL_RATIO * base:
            flagged.append(xs[i - 1][0])
    steps = [s for s, _ in xs]
    return [
        (first, first - SLOW_MEAN, max(last, first + SLOW_WINDOW))
        for first, last in _stretches(flagged, steps)
        if steps.index(last) - steps.index(first) + 1 >= SLOW_HOLD
    ]


def _stretches(flagged: list, steps: list) -> list[tuple[int, int]]:
    """Runs of consecutive recorded steps in ``flagged``: [(first, last)]."""
    pos = {s: i for i, s in enumerate(steps)}
    out: list = []
    for s in flagged:
        if out and pos[s] == pos[out[-1][1]] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


#: The corpus's two-rank runs record the largest difference between the replicas' weights
#: every step; the hook checks every 50 steps (``stethoscope._ranks.RANK_CHECK_EVERY``).
RANK_TRUTH = "truth/replica_max_abs_diff"
RANK_WINDOW = 50


def label(points, divergence_tag: str = "gradual") -> Labels:
    steps = len({s for n, s, _ in points if n == "loss"})
    events, notes = [], {}
    bad = first_nonfinite(points)
    if bad is not None:
        events.append(Event("divergence", bad, 0, bad + DIVERGENCE_WINDOW, divergence_tag))
    switches = [s for s, _ in _series(points, "continual/task")]
    for s in loss_jumps(points):
        if bad is not None and s < bad and (not _recovers(points, s, bad) or _running_away(points, s - 1)):
            notes.setdefault("jumps_in_divergence", []).append(s)
        elif any(0 <= s - sw <= SWITCH_STEPS for sw in switches):
            notes.setdefault("jumps_at_task_switch", []).append(s)
        elif bad is None or s < bad:
            events.append(Event("loss_spike", s, s, s + SPIKE_WINDOW))
    collapse, peak = sc_collapse(points)
    if peak:
        notes["sc_peak"] = round(peak, 3)
    if collapse is not None and bad is not None and _running_away(points, collapse):
        notes["sc_in_divergence"] = collapse  # logits one-hot because the run is blowing up
    elif collapse is not None:
        events.append(Event("softmax_collapse", collapse, 0, collapse + SC_WINDOW))
    crossed = eos_crossing(points)
    if crossed is not None:
        events.append(Event("edge_of_stability", crossed, 0, crossed + EOS_WINDOW))
    for sw, nxt, tasks in stability_gaps(points):
        events.append(Event("stability_gap", sw, sw, nxt - 1, ",".join(tasks)))
    for step, lo, hi in plateaus(points):
        events.append(Event("plateau", step, lo, hi))
    for step in oscillations(points):
        events.append(Event("oscillation", step, step, step + OSC_WINDOW))
    for step, lo, hi, name in overfits(points):
        events.append(Event("overfitting", step, lo, hi, name))
    for step, lo, hi, kind in layer_gradient_events(points):
        events.append(Event("layer_gradients", step, lo, hi, kind))
    drift = next((s for s, v in _series(points, RANK_TRUTH) if v > 0 or v != v), None)
    if drift is not None:
        events.append(Event("rank_drift", drift, drift, drift + RANK_WINDOW))
    for step, lo, hi in dead_unit_events(points):
        events.append(Event("dead_units", step, lo, hi))
    for step, lo, hi in slow_step_events(points):
        events.append(Event("slow_steps", step, lo, hi))
    return Labels(sorted(events, key=lambda e: (e.step, e.detector)), steps, notes)
