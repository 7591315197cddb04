"""Per-layer gradient health: a module whose gradient vanishes or explodes against the others.

The hook sends the gradient norm of every module (``grad/norm/<module>``); the global norm
hides what happens to one of them. Two failures show only per layer:

- vanishing: a layer's gradient collapses by orders of magnitude -- its units died (a big
  negative bias kills every ReLU of a layer and every layer below it gets exactly zero), its
  weights grew far past a normalisation that follows it, or a deep sigmoid/tanh stack at a
  bad initialisation multiplies the gradient by less than one at every layer (Glorot &
  Bengio 2010), so the first layers get 10^-3 to 10^-6 of what the last ones get from the
  start. AUTOTRAINER (Zhang et al., ICSE 2021) flags vanishing gradients by the ratio of the
  first layers' gradients to the last ones'.
- exploding per layer: one layer's gradient a hundred times its own usual level while the
  rest of the network is unchanged (a layer whose weights shrank under a normalisation that
  follows it: its gradient scales as 1 / its weight norm), which moves the global norm far
  less when the layer is a small share of it.

All gradients shrink together as a run converges and grow together as it diverges; neither
is a per-layer event. So each module is compared with itself *and* with the others at the
same step: its shift (log10 norm now minus its own baseline, a slow average of its earlier
log norms) must pass the threshold both on its own and against the median shift of the other
modules (leave-one-out, so that one module moving never moves its own reference, and a
majority of dead layers does not make the live ones look like they exploded). A deep stack
that vanishes from the start has no earlier level to fall from: a module far below the
median of the others at the same step, for long, is vanishing too.

The state is bounded per module (a few numbers each: points seen, baseline, counters), and
at most ``MAX_MODULES`` modules are followed. Each step is judged once, when every known
module has reported it (or when a later step begins), at a cost of one sort of the modules'
shifts: O(log M) per point.
"""

from __future__ import annotations

import dataclasses
from math import log10

from ._base import ChangeLog, Detector, fmt, median

#: The per-module series the hook sends: ``grad/norm/<module>`` (``grad/norm`` alone is the
#: global norm, the divergence detector's input).
PREFIX = "grad/norm/"
#: Two decades (x100) below or above its own level and below or above the others. The
#: corpus's healthy runs (deep ReLU MLPs, LayerNorm MLPs, CNNs, a transformer; SGD, Adam)
#: move a module by at most ~1 decade against the others over a run; a layer whose units
#: die drops to exactly zero (here: 30 decades), a layer rescaled x300 under a normalisation
#: moves by 2.4 decades.
VANISH_DECADES = 2.0
EXPLODE_DECADES = 2.0
#: Far below the others at the same step, whatever its history: three decades (x1000). A
#: deep sigmoid MLP at PyTorch's default initialisation has its first layers 3-3.5 decades
#: below the median of the others from the first step; the healthy runs of the corpus spread
#: over less than 1.5 decades (a LayerNorm's gain next to a linear layer: ~1 decade).
STATIC_DECADES = 3.0
#: A module's first points build its baseline before it is judged against it (the first
#: steps of a run move gradients by several times: the head's gradient at initialisation is
#: its largest).
LAYER_WARMUP = 20
#: The baseline is the mean log norm of the first points, then an exponential average with
#: this time constant, in points: slow enough that a collapse within a few hundred points
#: stands out against it, fast enough to follow the ~1 decade a layer's relative gradient
#: may drift over a long healthy run. It learns only from points judged normal, each clipped
#: to within ``BASELINE_CLIP`` decades of it: a collapsed layer does not teach its baseline
#: that it is normal.
BASELINE_POINTS = 200
BASELINE_CLIP = 0.5
#: Points a module must be past the threshold before it counts (a minibatch can make one
#: module's gradient 10x smaller for a step or two: a sparse embedding, a batch with few
#: examples of a class). Counted leakily: a point past it adds one, a point short of it takes
#: ``MISS_PENALTY`` away -- a dead layer that a rare batch revives for one step (seen in the
#: corpus: one step in ten) still counts, a module dipping now and then does not.
LAYER_PATIENCE = 10
MISS_PENALTY = 2
#: An explosion is told after 3 points (one wild batch is not enough, three are: the
#: divergence detector's 3-point median): the loss jump it can cause a few steps later is its
#: consequence, and the alert must be open by then to claim it.
EXPLODE_PATIENCE = 3
#: ... and, for a module far below the others since the start (no drop seen), this many: a
#: module designed to start silent (a residual branch behind LayerScale at 1e-6, ReZero at
#: 0) grows out of it within a few hundred steps.
STATIC_PATIENCE = 100
#: A flagged module is back when its shift is within this share of the threshold (half:
#: within one decade when the threshold is two) -- hysteresis: a module hovering at the
#: threshold does not open and close an alert every few steps.
RECOVER_FRACTION = 0.5
#: Points in a row a flagged module must be back before it is no longer flagged, and judged
#: steps in a row with no module flagged before the episode resolves.
LAYER_CLEAR_POINTS = 5
#: A failure that comes back within 200 steps of clearing is the same episode.
LAYER_REJOIN = 200
#: Modules followed per run; a run with more (a model grouped below the hook's 64-series
#: default with ``module_depth``) has the rest ignored, so the state saved with each ingest
#: batch stays bounded (a few numbers per module).
MAX_MODULES = 1024
#: A module needs other modules to be compared with.
MIN_MODULES = 2
#: An exactly zero gradient norm, on the log10 scale (float32's smallest normal is 1e-38; a
#: gradient norm under 1e-30 is no gradient).
ZERO_LOG10 = -30.0

