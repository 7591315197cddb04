"""Concurrent ingests (grouped into shared transactions on SQLite) store every point once, and
one failing batch fails alone."""

from __future__ import annotations

import threading

import pytest

from stethoscope_server.store import NotFound, SeriesBatch, Store, migrate
from stethoscope_server.store.db import make_engine


@pytest.fixture
def store(settings):
    migrate.upgrade(settings.database_url)
    engine = make_engine(settings)
    yield Store(engine)
    engine.dispose()


def test_concurrent_ingests_store_every_point_once(store):
    threads, errors, results = [], [], []
    runs = [f"r{i}" for i in range(6)]
    for r in runs:
        store.upsert_run(r, "p")

    def job(run_id, offset):
        try:
            for k in range(15):
                steps = list(range(k * 10, k * 10 + 10))
                batch = [
                    SeriesBatch("loss", steps, [float(s + offset) for s in steps], [0.0] * 10),
                    SeriesBatch("shared", steps, [1.0] * 10, [0.0] * 10),
                ]
                results.append(store.ingest(run_id, batch).inserted)
                # the same batch again, concurrently with others: stores nothing new
                results.append(-store.ingest(run_id, batch).inserted)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def bad():
        for _ in range(15):
            try:
                store.ingest("ghost", [SeriesBatch("loss", [1], [1.0], [0.0])])
                errors.append(AssertionError("ingest into a missing run succeeded"))
            except NotFound:
                pass

    for i, r in enumerate(runs):
        threads.append(threading.Thread(target=job, args=(r, i)))
    threads.append(threading.Thread(target=bad))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert sum(x for x in results if x > 0) == len(runs) * 15 * 20
    assert all(x == 0 for x in results if x <= 0)
    for i, r in enumerate(runs):
        got = store.read_series(r, "loss", max_points=10_000)
        assert got.steps == list(range(150)) and got.values == [float(s + i) for s in range(150)]
    assert [r["id"] for r in store.list_runs()] and all(r["id"] != "ghost" for r in store.list_runs())


def test_a_first_batch_of_many_series_creates_each_once(store, settings):
    """A run's first batch brings all its series at once: they are created in bulk (more names
    than one statement takes, here), and two workers creating the same names at the same
    time end with one id per name and every point stored once."""
    store.upsert_run("wide", "p")
    other = Store(make_engine(settings))  # a second worker on the same database
    names = [f"layer/{i}/grad_norm" for i in range(2_600)]
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def send(who, st, steps):
        try:
            batch = [SeriesBatch(n, steps, [float(k)] * len(steps), [0.0] * len(steps)) for k, n in enumerate(names)]
            barrier.wait()
            results[who] = st.ingest("wide", batch).inserted
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [
        threading.Thread(target=send, args=("a", store, [0, 1])),
        threading.Thread(target=send, args=("b", other, [1, 2])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    other.engine.dispose()
    assert not errors
    # Step 1 was in both batches: whichever committed second found it stored.
    assert results["a"] + results["b"] == 3 * len(names)
    listing = store.list_series("wide")
    assert sorted(s["name"] for s in listing) == sorted(names)
    for k in (0, 1_234, 2_599):
        got = store.read_series("wide", names[k])
        assert got.steps == [0, 1, 2] and got.values == [float(k)] * 3
