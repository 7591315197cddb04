"""Issue 18: the bulk ingest path (multi-row statements, the insert as the idempotence check)
and downsampled reads that return about as many points as asked, on both databases."""

from __future__ import annotations

import math
import random
import struct

import pytest

from stethoscope.core.detectors import DetectorSet
from stethoscope_server.store import SeriesBatch

WALL = 1.7e9


@pytest.fixture
def store(detecting_store):
    return detecting_store


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def _batch(name: str, steps, values) -> SeriesBatch:
    steps = list(steps)
    return SeriesBatch(name, steps, [float(v) for v in values], [WALL + s for s in steps])


def _all(store, run: str, name: str) -> tuple[list[int], list[float]]:
    r = store.read_series(run, name, max_points=1_000_000)
    assert not r.downsampled
    return r.steps, r.values


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 127, 1000, 4097])
def test_every_size_of_batch_is_stored_whole(store, n):
    """Batches go in as 64-row statements and power-of-two remainders: each size lands whole."""
    store.upsert_run("r", "p")
    values = [math.sin(s) for s in range(n)]
    res = store.ingest("r", [_batch("a", range(n), values), _batch("b", range(5, 5 + n), values)])
    assert (res.points, res.inserted) == (2 * n, 2 * n)
    assert _all(store, "r", "a") == (list(range(n)), values)
    assert _all(store, "r", "b") == (list(range(5, 5 + n)), values)


def test_overlapping_resends_store_only_the_new_points_first_value_wins(store):
    """A batch that is part resend, part new: the stored steps keep their first value, the new
    ones are stored and reported (once), and the rollups ignore the values resent."""
    store.upsert_run("r", "p")
    first = store.ingest("r", [_batch("x", range(0, 600), [1.0] * 600)])
    assert first.inserted == 600
    # Steps 300..599 are stored; 600..899 are new. The resent ones carry a spike that must not
    # reach the points, the rollups or the detectors.
    again = store.ingest("r", [_batch("x", range(300, 900), [1e9] * 300 + [2.0] * 300)])
    assert (again.points, again.inserted) == (600, 300)
    assert [(n, s[0], s[-1], len(s)) for n, s, _ in again.new_points] == [("x", 600, 899, 300)]
    steps, values = _all(store, "r", "x")
    assert steps == list(range(900)) and values == [1.0] * 600 + [2.0] * 300
    down = store.read_series("r", "x", max_points=20)  # from the rollups
    assert down.downsampled and max(down.values) == 2.0
    # Sent a third time, nothing is new, and the reply says so.
    assert store.ingest("r", [_batch("x", range(300, 900), [5.0] * 600)]).inserted == 0


def test_resends_across_series_of_one_batch(store):
    """One series of the batch resent, another new: only the new one counts."""
    store.upsert_run("r", "p")
    store.ingest("r", [_batch("old", range(100), range(100))])
    res = store.ingest("r", [_batch("old", range(100), [0] * 100), _batch("new", range(100), range(100))])
    assert res.inserted == 100 and [n for n, _, _ in res.new_points] == ["new"]
    assert _all(store, "r", "old")[1] == [float(v) for v in range(100)]


def test_nonfinite_values_and_signed_zero_round_trip_through_the_bulk_path(store):
    store.upsert_run("r", "p")
    rng = random.Random(18)
    special = [math.nan, math.inf, -math.inf, -0.0, 0.0, 5e-324, 1e308]
    values = [rng.choice(special) if rng.random() < 0.3 else rng.gauss(0, 1) for _ in range(777)]
    store.ingest("r", [_batch("v", range(777), values)])
    # Part resent (NaN for a step that holds a number and the other way round): first write wins.
    store.ingest("r", [_batch("v", range(700, 800), [math.nan if v == v else 1.0 for v in values[700:]] + [3.0] * 23)])
    steps, got = _all(store, "r", "v")
    assert steps == list(range(800))
    assert [_bits(v) for v in got[:777]] == [_bits(v) for v in values]
    down = store.read_series("r", "v", max_points=60)
    assert down.downsampled and any(math.isnan(v) for v in down.values)
    assert math.inf in down.values and -math.inf in down.values


