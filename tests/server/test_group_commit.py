"""Group commit (SQLite ingest): jobs that arrive together share one transaction; a job that
fails after writing leaves nothing behind, and the others of its group commit without it."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest

from stethoscope_server.settings import Settings
from stethoscope_server.store.db import make_engine
from stethoscope_server.store.group_commit import GroupCommitter


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(Settings(database_url=f"sqlite:///{tmp_path / 'g.db'}"))
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (k TEXT PRIMARY KEY)")
    yield engine
    engine.dispose()


def _run_group(engine, failing: set[str]):
    """Four jobs queued while the writer's lock is held, so they go in as one group."""
    lock = threading.Lock()
    transactions = []
    committed = []

    @contextmanager
    def begin():
        with engine.begin() as conn:
            transactions.append(conn)
            yield conn

    def work(conn, key: str, fail: bool) -> str:
        conn.exec_driver_sql("INSERT INTO t (k) VALUES (?)", (key,))
        if fail:
            raise ValueError(f"job {key} failed after writing")
        return key

    group = GroupCommitter(lock, begin, work, committed.append)
    results: dict[str, object] = {}

    def submit(key: str, fail: bool) -> None:
        try:
            results[key] = group.submit(key, fail)
        except ValueError as e:
            results[key] = e

    lock.acquire()  # hold the writer's lock: the four jobs queue up and go in as one group
    threads = [threading.Thread(target=submit, args=(k, k in failing)) for k in "abcd"]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(group._pending) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    lock.release()
    for t in threads:
        t.join(10)

    with engine.connect() as conn:
        stored = [r[0] for r in conn.exec_driver_sql("SELECT k FROM t ORDER BY k")]
    return transactions, results, committed, stored


def test_a_group_without_failures_is_one_transaction(engine):
    transactions, results, committed, stored = _run_group(engine, set())
    assert len(transactions) == 1
    assert results == {k: k for k in "abcd"} and sorted(committed) == stored == list("abcd")


def test_a_failing_job_leaves_nothing_and_the_rest_of_its_group_commits(engine):
    transactions, results, committed, stored = _run_group(engine, {"b"})
    # The group's transaction is rolled back at b, and a, c and d run again in a second one.
    assert len(transactions) == 2
    assert results["a"] == "a" and results["c"] == "c" and results["d"] == "d"
    assert isinstance(results["b"], ValueError)
    assert sorted(committed) == ["a", "c", "d"]  # after_commit once each, for the committed ones
    assert stored == ["a", "c", "d"]


def test_every_job_failing_stores_nothing(engine):
    transactions, results, committed, stored = _run_group(engine, set("abcd"))
    assert all(isinstance(results[k], ValueError) for k in "abcd")
    assert committed == [] and stored == []


def test_sqlite_writes_keep_to_the_connection_used_last(tmp_path):
    """Writes one after another go through the same pooled connection even when the pool holds
    several (readers opened them): SQLite empties a connection's page cache when another
    connection has written since its last transaction, so writers that take the pool's
    connections in turn re-read every page of every batch from the file."""
    from sqlalchemy import event

    from stethoscope_server.store import Store, migrate
    from stethoscope_server.store.db import WRITE_OPTION
    from stethoscope_server.store.points import SeriesBatch

    url = f"sqlite:///{tmp_path / 'w.db'}"
    migrate.upgrade(url)
    engine = make_engine(Settings(database_url=url))
    writers = []

    @event.listens_for(engine, "begin")
    def _note(conn):
        if conn.get_execution_options().get(WRITE_OPTION):
            writers.append(id(conn.connection.driver_connection))

    try:
        store = Store(engine)
        store.upsert_run("r", "p")
        readers = [engine.connect() for _ in range(3)]  # the pool now holds three connections
        for c in readers:
            c.exec_driver_sql("SELECT 1").all()
        for c in readers:
            c.close()
        writers.clear()
        for k in range(4):
            store.ingest("r", [SeriesBatch("loss", [k], [1.0], [0.0])])
            assert store.read_series("r", "loss").steps == list(range(k + 1))  # a read between writes
        assert len(writers) == 4 and len(set(writers)) == 1, writers
    finally:
        engine.dispose()
