"""What the detectors keep outside their state to save work (sorted copies, sign change
counts), and the shortcuts they take, never change what they compute: the same floats, the same alerts, the same
state as computing everything afresh at every point."""

from __future__ import annotations

import json
import math
import random

from stethoscope.core.detectors import DetectorSet, OscillationDetector
from stethoscope.core.detectors._base import SortedWindows, median, median_mad_sorted, push


def _definition(xs):
    m = median(xs)
    return m, median([abs(x - m) for x in xs])


def test_median_mad_of_a_clean_window_picks_the_definitions_floats():
    """``clean`` (no NaN known: the sum is skipped) gives the definition's floats, on finite
    windows whose sum overflows too (the search is exact without the sum) and on windows with
    infinities (``clean`` sees them at the ends and takes the plain way)."""
    for xs in ([-math.inf, 1.0, 3.0, -math.inf], [math.inf, math.inf, 1.0, 1.0, 3.0, math.inf]):
        # an infinite median: the search would give NaN where the definition gives inf
        assert repr(median_mad_sorted(sorted(xs), xs, clean=True)) == repr(_definition(xs))
    rng = random.Random(5)
    makers = [
        lambda: rng.gauss(0.0, 1.0),
        lambda: float(rng.randint(-3, 3)),  # ties
        lambda: rng.choice([0.0, -0.0, 1e-300, -1e-300, 5e-324]),
        lambda: rng.uniform(-1.7e308, 1.7e308),  # sums overflow
        lambda: rng.choice([1.0, 2.0, math.inf, -math.inf]),
    ]
    for trial in range(20_000):
        make = makers[trial % len(makers)]
        xs = [make() for _ in range(rng.randint(1, 140))]
        s = sorted(xs)
        want = repr(_definition(xs))
        assert repr(median_mad_sorted(s, xs, clean=True)) == want, xs
        assert repr(median_mad_sorted(s, xs)) == want


def test_a_rolling_window_kept_sorted_and_clean_matches_the_definition_at_every_point():
    rng = random.Random(9)
    kept = SortedWindows()
    window, plain = [], []
    for i in range(3000):
        if i % 997 == 0:
            window = list(window)  # a state loaded from JSON: the copy is rebuilt
        x = rng.gauss(0.0, 1.0) if i % 500 < 400 else rng.gauss(5.0, 0.1)  # level shifts
        s = kept.push(window, x, 128)
        push(plain, x, 128)
        ordered, clean = kept.sorted_clean(window)
        assert ordered is s and clean
        assert repr(median_mad_sorted(ordered, window, clean)) == repr(_definition(plain))


def test_sorted_clean_tells_a_kept_copy_from_a_window_holding_nan():
    kept = SortedWindows()
    w = [3.0, 1.0, 2.0]
    assert kept.sorted_clean(w) == ([1.0, 2.0, 3.0], True)
    w.append(math.nan)
    s, clean = kept.sorted_clean(w)
    assert not clean and len(s) == 4


