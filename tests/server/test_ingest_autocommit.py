"""PostgreSQL: a batch that no detector takes, of known series, past the last step this worker
stored of its run, is one statement in autocommit (``Store._ingest_autocommit``); anything
else, a resend or an overlap included, goes through the transaction as before, and so does a
batch that the statement finds stored already (by another worker). Both must store the same
points and rollups."""

from __future__ import annotations

import math
import random

import pytest
from sqlalchemy import text

from stethoscope_server.alerting import Alerting
from stethoscope_server.store import SeriesBatch
from stethoscope_server.store.db import make_engine
from stethoscope_server.store.points import PointWriter

WALL = 1.7e9


@pytest.fixture
def store(settings, request):
    if not settings.database_url.startswith("postgresql"):
        pytest.skip("the autocommit path is PostgreSQL's")
    return request.getfixturevalue("detecting_store")


@pytest.fixture
def fast_calls(monkeypatch):
    """How many statements went the autocommit way."""
    calls = []
    real = PointWriter.write_all_new

    def spy(self, *args):
        calls.append(1)
        return real(self, *args)

    monkeypatch.setattr(PointWriter, "write_all_new", spy)
    return calls


def _batch(name: str, steps, values) -> SeriesBatch:
    steps = list(steps)
    return SeriesBatch(name, steps, [float(v) for v in values], [WALL + s for s in steps])


def _batches(rng: random.Random, first: int, names: list[str]) -> list[SeriesBatch]:
    special = [math.nan, math.inf, -math.inf, -0.0, 0.0]
    out = []
    for name in names:
        steps = range(first, first + 150)
        out.append(_batch(name, steps, [rng.choice(special) if rng.random() < 0.1 else rng.gauss(0, 1) for _ in steps]))
    return out


def _rows(store, run: str) -> tuple[list, list]:
    """The run's points and rollups, by series name, floats as their bits."""

    def key(v):
        return v if not isinstance(v, float) else (math.copysign(1, v), repr(v))

    with store.engine.connect() as conn:
        points = conn.execute(
            text(
                "SELECT s.name, p.step, p.value, p.wall FROM points p JOIN series s ON s.id = p.series_id "
                "WHERE s.run_id = :r ORDER BY 1, 2"
            ),
            {"r": run},
        ).all()
        rollups = conn.execute(
            text(
                "SELECT s.name, r.level, r.bucket, r.min_value, r.min_step, r.max_value, r.max_step, r.nan_step, "
                "r.first_step, r.last_step FROM rollups r JOIN series s ON s.id = r.series_id "
                "WHERE s.run_id = :r ORDER BY 1, 2, 3"
            ),
            {"r": run},
        ).all()
    return [tuple(map(key, r)) for r in points], [tuple(map(key, r)) for r in rollups]


def test_the_autocommit_path_stores_what_the_transaction_stores(store, fast_calls, monkeypatch):
    names = ["metric/a", "metric/b", "metric/c"]
    for run in ("fast", "slow"):
        store.upsert_run(run, "p")
    sent = {run: [] for run in ("fast", "slow")}
    for run in ("fast", "slow"):
        rng = random.Random(7)
        for first in (0, 150, 300, 400, 1000, 1150, 1250):  # 400 and 1250 overlap the batch before
            sent[run].append(store.ingest(run, _batches(rng, first, names)))
        if run == "fast":
            # The first batch (new series) and the two overlaps went the transaction's way.
            assert len(fast_calls) == 4
            monkeypatch.setattr(store, "_ingest_autocommit", lambda *args: None)
    fast, slow = sent["fast"], sent["slow"]
    assert [(r.points, r.inserted) for r in fast] == [(r.points, r.inserted) for r in slow]
    assert [r.inserted for r in fast] == [450, 450, 450, 300, 450, 450, 300]
    assert [[(n, s) for n, s, _ in r.new_points] for r in fast] == [[(n, s) for n, s, _ in r.new_points] for r in slow]
    assert _rows(store, "fast") == _rows(store, "slow")
    assert len(_rows(store, "fast")[0]) == 3 * (550 + 400)


def test_a_batch_a_detector_takes_keeps_its_transaction(store, fast_calls):
    store.upsert_run("r", "p")
    store.ingest("r", [_batch("loss", range(100), [1.0] * 100), _batch("metric/a", range(100), [1.0] * 100)])
    res = store.ingest(
        "r", [_batch("loss", range(100, 200), [1.0] * 100), _batch("metric/a", range(100, 200), [1.0] * 100)]
    )
    assert res.inserted == 200 and not fast_calls
    res = store.ingest("r", [_batch("metric/a", range(200, 300), [1.0] * 100)])
    assert res.inserted == 100 and fast_calls == [1]


def test_a_resend_of_steps_this_worker_stored_keeps_its_transaction(store, fast_calls):
    """No failed statement (nor an error line in the database's log) for a resend or an overlap
    that this worker can tell from the steps it stored."""
    store.upsert_run("r", "p")
    store.ingest("r", [_batch("metric/a", range(100), [1.0] * 100)])
    assert store.ingest("r", [_batch("metric/a", range(100, 200), [2.0] * 100)]).inserted == 100
    assert fast_calls == [1]
    res = store.ingest("r", [_batch("metric/a", range(100, 200), [3.0] * 100)])  # the same steps again
    assert (res.points, res.inserted, res.new_points) == (100, 0, [])
    res = store.ingest("r", [_batch("metric/a", range(150, 250), [3.0] * 100)])  # half of it stored
    assert (res.points, res.inserted) == (100, 50)
    assert fast_calls == [1]  # neither tried the statement
    assert store.ingest("r", [_batch("metric/a", range(250, 300), [4.0] * 50)]).inserted == 50
    assert fast_calls == [1, 1]  # past the last step stored: the statement again


def test_steps_another_worker_stored_fail_the_statement_and_go_through_the_transaction(store, settings, fast_calls):
    store.upsert_run("r", "p")
    store.ingest("r", [_batch("metric/a", range(100), [1.0] * 100)])
    assert store.ingest("r", [_batch("metric/a", range(100, 200), [2.0] * 100)]).inserted == 100
    # A second worker (its own store and engine) stores steps this one has not seen.
    engine = make_engine(settings)
    try:
        other = Alerting(settings).make_store(engine)
        assert other.ingest("r", [_batch("metric/a", range(200, 300), [5.0] * 100)]).inserted == 100
    finally:
        engine.dispose()
    res = store.ingest("r", [_batch("metric/a", range(200, 300), [3.0] * 100)])  # tried fast, conflicted
    assert (res.points, res.inserted, res.new_points) == (100, 0, [])
    assert fast_calls == [1, 1]
    r = store.read_series("r", "metric/a", max_points=1000)
    assert r.values == [1.0] * 100 + [2.0] * 100 + [5.0] * 100
    down = store.read_series("r", "metric/a", max_points=10)  # from the rollups
    assert down.downsampled and max(down.values) == 5.0 and min(down.values) == 1.0
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT last_step FROM runs WHERE id = 'r'")).scalar() == 299
