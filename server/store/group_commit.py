"""Group commit: concurrent ingest requests share one transaction.

A commit is the fixed cost of a write (a WAL append on SQLite, an fsync on PostgreSQL). When
several requests arrive together, the first thread to take the lock becomes the leader: it
runs every pending job in one transaction, commits once, and hands each thread its result.
The others find their job done when they get the lock. No thread of our own, nothing left
behind at shutdown.

A job that fails (a missing run, a series limit, a bug) fails alone: the transaction is
rolled back and the group's other jobs run again without it. The jobs used to run each in a
savepoint instead; on SQLite a savepoint copies every page a job touches into a sub-journal
first, ~0.3 us a point on every batch, to spare the rare failure a second run of its group.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

#: Most jobs one transaction takes; bounds the latency a leader adds to the first job.
MAX_GROUP = 32


class _Job:
    __slots__ = ("args", "result", "error", "done")

    def __init__(self, args: tuple) -> None:
        self.args = args
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False


class GroupCommitter:
    """Runs ``work(conn, *args)`` for each job, grouped into shared transactions.

    ``begin()`` opens the write transaction (a context manager yielding a connection);
    ``after_commit(result)`` runs for each successful job once its transaction committed.
    """

    def __init__(
        self, lock: threading.Lock, begin: Callable, work: Callable, after_commit: Callable[[Any], None]
    ) -> None:
        self._lock = lock
        self._begin = begin
        self._work = work
        self._after_commit = after_commit
        self._pending: list[_Job] = []
        self._pending_lock = threading.Lock()

    def submit(self, *args) -> Any:
        job = _Job(args)
        with self._pending_lock:
            self._pending.append(job)
        while not job.done:
            with self._lock:
                if job.done:
                    break
                with self._pending_lock:
                    group, self._pending = self._pending[:MAX_GROUP], self._pending[MAX_GROUP:]
                self._run(group)
        if job.error is not None:
            raise job.error
        return job.result

    def _run(self, group: list[_Job]) -> None:
        todo = group
        while todo:
            try:
                with self._begin() as conn:
                    for job in todo:
                        try:
                            job.result = self._work(conn, *job.args)
                        except Exception as e:  # this job's own failure (a missing run, ...)
                            job.error = e
                            raise _JobFailed from e
            except _JobFailed:
                # Rolled back, the other jobs' writes too: they run again without this one.
                todo = [job for job in todo if job.error is None]
                for job in todo:
                    job.result = None
                continue
            except BaseException as e:  # the commit itself failed: no job of the group is stored
                for job in todo:
                    if job.error is None:
                        job.error = e
                        job.result = None
            break
        for job in group:
            if job.error is None:
                self._after_commit(job.result)
            job.done = True


class _JobFailed(Exception):
    """One job of a group raised (its error is on the job): roll the group's transaction back."""