def _oscillating(rng, n):
    """A loss that alternates at times (with a growing swing), with NaN gaps and values
    repeated as the very same float object (a constant loss)."""
    const = 0.75
    out = []
    for i in range(n):
        phase = (i // 150) % 4
        if i % 401 == 400:
            v = math.nan  # a gap: the detector clears its list
        elif phase == 0:
            v = const  # the same object again and again
        elif phase == 1:
            v = 1.0 + 0.05 * rng.random()
        else:
            v = 1.0 + (0.01 + 0.002 * (i % 150)) * (-1) ** i
        out.append(("loss", i, v))
    return out


def test_oscillation_kept_sign_changes_match_counting_afresh():
    """The detector keeps each list's sign changes from one point to the next; a state
    round-tripped through JSON at every point (new lists: always counted afresh) gives the
    same changes and the same final state, alerts included."""
    rng = random.Random(4)
    points = _oscillating(rng, 3000)
    kept, fresh = DetectorSet(), DetectorSet()
    s1, s2 = {}, {}
    got1, got2 = [], []
    for pt in points:
        got1 += [repr(c.to_dict()) for c in kept.update(s1, [pt])]
        got2 += [repr(c.to_dict()) for c in fresh.update(s2, [pt])]
        s2 = json.loads(json.dumps(s2))
    assert any("oscillation" in c for c in got1)  # the rule was exercised
    assert got1 == got2
    assert json.dumps(s1) == json.dumps(s2)


def test_oscillation_alternation_equals_the_plain_count_at_every_point():
    from stethoscope.core.detectors.oscillation import _alternation

    rng = random.Random(6)
    det = OscillationDetector()
    size = det.params.window + 2
    s: list = []
    for i, (_, _, v) in enumerate(_oscillating(rng, 2000)):
        if v != v:
            s.clear()
            continue
        push(s, v, size + 32)
        if len(s) >= size + 16:
            assert det._alternation(s, size) == _alternation(s[-size:]), i


def test_feed_step_of_layer_gradients_matches_feeding_point_by_point():
    """``LayerGradientsDetector.step_points`` (the hook's path) gives the changes and the state
    that ``update`` gives, point by point: modules that report late, appear mid-run, skip a
    step, send NaN or an exact zero, a layer that vanishes and one that explodes."""
    rng = random.Random(8)
    mods = [f"grad/norm/layer{i}" for i in range(6)]
    steps = []
    for step in range(900):
        names, values = [], []
        for j, name in enumerate(mods):
            if j == 5 and step < 300:
                continue  # a module that appears mid-run
            if rng.random() < 0.03 and step % 100:
                continue  # a module that skips a step (not at step 300: layer5 comes after the judging)
            v = 10 ** rng.gauss(-1.0 + 0.3 * j, 0.1)
            if j == 2 and 400 <= step < 600:
                v = 0.0 if step % 7 else 1e-9  # vanished, now and then revived
            if j == 4 and 700 <= step < 760:
                v *= 1e4  # exploded
            if rng.random() < 0.01:
                v = math.nan
            names.append(name)
            values.append(v)
        names.append("loss")
        values.append(1.0 / (1 + step))
        if step % 50 == 0:  # a point of an earlier step again: ignored by both
            names.append(mods[0])
            values.append(1.0)
        steps.append((step, tuple(names), values))
    hook, plain = DetectorSet(), DetectorSet()
    s1, s2 = {}, {}
    got1, got2 = [], []
    for step, names, values in steps:
        got1 += [repr(c.to_dict()) for c in hook.feed_step(s1, step, names, values)]
        got2 += [repr(c.to_dict()) for c in plain.update(s2, [(n, step, v) for n, v in zip(names, values)])]
    assert any("layer_gradients" in c and "vanishing" in c for c in got1)
    assert any("layer_gradients" in c and "exploding" in c for c in got1)
    assert got1 == got2
    assert json.dumps(s1) == json.dumps(s2)


def test_leave_one_out_medians_from_three_candidates_match_the_definition():
    """``_judge`` takes each module's leave-one-out median from ``_loo_medians``' three
    candidates: the floats ``_leave_one_out`` gives, bit for bit (ties and signed zeros
    included), which are the median of the others by definition."""
    from stethoscope.core.detectors.layer_gradients import _leave_one_out, _loo_medians

    rng = random.Random(12)
    makers = [lambda: rng.gauss(0.0, 1.0), lambda: float(rng.randint(-2, 2)), lambda: rng.choice([0.0, -0.0, -30.0])]
    for trial in range(5000):
        make = makers[trial % len(makers)]
        xs = {f"m{i}": make() for i in range(rng.randint(2, 12))}
        piv, below, above, at = _loo_medians(sorted(xs.values()))
        want = _leave_one_out(xs)
        for name, x in xs.items():
            others = list(xs.values())
            others.remove(x)
            got = x - (below if x < piv else above if x > piv else at)
            assert repr(got) == repr(want[name]), (xs, name)
            assert got == x - median(others)  # (by value: which zero it is, is _leave_one_out's)