VANISHING, EXPLODING = "vanishing", "exploding"

# Per-module state: [points seen, baseline, vanish count, explode count, far-below count, flags,
# points back while flagged vanishing, ... exploding]
_N, _BASE, _VRUN, _ERUN, _SRUN, _FLAGS, _BACKV, _BACKE = range(8)
_EVER = 1  # flag: the module has had a non-zero gradient
_V, _E = 2, 4  # flags: flagged vanishing / exploding (until it recovers)


@dataclasses.dataclass(frozen=True)
class LayerGradientsParams:
    """Settings of :class:`LayerGradientsDetector`."""

    prefix: str = PREFIX  #: per-module gradient norms: series named prefix + module
    vanish_decades: float = VANISH_DECADES  #: vanishing = fell this many decades, on its own and against the others
    explode_decades: float = EXPLODE_DECADES  #: exploding = rose this many decades, on its own and against the others
    static_decades: float = STATIC_DECADES  #: vanishing = this many decades below the median of the others, for long
    warmup: int = LAYER_WARMUP  #: points of a module before it is judged against its own baseline
    baseline_points: int = BASELINE_POINTS  #: time constant of each module's baseline, in points
    patience: int = LAYER_PATIENCE  #: points past the vanishing threshold before a module counts
    explode_patience: int = EXPLODE_PATIENCE  #: points past the exploding threshold before a module counts (in points)
    static_patience: int = STATIC_PATIENCE  #: points far below the others before a module counts (in points)
    recover_fraction: float = RECOVER_FRACTION  #: a flagged module is back within this share of the threshold
    clear_points: int = LAYER_CLEAR_POINTS
    rejoin_steps: int = LAYER_REJOIN  #: steps after a resolution within which the same episode resumes

    def __post_init__(self):
        if not self.prefix:
            raise ValueError("layer_gradients: prefix must name the per-module series (grad/norm/)")
        if min(self.vanish_decades, self.explode_decades, self.static_decades) <= 0:
            raise ValueError("layer_gradients: the decades thresholds must be > 0")
        if self.warmup < 1 or self.baseline_points < self.warmup:
            raise ValueError("layer_gradients: need warmup >= 1 and baseline_points >= warmup")
        if min(self.patience, self.explode_patience, self.static_patience, self.clear_points) < 1:
            raise ValueError("layer_gradients: need the patiences and clear_points >= 1")


