"""Group commit (SQLite ingest): jobs that arrive together share one transaction, each in its own
savepoint, so a job that fails after writing leaves nothing behind and the others commit."""

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


def test_a_failing_job_leaves_nothing_and_the_rest_of_its_group_commits(engine):
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
    threads = [threading.Thread(target=submit, args=(k, k == "b")) for k in "abcd"]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(group._pending) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    lock.release()
    for t in threads:
        t.join(10)

    assert len(transactions) == 1  # one transaction for the group
    assert results["a"] == "a" and results["c"] == "c" and results["d"] == "d"
    assert isinstance(results["b"], ValueError)
    assert sorted(committed) == ["a", "c", "d"]
    with engine.connect() as conn:
        assert [r[0] for r in conn.exec_driver_sql("SELECT k FROM t ORDER BY k")] == ["a", "c", "d"]