def test_detectors_raise_the_same_alerts_as_offline(store):
    """The detectors see exactly the new points, in order: a run with a spike and a NaN, sent
    in batches with resends and overlaps, opens the alerts an offline DetectorSet opens for the
    same points sent once."""
    store.upsert_run("r", "p")
    rng = random.Random(5)
    n = 3000
    loss = [2.0 * math.exp(-s / 800) + 0.02 * rng.random() for s in range(n)]
    loss[1200] = 40.0  # a spike
    for s in range(2500, n):
        loss[s] = math.nan  # divergence
    grad = [1.0 + 0.05 * rng.random() for _ in range(n)]
    sends = []
    for a in range(0, n, 250):
        b = min(n, a + 250)
        sends.append((a, b))
        if a >= 250:
            sends.append((a - 100, b - 100))  # an overlapping resend of the tail of the last one
    for a, b in sends:
        store.ingest("r", [_batch("loss", range(a, b), loss[a:b]), _batch("grad/norm", range(a, b), grad[a:b])])
    got = sorted((x["detector"], x["key"], x["start_step"], x["severity"]) for x in store.alerts.list_run("r"))
    offline = DetectorSet()
    state: dict = {}
    opened = {}
    for a in range(0, n, 250):
        b = min(n, a + 250)
        points = [("loss", s, loss[s]) for s in range(a, b)] + [("grad/norm", s, grad[s]) for s in range(a, b)]
        for c in offline.update(state, points):
            if c.action == "open":
                opened[(c.detector, c.key, c.start_step)] = c.severity
            elif c.action == "update" and (c.detector, c.key, c.start_step) in opened:
                opened[(c.detector, c.key, c.start_step)] = c.severity
    want = sorted((d, k, s, sev) for (d, k, s), sev in opened.items())
    assert got and [g[:3] for g in got] == [w[:3] for w in want]
    assert any(g[0] == "divergence" for g in got)