class LayerGradientsDetector(Detector):
    """A layer whose gradient vanishes or explodes against the other layers. Warning.

    Keys: ``vanishing`` and ``exploding`` (one episode each per run, naming every module
    involved: a dead layer zeroes the gradient of every layer below it, one incident). A module
    that has had no gradient at all since the start (unused in the forward pass, or dead from
    initialisation) is told at ``info``.

        det = LayerGradientsDetector(LayerGradientsParams(vanish_decades=3.0))
        state = {}
        changes = det.update(state, [("grad/norm/0", 0, 0.5), ("grad/norm/2", 0, 0.8)])
    """

    name = "layer_gradients"
    Params = LayerGradientsParams

    def __init__(self, params: LayerGradientsParams | None = None) -> None:
        super().__init__(params)
        p = self.params
        rf = p.recover_fraction
        vanish, explode, static = p.vanish_decades, p.explode_decades, p.static_decades
        # thresholds of a module not flagged (the usual case), and of a flagged one (hysteresis)
        tv0, te0, tl0 = vanish * 1.0, explode * 1.0, -static * 1.0
        tv1, te1, tl1 = vanish * rf, explode * rf, -static * rf
        #: what _judge takes from the parameters at every step, worked out once
        self._consts = (
            p.patience,
            p.static_patience,
            p.explode_patience,
            p.clear_points,
            p.baseline_points,
            -rf * vanish,  # away_v, away_e: a flagged module this far from its baseline is away
            rf * explode,
            tv0,
            te0,
            tl0,
            tv1,
            te1,
            tl1,
            -tv0,
        )

    def accepts(self, series: str) -> bool:
        p = self.params.prefix
        return series.startswith(p) and len(series) > len(p)

    def point(self, state: dict, series: str, step: int, value: float, log: ChangeLog) -> None:
        mods = state.get("mods")
        if mods is None:  # (not setdefault: that builds the default at every point)
            mods = state["mods"] = {}
        cur = state.get("cur")
        if cur is not None and step > cur[0]:
            self._judge(state, cur, log)
            cur = None
        if series not in mods:
            if len(mods) >= MAX_MODULES:
                return
            mods[series] = [0, 0.0, 0, 0, 0, 0, 0, 0]
        if cur is None:
            if step <= state.get("judged", -1):
                return  # a module new to this run, at a step already judged
            cur = state["cur"] = [step, {}]
        if value - value == 0.0:  # finite: NaN/inf gradients are the divergence detector's
            cur[1][series] = log10(value) if value > 0 else ZERO_LOG10
        if len(cur[1]) >= len(mods) and "judged" in state:
            # every module known has reported this step (the set of modules is known once a
            # first step has been judged, when the next one began)
            self._judge(state, cur, log)

    def step_points(self, state: dict, step: int, names: tuple, values, idx: tuple, log: ChangeLog) -> None:
        """:meth:`Detector.feed` of one step's points ``names[i]`` at ``values[i]`` for ``i`` in
        ``idx`` (:meth:`DetectorSet.feed_step`, the hook's path), with :meth:`point` inlined
        and its lookups made once a step: the same steps in the same order as ``point`` takes
        them (keep the two in step)."""
        seen = state.get("seen")
        if seen is None:
            seen = state["seen"] = {}
        mods = None
        cur = state.get("cur")
        for i in idx:
            series = names[i]
            last = seen.get(series)
            if last is not None and step <= last:
                continue
            seen[series] = step
            value = float(values[i])
            if mods is None:
                mods = state.get("mods")
                if mods is None:
                    mods = state["mods"] = {}
            if cur is not None and step > cur[0]:
                self._judge(state, cur, log)
                cur = None
            if series not in mods:
                if len(mods) >= MAX_MODULES:
                    continue
                mods[series] = [0, 0.0, 0, 0, 0, 0, 0, 0]
            if cur is None:
                if step <= state.get("judged", -1):
                    continue
                cur = state["cur"] = [step, {}]
            if value - value == 0.0:
                cur[1][series] = log10(value) if value > 0 else ZERO_LOG10
            if len(cur[1]) >= len(mods) and "judged" in state:
                self._judge(state, cur, log)
                cur = None  # (popped from the state)

    # -- one step, every module ----------------------------------------------------------
    def _judge(self, state: dict, cur: list, log: ChangeLog) -> None:
        p = self.params
        state.pop("cur", None)
        step, levels = cur
        state["judged"] = step
        mods = state["mods"]
        if len(levels) < MIN_MODULES:
            for name, x in levels.items():
                self._learn(mods[name], x, normal=True)
            return
        warmup = p.warmup
        # (name, level, module state, shift: level minus its baseline, None in its warm-up)
        rows = []
        shifts = []
        for name, x in levels.items():
            m = mods[name]
            if m[_N] >= warmup:
                sh = x - m[_BASE]
                shifts.append(sh)
                rows.append((name, x, m, sh))
            else:
                rows.append((name, x, m, None))
        # Each module against the median of the others (leave-one-out): that median is one of
        # three values fixed by the sorted values, chosen by which side of the middle one the
        # module sits (see ``_loo_medians``); the same floats as ``_leave_one_out``'s.
        with_rel = len(shifts) >= MIN_MODULES
        if with_rel:
            shifts.sort()
            sp, sa, sb, sc = _loo_medians(shifts)
        lp, la, lb, lc = _loo_medians(sorted(levels.values()))
        # Per-module work of a step, with the parameters and ``_count``/``_learn`` inlined (the
        # same arithmetic in the same order: this runs for every layer at every step).
        (
            patience,
            static_patience,
            explode_patience,
            clear_points,
            baseline_points,
            away_v,
            away_e,
            tv0,
            te0,
            tl0,
            tv1,
            te1,
            tl1,
            ntv0,
        ) = self._consts
        vanishing: list = []
        exploding: list = []
        for name, x, m, s in rows:
            flags = m[_FLAGS]
            if x > ZERO_LOG10:
                flags |= _EVER
            if s is not None and with_rel:
                r = s - (sa if s < sp else sb if s > sp else sc)
            else:
                r = None
            lv = x - (la if x < lp else lb if x > lp else lc)
            if not (flags & (_V | _E) or m[_VRUN] or m[_ERUN] or m[_SRUN]):
                # the usual case, nothing counted nor flagged: if nothing holds now either,
                # every count stays 0 and the point teaches the baseline (below, spelt out)
                if (
                    not lv <= tl0
                    and (r is None or not (s <= ntv0 and (r <= ntv0 or x <= ZERO_LOG10)))
                    and (r is None or not (s >= te0 and r >= te0))
                ):
                    m[_FLAGS] = flags
                    n = m[_N] = m[_N] + 1
                    if n == 1:
                        m[_BASE] = x
                    else:
                        b = m[_BASE]
                        lo = b - BASELINE_CLIP
                        if not x > lo:
                            x = lo
                        hi = b + BASELINE_CLIP
                        if not x < hi:
                            x = hi
                        m[_BASE] = b + (x - b) / (n if n < baseline_points else baseline_points)
                    continue
            fv, fe = flags & _V, flags & _E
            # a flagged module stays flagged down to the looser threshold (hysteresis)
            tv = tv1 if fv else tv0
            te = te1 if fe else te0
            # an exact zero after a non-zero gradient is no gradient at all, whatever the others do
            # (when every layer but the head has died, the others' median died with it)
            if r is None:
                down = up = False
            else:
                down = s <= -tv and (r <= -tv or x <= ZERO_LOG10)
                up = s >= te and r >= te
            low = lv <= (tl1 if fv else tl0)
            if not (down or up or low or fv or fe or m[_VRUN] or m[_ERUN] or m[_SRUN]):
                # the usual case: nothing counted, nothing flagged -- every count stays 0
                m[_FLAGS] = flags
                away = False
            else:
                vrun, erun, srun = m[_VRUN], m[_ERUN], m[_SRUN]
                vrun = vrun + 1 if down else (vrun - MISS_PENALTY if vrun > MISS_PENALTY else 0)
                erun = erun + 1 if up else (erun - MISS_PENALTY if erun > MISS_PENALTY else 0)
                srun = srun + 1 if low else (srun - MISS_PENALTY if srun > MISS_PENALTY else 0)
                if fv:
                    m[_BACKV] = 0 if down or low else m[_BACKV] + 1
                    if m[_BACKV] >= clear_points:
                        flags &= ~_V
                        vrun = srun = 0
                elif vrun >= patience or srun >= static_patience:
                    flags |= _V
                    m[_BACKV] = 0
                if fe:
                    m[_BACKE] = 0 if up else m[_BACKE] + 1
                    if m[_BACKE] >= clear_points:
                        flags &= ~_E
                        erun = 0
                elif erun >= explode_patience:
                    flags |= _E
                    m[_BACKE] = 0
                m[_VRUN], m[_ERUN], m[_SRUN], m[_FLAGS] = vrun, erun, srun, flags
                if flags & (_V | _E):
                    if flags & _V:
                        vanishing.append((name, s, r, lv, m))
                    if flags & _E:
                        exploding.append((name, s, r, lv, m))
                    # a flagged module still away from its baseline does not teach it (a module
                    # flagged only for being far below the others, at its usual level, does)
                    away = s is not None and (s <= away_v or s >= away_e)
                else:
                    away = False
            # _learn(m, x, normal=not (down or up or away)), inlined; the clip to within
            # BASELINE_CLIP of the baseline is min(hi, max(lo, x)) spelt out
            n = m[_N] = m[_N] + 1
            if n == 1:
                m[_BASE] = x
            elif not (down or up or away) or n <= warmup:
                b = m[_BASE]
                lo = b - BASELINE_CLIP
                if not x > lo:
                    x = lo
                hi = b + BASELINE_CLIP
                if not x < hi:
                    x = hi
                m[_BASE] = b + (x - b) / (n if n < baseline_points else baseline_points)
        for key, mods_now in ((VANISHING, vanishing), (EXPLODING, exploding)):
            if mods_now:
                self._hold(state, log, key, step, mods_now, median(list(levels.values())))
            elif self.is_open(state, key):
                self.clear(state, log, key, step, p.clear_points)

    def _learn(self, m: list, x: float, normal: bool) -> None:
        p = self.params
        m[_N] += 1
        if m[_N] == 1:
            m[_BASE] = x
        elif normal or m[_N] <= p.warmup:
            b = m[_BASE]
            x = min(b + BASELINE_CLIP, max(b - BASELINE_CLIP, x))
            m[_BASE] = b + (x - b) / min(m[_N], p.baseline_points)

    def _hold(self, state: dict, log: ChangeLog, key: str, step: int, flagged: list, med: float) -> None:
        p = self.params
        prefix = len(p.prefix)
        if key == VANISHING:
            # worst first: the largest fall (against itself, or below the others when it has
            # no fall to show)
            flagged.sort(key=lambda f: min(f[1] if f[1] is not None else 0.0, f[3]))
            worst = flagged[0]
            score = -min(worst[1] if worst[1] is not None else 0.0, worst[3])
            never = all(not f[4][_FLAGS] & _EVER for f in flagged)
            severity = "info" if never else "warning"
        else:
            flagged.sort(key=lambda f: -f[1])
            worst = flagged[0]
            score, severity = worst[1], "warning"
        name, s, r, lv, m = worst
        names = [f[0][prefix:] for f in flagged]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        norm = 10 ** (m[_BASE] + s) if s is not None else 10 ** (med + lv)
        if key == EXPLODING:
            what = (
                f"The gradient of layer {names[0]} exploded at step {step}. Its norm {fmt(norm)} is "
                f"{fmt(10**s)}x its own usual level {fmt(10 ** m[_BASE])}, {fmt(10**r)}x more than the other "
                "layers' moved."
            )
            advice = (
                "A layer whose weights shrank under a normalisation that follows it, or a loss term "
                "reaching only this layer, does this; the global gradient norm can hide it."
            )
        elif never:
            what = f"Layer {names[0]} has received no gradient at all by step {step}."
            advice = "A module unused in the forward pass, or one whose units are all dead from initialisation."
        elif s is not None and s <= -p.vanish_decades:
            what = (
                f"The gradient of layer {names[0]} vanished at step {step}. Its norm {fmt(norm)} is "
                f"{_times(s)} its own earlier level {fmt(10 ** m[_BASE])}"
                + (f" ({_times(r)} the other layers' change)." if r is not None and r > -12 else ".")
            )
            advice = (
                "Dead units (every ReLU of this layer or one above it off), weights grown far past a "
                "normalisation that follows them, or a saturated activation stop the gradient like this."
            )
        else:
            what = (
                f"The gradient of layer {names[0]} has vanished at step {step}. Its norm {fmt(norm)} is "
                f"{_times(lv)} the median of the other layers'."
            )
            advice = (
                "A deep stack of saturating activations (sigmoid, tanh) at a poor initialisation does this: "
                "use ReLU-family activations, a fan-in initialisation (Kaiming, Xavier), normalisation or "
                "residual connections."
            )
        many = f" Layers involved: {shown}." if len(names) > 1 else ""
        self.hold(
            state,
            log,
            key,
            step,
            severity,
            score,
            what + many + " " + advice,
            {
                "layer": names[0],
                "layers": names[:20],
                "layers_count": len(names),
                "norm": norm,
                "baseline": 10 ** m[_BASE],
                "shift_decades": s,
                "shift_vs_others_decades": r,
                "level_vs_others_decades": lv,
                "vanish_decades": p.vanish_decades,
                "explode_decades": p.explode_decades,
                "static_decades": p.static_decades,
            },
        )


