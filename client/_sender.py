"""The background sender: a bounded queue, a daemon thread, batches, the spool, the server.

The training loop only ever calls ``put``, which never blocks: when the queue is full the
record is dropped and counted (sentry-python's ``record_lost_event``); the count is sent as
the series ``stethoscope/dropped``. The thread starts on the first ``put`` and again in a
forked child (the pid is checked on every put, as prometheus/client_python does). It turns
records into column batches about once a second, appends each batch to the spool (a
write-ahead log) and then sends the spool in order; while the server is unreachable it
retries with backoff and jitter and the spool grows; when the server is back the backlog
goes first, so series arrive in order. Ingest is idempotent, so a batch resent after a
crash or a timeout stores nothing twice. Each record's host values also go through the
hook's own detectors as the thread takes the record off the queue (``_watch``), so
``on_alert`` hears of a blow-up at its step (within ``POLL_INTERVAL_S``), not at the next batch.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import random
import threading
import time

from . import _errors
from ._batch import DROPPED, Batch, records_in, split_batch
from ._resume import Resume
from ._spool import Spool
from ._transport import Backoff, HttpTransport, NotFound, Rejected, TryLater
from ._watch import DETECTOR_ERRORS, Watch

logger = logging.getLogger("stethoscope")

#: Records the queue holds; at one record a step this is minutes of training.
QUEUE_SIZE = 10_000
#: Seconds between batches: one request a second is nothing for the server or the job.
FLUSH_INTERVAL_S = 1.0
#: Spread of the batch schedule, as a share of the interval. Jobs started together (a sweep,
#: the ranks of one job) would otherwise all send in the same instant, every second, and
#: queue behind each other at the server: the first batch leaves after a random 0.5 to 1.5
#: intervals, each later one after an interval give or take 10%.
FIRST_FLUSH_SPREAD = 0.5
FLUSH_JITTER = 0.1
#: A batch is sent early past this many points (well under the server's 50,000).
BATCH_POINTS = 10_000
#: While an ``on_alert`` callback is registered and records flow, the thread looks at the queue
#: this often instead of being woken by each one: waking a thread on every step cost a ~1 ms
#: training step more than the record itself (the wake-up, then the training thread waiting for
#: the GIL the sender held). A record that finds the thread idle (no record in the last look)
#: wakes it, so slow steps are seen at once and fast ones within this long; flush, events and
#: close always wake it.
POLL_INTERVAL_S = 0.02
#: Without an ``on_alert`` callback the hook's detectors wait (``_watch``) and nothing reads a
#: record before its batch ships: the thread looks when the batch is due, or once this many
#: records wait. A look costs the thread ~0.1 ms of CPU however few records it takes (the
#: wake-up, the GIL, its loop): one per 20 ms was ~4 us a step of the ~0.7 ms step of
#: benchmarks/hook_overhead.py's MLP. The queue stays far below ``QUEUE_SIZE``, and on CUDA
#: few pinned copies wait; urgent records (a NaN, an event, a flush) still wake it at once.
QUIET_LOOK_RECORDS = 256

_STOP = object()

#: This process's id, kept up to date in a forked child by an at-fork hook: the training
#: thread compares it on every put (a sender started in the parent is not the child's).
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_forked)


class Wake:
    """``threading.Event`` (``set``, ``clear``, ``wait``) for one waiting thread, on a bare lock
    held while the flag is down: a timed wait is one lock acquire in C. ``Event.wait`` goes
    through a ``Condition``, a new lock and its Python bookkeeping on every wait, and the
    sender waits some 50 times a second while records flow."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()  # held: the flag is down

    def set(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:  # up already
            pass

    def clear(self) -> None:
        self._lock.acquire(False)

    def is_set(self) -> bool:
        return not self._lock.locked()

    def wait(self, timeout: float) -> bool:
        """Wait until the flag is up (at most ``timeout`` s) and leave it up, as Event does."""
        if self._lock.acquire(True, max(timeout, 0.0)):
            self.set()
            return True
        return False


class RecordQueue:
    """The bounded queue between the training loop and the sender thread.

    ``put_nowait`` never blocks (a deque append, atomic under the GIL). It wakes the consumer
    only when the consumer is idle (its last look found no record), the record is ``urgent``
    (anything but a step's points: a flush, an event, the final status) or
    ``QUIET_LOOK_RECORDS`` records wait; while records flow the consumer looks every ``poll``
    seconds (``POLL_INTERVAL_S``) and takes what came, or with ``poll=None`` only when its wait
    ends or it is woken. (Yielding the GIL between records, ``time.sleep(0)``, was tried: it
    cost the ~1 ms step more than it saved.)
    """

    def __init__(self, maxsize: int) -> None:
        self._items: collections.deque = collections.deque()
        self._maxsize = maxsize
        self._wake = Wake()
        self._idle = False  # the consumer waits without polling: a record must wake it
        self._flowing = False  # the consumer took records since it last waited

    def qsize(self) -> int:
        return len(self._items)

    def put_nowait(self, item, urgent: bool = False) -> None:
        items = self._items
        n = len(items)
        if n >= self._maxsize:
            raise queue.Full
        items.append(item)
        if urgent or self._idle or n >= QUIET_LOOK_RECORDS:  # _idle read after the append: see get()
            self._wake.set()

    def put(self, item, timeout: float) -> None:
        """Wait (up to ``timeout`` s) for room, then put ``item`` and wake the consumer."""
        deadline = time.monotonic() + timeout
        while len(self._items) >= self._maxsize:
            if time.monotonic() >= deadline:
                raise queue.Full
            self._wake.set()
            time.sleep(0.01)
        self.put_nowait(item, urgent=True)

    def take(self):
        """The next record if one is queued, else None; never waits (the consumer drains what
        came since its last look with it). Records are flowing: the next look polls."""
        try:
            item = self._items.popleft()
        except IndexError:
            return None
        self._flowing = True
        return item

    def get(self, timeout: float, poll: float | None = POLL_INTERVAL_S):
        """The next record, waiting up to ``timeout`` s; ``queue.Empty`` if none came. ``poll``:
        see the class; None waits the whole ``timeout`` unless woken (nobody waits for records
        before their batch ships)."""
        items = self._items
        if items:
            self._flowing = True
            return items.popleft()
        if poll is None:
            self._wake.wait(timeout)
        elif self._flowing:  # records are coming: poll, do not be woken by each
            self._flowing = False
            self._wake.wait(min(timeout, poll))
        else:
            # Idle: the next record wakes us. _idle is set before the queue is looked at again,
            # and a put reads it after its append, so a record is either seen here or wakes us.
            self._idle = True
            if not items:
                self._wake.wait(timeout)
            self._idle = False
        self._wake.clear()  # a put sets it after appending: its item is seen below
        try:
            item = items.popleft()
        except IndexError:
            raise queue.Empty from None
        # A record came (it woke us, or the poll found it): the next look polls. Left idle, the
        # consumer would be woken by every record of a run that just started (a wake-up a step).
        self._flowing = True
        return item


class ShipSchedule:
    """When the sender ships its next batch: the first after a random 0.5 to 1.5 intervals
    (``FIRST_FLUSH_SPREAD``), each later one an interval, give or take ``FLUSH_JITTER``, after
    the previous one. The generator and the clock are handed in, so a test drives it::

        schedule = ShipSchedule(random.Random(), time.monotonic)
        schedule.wait()      # seconds until the next batch is due (negative: overdue)
        schedule.due()       # whether it is due now
        schedule.shipped()   # a batch left now: the next one is an interval away
    """

    def __init__(self, rng: random.Random, clock=time.monotonic) -> None:
        self._rng, self._clock = rng, clock
        self.next_at = clock() + FLUSH_INTERVAL_S * (1.0 + rng.uniform(-FIRST_FLUSH_SPREAD, FIRST_FLUSH_SPREAD))

    def wait(self) -> float:
        return self.next_at - self._clock()

    def due(self) -> bool:
        return self._clock() >= self.next_at

    def shipped(self) -> None:
        self.next_at = self._clock() + FLUSH_INTERVAL_S * (1.0 + self._rng.uniform(-FLUSH_JITTER, FLUSH_JITTER))


class Sender:
    """Owns the queue and the thread; ``put`` from the training loop, ``close`` at the end."""

    def __init__(
        self,
        run_id: str,
        run_meta: dict,
        spool_dir,
        transport: HttpTransport | None,
        watch: Watch,
        finish_values,
    ):
        self.run_id = run_id
        self.run_meta = run_meta
        self.spool_dir = spool_dir
        self.transport = transport
        #: The hook's detectors, and the ``on_alert`` callbacks (``watch.callbacks``).
        self.watch = watch
        self.finish_values = finish_values
        self.dropped = 0  # records the queue had no room for (counted by the training thread)
        self.spool_dropped = 0  # records lost with a full disk and a full memory fallback (sender thread)
        #: CPU seconds the thread has used (this process's thread), which the cost budget charges.
        self.cpu_s = 0.0
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._queue = RecordQueue(QUEUE_SIZE)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._spool: Spool | None = None
        self._deadline: float | None = None
        self._abort = False
        #: After close: whether entries are left in the spool for ``stethoscope sync``.
        self.unsent = False
        #: After close: the final status reached neither the server nor the disk.
        self.status_lost = False
        self.spool_path = None
        self._reported_drops = 0  # the count last put in a batch as ``stethoscope/dropped``
        self._drop_step = None  # and its step
        self._last_step = None  # the last step seen in a record
        #: "up" / "down" once a send was tried: the user hears of each change once (_link).
        self._link_state = None
        self._told_spool_drops = False
        self._resume = Resume(self.run_id)

    def after_fork(self) -> None:
        """In a forked child: the parent's thread and spool are not ours; start afresh."""
        self.cpu_s = 0.0
        self._reset()
        self.watch.reset()
        if self.transport is not None:
            self.transport = HttpTransport(self.transport.base_url)

    def put(self, record) -> None:
        """Queue ``record``. Any record but a step's points wakes the thread now, and so do
        points whose host numbers (the loss and gradient norm on the CPU path) hold a NaN or an
        inf: the hook's detectors then reach on_alert at this step, not at the thread's next
        look, up to ``POLL_INTERVAL_S`` (~20 steps of a 1 ms step) later."""
        if record[0] == "points":
            self.put_points(record)
            return
        if self._pid != _pid:
            self.after_fork()
        if self._thread is None:
            self._start()
        try:
            self._queue.put_nowait(record, True)
        except queue.Full:
            self.dropped += 1

    def put_points(self, record) -> None:
        """``put`` for a step's points (``record[0] == "points"``), the training thread's call
        on every step."""
        if self._pid != _pid:  # a forked child (see _forked): not os.getpid(), a syscall a step
            self.after_fork()
        if self._thread is None:
            self._start()
        total = sum(record[8], 0.0)  # NaN or inf among them makes the sum NaN or inf
        try:
            self._queue.put_nowait(record, total - total != 0.0)
        except queue.Full:
            self.dropped += 1

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                t = threading.Thread(target=self._run, name="stethoscope-sender", daemon=True)
                t.start()
                self._thread = t

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything put so far has been sent (or spooled, offline)."""
        if self._thread is None or self._pid != _pid:
            return True
        done = threading.Event()
        self.put(("flush", done))
        return done.wait(timeout)

    def close(self, timeout: float) -> None:
        """Send what is left, trying until ``timeout`` seconds have passed; then stop."""
        if self._thread is None or self._pid != _pid:
            return
        self._deadline = time.monotonic() + timeout
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)
        if self._thread.is_alive() and self.transport is not None:
            # Stuck on a server that does not answer: cut the request short so the thread
            # writes what is left to the spool (quick, local) instead of losing it.
            self._abort = True
            self.transport.abort()
            self._thread.join(5.0)

    # -- the thread ------------------------------------------------------------------
    def _run(self) -> None:
        batch = Batch(self.finish_values)
        backoff = Backoff()
        next_try = 0.0
        run_created = False
        schedule = ShipSchedule(random.Random())  # its own generator: the user's seeds stay untouched
        add, take, watch = batch.add, self._queue.take, self.watch
        while True:
            self.cpu_s = time.thread_time()  # a float store: the training thread reads it
            try:
                # Without an on_alert callback nothing reads a record before its batch ships
                # (the detectors wait: _watch): the thread looks when the batch is due.
                rec = self._queue.get(max(0.05, schedule.wait()), POLL_INTERVAL_S if watch.callbacks else None)
            except queue.Empty:
                rec = None
            stop = False
            flush_event = None
            with _errors.swallowed("sender.record"):
                # Every record queued since the last look, in order, in one go: the loop's own
                # bookkeeping (below) is then paid once per look, not once per training step.
                # A flush or the stop ends the run of records: what came before it is in the batch.
                while rec is not None:
                    if rec is _STOP:
                        stop = True
                        break
                    if rec[0] == "flush":
                        flush_event = rec[1]
                        break
                    seen = add(rec)
                    if seen is not None:  # the hook's detectors read its host values
                        errors = watch.errors
                        watch.points(*seen)
                        if watch.errors != errors:
                            batch.set_point(DETECTOR_ERRORS, seen[0], float(watch.errors))
                    if batch.points >= BATCH_POINTS:
                        break
                    rec = take()
            if batch.last_step is not None:
                self._last_step = batch.last_step
            if self.dropped + self.spool_dropped != self._reported_drops and batch.last_step is not None:
                with _errors.swallowed("sender.drops"):  # batch.series turns the rows into columns
                    if batch.last_step != self._drop_step or DROPPED in batch.series:
                        self._report_drops(batch, batch.last_step)
            due = stop or flush_event is not None or batch.points >= BATCH_POINTS or schedule.due()
            if not due:
                continue
            schedule.shipped()
            with _errors.swallowed("sender.ship"):
                spool = self._open_spool()
                for kind, body in batch.take():
                    lost = spool.append(kind, body)
                    if lost is not None:  # disk and memory full: the oldest entry is gone
                        self.spool_dropped += records_in(*lost)
                        self._link("dropping")
            if self.transport is not None and not self._abort and (time.monotonic() >= next_try or stop or flush_event):
                with _errors.swallowed("sender.drain"):
                    run_created, next_try = self._drain(run_created, backoff, stop or flush_event is not None)
            if flush_event is not None:
                flush_event.set()
            if stop:
                with _errors.swallowed("sender.finish"):
                    self._finish(run_created)
                return

    def _report_drops(self, batch: Batch, step: int) -> None:
        # One value per step: ingest keeps the first point of a step and ignores a resend, so a
        # count at a step already sent waits for the next step (or close).
        self._reported_drops = self.dropped + self.spool_dropped
        batch.set_point(DROPPED, step, float(self._reported_drops))
        self._drop_step = step

    def _open_spool(self) -> Spool:
        if self._spool is None:
            from ._spool import writer_name

            path = self.spool_dir / self.run_id / writer_name()
            self._spool = Spool(path, {"run_id": self.run_id, **self.run_meta})
            self.spool_path = path
        return self._spool

    def _drain(self, run_created: bool, backoff: Backoff, until_deadline: bool):
        """Send spooled entries in order. Returns (run_created, time of the next attempt)."""
        spool = self._spool
        while spool is not None:
            entry = spool.peek()
            if entry is None:
                spool.compact()
                return run_created, 0.0
            try:
                if not run_created:
                    try:
                        self._resume.run_found(
                            self.transport.request("PUT", f"/api/v1/runs/{self.run_id}", self.run_meta)
                        )
                    except Rejected as exc:
                        # The server will not create this run (auth, a clash of projects):
                        # keep everything in the spool for `stethoscope sync` and stop trying.
                        logger.warning(
                            "stethoscope: the server refused run %s (%s); metrics stay in %s",
                            self.run_id,
                            exc,
                            self.spool_path,
                        )
                        self._abort = True
                        return run_created, 0.0
                    run_created = True
                self._deliver(*entry)
                spool.ack()
                backoff.reset()
                self._link("up")
            except NotFound:
                run_created = False  # the server lost the run (a fresh database): make it again
                delay = backoff.next_delay()
            except TryLater as exc:
                logger.debug("stethoscope: server unreachable, will retry: %s", exc)
                self._link("down", exc)
                delay = backoff.next_delay(exc.retry_after)
            except Rejected as exc:
                if exc.status in (401, 403):
                    # A missing, wrong or revoked token (STETHOSCOPE_TOKEN): resending will not
                    # help, and dropping would lose the run. Keep spooling; say so once.
                    logger.warning(
                        "stethoscope: the server refused run %s (%s); set STETHOSCOPE_TOKEN to a token "
                        "with the ingest scope. Metrics stay in %s for `stethoscope sync`",
                        self.run_id,
                        exc,
                        self.spool_path,
                    )
                    self._abort = True
                    return run_created, 0.0
                logger.warning(
                    "stethoscope: the server refused a batch for run %s (%s); it is dropped", self.run_id, exc
                )
                spool.ack()
                continue
            else:
                continue
            if self._abort:
                return run_created, time.monotonic() + delay
            if until_deadline and self._deadline is not None and time.monotonic() + delay < self._deadline:
                time.sleep(delay)
                continue
            return run_created, time.monotonic() + delay
        return run_created, 0.0

    def _link(self, state: str, exc: Exception | None = None) -> None:
        """Tell the user once when sending first fails, and again only when that changes:
        the server is back, or the spool starts dropping points (a wrong URL would otherwise
        stay silent until ``close()``)."""
        if state == "dropping":
            if not self._told_spool_drops:
                self._told_spool_drops = True
                logger.warning(
                    "stethoscope: the spool of run %s (%s) has no room left on disk or in memory; "
                    "the oldest unsent points are being dropped (counted in stethoscope/dropped)",
                    self.run_id,
                    self.spool_path,
                )
            return
        before, self._link_state = self._link_state, state
        if state == before or (state == "up" and before is None):
            return
        url = self.transport.base_url if self.transport is not None else "offline"
        if state == "down":
            logger.warning(
                "stethoscope: cannot send run %s to %s (%s); points are being spooled to %s "
                "and can be sent later with `stethoscope sync %s --server %s`. Sending is retried "
                "in the background; training is not affected",
                self.run_id,
                url,
                getattr(exc, "reason", None) or type(exc).__name__,
                self.spool_path,
                self.spool_path,
                url,
            )
        else:
            logger.warning(
                "stethoscope: the server at %s answers again; sending the spooled points of run %s", url, self.run_id
            )

    def _deliver(self, kind: str, body, resumed: bool = False) -> None:
        path = f"/api/v1/runs/{self.run_id}"
        if kind == "points" and not resumed:
            body, restart = self._resume.points(body)
            if restart is not None:  # before the points, so the step axis shows it first
                self.transport.request("POST", f"{path}/events", {"events": [restart]})
                self._resume.event_sent()
        if kind in ("points", "events"):
            try:
                reply = self.transport.request("POST", f"{path}/{kind}", body, compress=kind == "points")
            except Rejected as exc:
                halves = split_batch(kind, body) if exc.status == 413 else None
                if halves is None:
                    raise
                # Too large for this server's limits: send it in halves (each is idempotent,
                # so a half resent after a later failure stores nothing twice).
                for half in halves:
                    self._deliver(kind, half, resumed=True)
                return
        if kind == "points":
            alerts = reply.get("alerts") if isinstance(reply, dict) else None
            if alerts:
                self.watch.server_alerts(alerts)  # those the hook delivered already are not repeated
        elif kind == "status":
            self.transport.request("PATCH", path, body)

    def _finish(self, run_created: bool) -> None:
        spool = self._spool
        if spool is None:
            return
        # Entries still in memory: the disk refused them and the server did not take them.
        # Those the disk still refuses are lost and counted, except the final status, which
        # goes with the final count into the space the spool reserved for it.
        statuses = []
        for kind, body in spool.save_memory():
            if kind == "status":
                statuses.append((kind, body))
            else:
                self.spool_dropped += records_in(kind, body)
        last = []
        if self.dropped + self.spool_dropped != self._reported_drops and self._last_step is not None:
            batch = Batch(self.finish_values)
            step = self._last_step + (self._last_step == self._drop_step)  # a step not yet used
            self._report_drops(batch, step)
            last = list(batch.take())
        last += statuses
        if last:
            refused = spool.append_last(last)
            self.status_lost = any(kind == "status" for kind, _ in refused)
            if (
                self.transport is not None
                and not self._abort
                and self._deadline is not None
                and time.monotonic() < self._deadline
            ):
                self._drain(run_created, Backoff(), False)  # a server that is back takes them now
        self.unsent = spool.peek() is not None
        spool.close(remove_if_empty=self.transport is not None)
        if self.transport is not None:
            self.transport.close()