def _moving(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [math.sin(s / 97) + 0.1 * rng.random() for s in range(n)]


@pytest.mark.parametrize("n", [5_000, 200_000])
@pytest.mark.parametrize("asked", [1500, 2000, 301])
def test_a_downsampled_read_returns_about_as_many_points_as_asked(store, n, asked):
    """A series that moves shows a min and a max per bucket: a read asked for ``asked`` points
    returns at most that many, and no fewer than one bucket's worth short (it returned 1,000 for
    1,500 before). 5,000 points read raw points; 200,000 read the rollups."""
    store.upsert_run("r", "p")
    values = _moving(n, 1)
    for a in range(0, n, 50_000):
        store.ingest("r", [_batch("m", range(a, min(n, a + 50_000)), values[a : a + 50_000])])
    for start, end in ((None, None), (n // 7, n - n // 5)):
        r = store.read_series("r", "m", start, end, max_points=asked)
        assert r.downsampled
        assert asked - 3 <= len(r.steps) <= asked, (start, end, len(r.steps))
        assert r.steps == sorted(set(r.steps))
        lo, hi = start or 0, (n - 1) if end is None else end
        assert max(r.values) == max(values[lo : hi + 1]) and min(r.values) == min(values[lo : hi + 1])


def test_a_read_with_nans_stays_within_max_points(store):
    """Where NaN is about a bucket may show three points: the read cuts fewer buckets, and the
    NaN are all kept."""
    store.upsert_run("r", "p")
    n = 200_000
    values = _moving(n, 2)
    nans = list(range(500, n, 997))  # one in most output buckets
    for s in nans:
        values[s] = math.nan
    for a in range(0, n, 50_000):
        store.ingest("r", [_batch("m", range(a, a + 50_000), values[a : a + 50_000])])
    for asked in (1500, 2000):
        r = store.read_series("r", "m", max_points=asked)
        assert r.downsampled and 2 * asked // 3 <= len(r.steps) <= asked
        by_step = dict(zip(r.steps, r.values))
        assert sum(1 for s in nans if s in by_step and math.isnan(by_step[s])) >= len(nans) * 0.9


def test_read_many_follows_the_same_counts(store):
    store.upsert_run("r", "p")
    n = 50_000
    store.ingest("r", [_batch(name, range(n), _moving(n, k)) for k, name in enumerate(("a", "b"))])
    got = store.read_many("r", ["a", "b"], max_points=1500)
    for name in ("a", "b"):
        one = store.read_series("r", name, max_points=1500)
        assert got[name].steps == one.steps and 1497 <= len(one.steps) <= 1500


def test_an_ingest_marks_the_run_seen_and_its_last_step_only_grows(store):
    from stethoscope_server.store import NotFound

    store.upsert_run("r", project="p")
    assert store.get_run("r")["last_step"] is None and store.get_run("r")["last_seen_at"] is None
    store.ingest("r", [_batch("loss", range(10), range(10))])
    first = store.get_run("r")
    assert first["last_step"] == 9 and first["last_seen_at"].tzinfo is not None
    store.ingest("r", [_batch("loss", range(3, 6), range(3))])  # older steps: the last step stays
    store.ingest("r", [])  # an empty batch still marks the run as seen
    later = store.get_run("r")
    assert later["last_step"] == 9 and later["last_seen_at"] >= first["last_seen_at"]
    store.ingest("r", [_batch("lr", [12], [0.1])])
    assert store.get_run("r")["last_step"] == 12
    with pytest.raises(NotFound):
        store.ingest("missing", [_batch("loss", [0], [1.0])])
    with pytest.raises(NotFound):
        store.ingest("missing", [])


@pytest.mark.parametrize("series, overlapping", [(3, 0), (3, 2), (100, 0), (100, 70), (100, 99)])
def test_a_batch_of_many_series_with_one_resent_counts_only_the_new(store, series, overlapping):
    """Whichever series of a batch overlaps what is stored (the first, the last, one past the
    first 64: each probe statement covers 64 series, padded to a power of two), only the new
    points go in and count, NaN among them, and the first value sent for a step stays."""
    store.upsert_run("r", "p")
    store.ingest("r", [_batch(f"s{overlapping}", range(10, 20), [1.0] * 10)])
    batch = [_batch(f"s{k}", range(0, 30), [math.nan if s % 7 == 0 else 2.0 for s in range(30)]) for k in range(series)]
    res = store.ingest("r", batch)
    assert (res.points, res.inserted) == (30 * series, 30 * series - 10)
    assert {n: len(s) for n, s, _ in res.new_points} == {f"s{k}": 30 if k != overlapping else 20 for k in range(series)}
    steps, values = _all(store, "r", f"s{overlapping}")
    assert steps == list(range(30)) and values[10:20] == [1.0] * 10
    assert math.isnan(values[0]) and values[1] == 2.0
    other = (overlapping + 1) % series
    assert _all(store, "r", f"s{other}")[0] == list(range(30))
    assert store.ingest("r", batch).inserted == 0  # all of it again: nothing new


def test_batch_rollups_are_the_point_by_point_ones_bit_for_bit():
    """``rollups.batch_rows`` (buckets shared by series of equal steps, extremes per finest
    bucket merged upward, min/max through ``sorted``) gives exactly ``rollup_rows``' rows,
    which ``Extremes`` defines: ties to the earlier step, -0.0 and 0.0 kept as sent, +-inf,
    NaN, steps out of order, buckets and batches of every size."""
    from stethoscope_server.store import rollups

    rng = random.Random(18)
    for _ in range(400):
        items, prev = [], None
        for sid in range(rng.randint(1, 5)):
            n = rng.choice([1, 2, 50, 64, 65, 130, 700])
            if prev is not None and rng.random() < 0.5:
                steps = list(prev)  # equal steps, another list: the buckets are reused
            elif rng.random() < 0.6:
                s0 = rng.choice([0, 1, 63, 64, 511, 4090, 2**40, -100])
                steps = list(range(s0, s0 + n))
            elif rng.random() < 0.7:
                steps = sorted(rng.sample(range(-5000, 20000), n))
            else:
                steps = rng.sample(range(-5000, 20000), n)
            pool = [0.0, -0.0, 1.0, 2.0, -3.5, math.inf, -math.inf] + ([math.nan] if rng.random() < 0.1 else [])
            values = [rng.choice(pool) if rng.random() < 0.7 else rng.uniform(-1, 1) for _ in steps]
            items.append((sid, steps, values))
            prev = steps
        want = [r for sid, steps, values in items for r in rollups.rollup_rows(sid, steps, values)]
        got = rollups.batch_rows(items)
        as_bits = lambda rows: [tuple(_bits(x) if isinstance(x, float) else x for x in r) for r in rows]  # noqa: E731
        assert as_bits(got) == as_bits(want)