def _count(run: int, holds: bool) -> int:
    return run + 1 if holds else max(0, run - MISS_PENALTY)


def _leave_one_out(xs: dict) -> dict:
    """{name: x - median of the others' x} (empty when fewer than ``MIN_MODULES``)."""
    if len(xs) < MIN_MODULES:
        return {}
    order = sorted(xs.values())
    n = len(order)
    out = {}
    for name, x in xs.items():
        # the others are ``order`` without one copy of x: their median is one of the two
        # middle elements of ``order`` (or their mean), depending on which side x sits
        if n % 2:  # n - 1 others, even: mean of their two middle elements
            h = n // 2
            if x < order[h]:
                med = 0.5 * (order[h] + order[h + 1])
            elif x > order[h]:
                med = 0.5 * (order[h - 1] + order[h])
            else:
                med = 0.5 * (order[h - 1] + order[h + 1]) if n > 1 else x
        else:  # n - 1 others, odd: their middle element
            h = n // 2
            med = order[h] if x <= order[h - 1] else order[h - 1]
        out[name] = x - med
    return out


def _loo_medians(order: list) -> tuple[float, float, float, float]:
    """For sorted values ``order`` (two or more), ``(pivot, below, above, at)``: the median of
    the others of a value x is ``below`` when x < pivot, ``above`` when x > pivot, ``at`` when
    equal -- :func:`_leave_one_out`'s choice, worked out once for all of them."""
    n = len(order)
    h = n // 2
    if n % 2:  # n - 1 others, even: mean of their two middle elements
        a = 0.5 * (order[h] + order[h + 1])
        return order[h], a, 0.5 * (order[h - 1] + order[h]), 0.5 * (order[h - 1] + order[h + 1])
    # n - 1 others, odd: their middle element (order[h] when x <= order[h - 1])
    return order[h - 1], order[h], order[h - 1], order[h]


def _times(decades: float) -> str:
    """``10^decades`` as a person reads it: "1/300 of", "1e-25 times"."""
    if decades < -12:
        return f"{fmt(10**decades)} times"
    return f"1/{fmt(10**-decades)} of"
