"""The store: every database operation of the service, behind one object.

Routes stay thin and call these methods; each method is one transaction. Alerts, detector
settings, webhooks, tokens, the gate's project look-ups and the stalled-run check's reads are
sub-stores (``store.alerts``, ``store.webhooks``, ...), each a small module here. Code that
must run inside a transaction the store opened (the detector runner, inside ingest) gets its
connection and calls the functions of those modules; no statement lives outside this package
(``tests/server/test_store_boundary.py`` keeps it so).

    store = Store(make_engine(settings))
    store.upsert_run("r1", project="demo", name="baseline", config={}, tags=[])
    store.ingest("r1", [SeriesBatch("loss", [0, 1], [2.3, 2.1], [t0, t1])])
    store.alerts.list_run("r1")
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterator

from sqlalchemy import Connection, Engine, func, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, IntegrityError

from . import runs as _runs
from .alerts import group_incidents
from .db import WRITE_OPTION
from .downsample import SeriesRead, SeriesReader
from .errors import Conflict, LimitExceeded, NotFound
from .group_commit import GroupCommitter
from .models import Event, Run, Series, utcnow
from .overview import Overview
from .points import PointWriter, SeriesBatch
from .sql import placeholder

log = logging.getLogger("stethoscope.server.store")

__all__ = [
    "Store",
    "SeriesBatch",
    "SeriesRead",
    "IngestResult",
    "NotFound",
    "Conflict",
    "LimitExceeded",
    "group_incidents",
]

R = Run.__table__
S = Series.__table__
E = Event.__table__

#: ``on_points(conn, run_id, project_id, [(series, steps, values), ...]) -> alerts opened``; one
#: whose ``takes_after_commit`` is true gets a fifth argument, a list it may append callables
#: to: they run once the transaction committed, never after a rollback.
OnPoints = Callable[[Connection, str, int, list[tuple[str, list[int], list[float]]]], list[dict]]

#: Series ids kept in memory (run, name) -> id; a few MB at most.
SERIES_CACHE_SIZE = 100_000

#: Series names one statement looks up or creates (well inside both databases' parameter limits).
NAMES_PER_STATEMENT = 1000


def _no_run(run_id: str) -> NotFound:
    """What ingest into a run that does not exist raises (the gate says the same of a run it
    hides: ``auth.access.not_found``)."""
    return NotFound(f"run {run_id!r} does not exist: create it first with PUT /api/v1/runs/{run_id}")


class _Retry(Exception):
    """An ingest transaction lost its connection before its commit: ``cause``."""

    def __init__(self, cause: DBAPIError) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass(slots=True)
class IngestResult:
    points: int
    inserted: int
    #: What the detectors made of the new points (filled by the detector runner).
    alerts: list[dict] = field(default_factory=list)
    #: Newly stored points per series name, for the detector runner: [(name, steps, values)].
    new_points: list[tuple[str, list[int], list[float]]] = field(default_factory=list)
    #: What the store remembers once the transaction committed (the series ids it created).
    _commit_info: tuple = field(default=(), repr=False)


class Store:
    def __init__(self, engine: Engine, on_points: OnPoints | None = None) -> None:
        self.engine = engine
        #: Called inside each ingest transaction with the newly stored points (the detectors).
        self.on_points = on_points
        #: Most series one run may have (``Settings.max_series_per_run``); None: no limit.
        self.max_series_per_run: int | None = None
        self.dialect = engine.dialect.name
        self._writer = PointWriter(self.dialect)
        self._reader = SeriesReader(self.dialect)
        self._insert_new = pg_insert if self.dialect == "postgresql" else sqlite_insert
        ph = placeholder(self.dialect)
        self._touch_sql = f"UPDATE runs SET last_seen_at = {ph} WHERE id = {ph} RETURNING project_id"
        self._touch_step_sql = _runs.touch_step_sql(ph)
        self._seen_bind = R.c.last_seen_at.type.dialect_impl(engine.dialect).bind_processor(engine.dialect)
        self._series_ids: OrderedDict[tuple[str, str], int] = OrderedDict()
        #: run id -> (its project's id, the last step this worker has stored of it), for runs
        #: this worker has stored points of (PostgreSQL).
        self._run_projects: OrderedDict[str, tuple[int, int | None]] = OrderedDict()
        self._cache_lock = threading.Lock()
        # SQLite has one writer at a time. Threads of this process queue here, on a lock that
        # wakes the next one at once, rather than in SQLite's busy handler, which sleeps.
        self._write_lock = threading.Lock() if self.dialect == "sqlite" else None
        # SQLite writes one transaction at a time anyway: concurrent ingests share one.
        self._ingest_group = (
            GroupCommitter(self._write_lock, self._begin_write, self._ingest_in, self._after_ingest_commit)
            if self._write_lock is not None
            else None
        )
        # -- sub-stores (issue 15): each method one transaction ------------------------
        # Imported here: ``webhooks`` reads ``alerting.webhook_targets``, whose package
        # imports this one.
        from .access import AccessStore
        from .alerts import AlertStore
        from .detector_settings import DetectorSettingsStore
        from .detector_states import DetectorStateStore
        from .tokens import TokenStore
        from .webhooks import WebhookStore

        self.alerts = AlertStore(self)
        self.detector_settings = DetectorSettingsStore(self)
        self.detector_states = DetectorStateStore(self)
        self.webhooks = WebhookStore(self)
        self.tokens = TokenStore(self)
        self.access = AccessStore(self)

    # -- transactions -----------------------------------------------------------------
    @contextmanager
    def writing(self) -> Iterator[Connection]:
        if self._write_lock is not None:
            self._write_lock.acquire()
        try:
            with self._begin_write() as conn:
                yield conn
        finally:
            if self._write_lock is not None:
                self._write_lock.release()

    @contextmanager
    def _begin_write(self) -> Iterator[Connection]:
        with self.engine.connect().execution_options(**{WRITE_OPTION: True}) as conn, conn.begin():
            yield conn

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    # -- runs -------------------------------------------------------------------------
    def upsert_run(
        self, run_id: str, project: str, name: str | None = None, config: dict | None = None, tags: list | None = None
    ) -> tuple[dict, bool]:
        with self.writing() as conn:
            return _runs.upsert_run(conn, run_id, project, name, config, tags)

    def update_run(
        self, run_id: str, status: str | None = None, name: str | None = None, tags: list | None = None
    ) -> dict:
        with self.writing() as conn:
            return _runs.update_run(conn, run_id, status, name, tags)

    def get_run(self, run_id: str) -> dict:
        with self.reading() as conn:
            return _runs.get_run(conn, run_id)

    def list_runs(self, **filters) -> list[dict]:
        with self.reading() as conn:
            return _runs.list_runs(conn, **filters)

    def list_projects(self) -> list[dict]:
        with self.reading() as conn:
            return _runs.project_names(conn)

    # -- points -----------------------------------------------------------------------
    def ingest(self, run_id: str, batches: list[SeriesBatch]) -> IngestResult:
        """Store a batch; returns once it is committed. Resent points are not stored twice."""
        if self._ingest_group is not None:
            return self._ingest_group.submit(run_id, batches)
        # PostgreSQL: concurrent transactions, each its own; the server commits them in
        # parallel (and groups their WAL flushes itself).
        result = self._ingest_autocommit(run_id, batches)
        if result is not None:
            self._after_ingest_commit(result)
            return result
        try:
            result = self._ingest_pg(run_id, batches)
        except _Retry as r:
            # The connection was lost before the commit was asked for (a backend that ended
            # after the pool's check, ``db._ping_when_spoken_to``): nothing of the batch was
            # stored, so it goes once more, on another connection.
            log.info("ingest on run %r lost its database connection before its commit (%s); once more", run_id, r.cause)
            result = self._ingest_pg(run_id, batches, retry=False)
        self._after_ingest_commit(result)
        return result

    def _ingest_autocommit(self, run_id: str, batches: list[SeriesBatch]) -> IngestResult | None:
        """PostgreSQL: a batch of a run seen before, of series it has, that no detector takes
        and whose every point is new, as one statement that is its own transaction: the run
        touched, the points stored and their rollups merged, committed with the statement's
        own round trip (a transaction block adds BEGIN's and COMMIT's: ~0.1 ms of the server's
        CPU a batch). None when the batch is not that case (nothing done then), or when a point
        of it was stored already: the statement then failed whole, stored nothing, and the
        transaction of ``_ingest_pg`` takes the batch as ever (a resend, an overlap). Only a
        batch whose first step is past the last step this worker stored of the run goes this
        way: a resend or an overlap that this worker can tell (steps it stored) does not cost a
        failed statement, nor the database's log an error line.

        Nothing else would have been in the transaction: the detector runner takes none of
        these series (``takes_none``, from the settings it has cached; it would have returned
        no alert without a statement). A lost connection is not retried here: the statement
        may have committed."""
        known_run = self._run_projects.get(run_id)
        if known_run is None:
            return None
        project_id, stored_to = known_run
        takes_none = getattr(self.on_points, "takes_none", None) if self.on_points is not None else None
        if self.on_points is not None and (takes_none is None or not takes_none(project_id, [b.name for b in batches])):
            return None
        full = [b for b in batches if b.steps]
        known = self._cached_ids(run_id, full) if full else None
        if known is None or stored_to is None or min(min(b.steps) for b in full) <= stored_to:
            return None
        last_step = max(max(b.steps) for b in full)
        with self.engine.connect() as conn:
            raw = conn.connection.driver_connection
            raw.autocommit = True
            try:
                found = self._writer.write_all_new(conn, known, (self._seen(), last_step, run_id))
            except IntegrityError as e:
                if getattr(e.orig, "sqlstate", None) == "23505":  # unique_violation: stored already
                    return None
                raise
            finally:
                if not raw.closed and not raw.broken:
                    raw.autocommit = False
        if found is None:
            raise _no_run(run_id)
        total = sum(len(b.steps) for b in full)
        result = IngestResult(total, total, new_points=[(b.name, b.steps, b.values) for b in full])
        result._commit_info = (run_id, {}, (), found, last_step)
        return result

    def _ingest_pg(self, run_id: str, batches: list[SeriesBatch], retry: bool = True) -> IngestResult:
        committing = False
        try:
            with self._begin_write() as conn:
                result = self._ingest_in(conn, run_id, batches)
                committing = True
        except DBAPIError as e:
            if retry and not committing and e.connection_invalidated:
                raise _Retry(e) from e
            raise
        return result

    def _ingest_in(self, conn: Connection, run_id: str, batches: list[SeriesBatch]) -> IngestResult:
        total = sum(len(b.steps) for b in batches)
        batches = [b for b in batches if b.steps]
        last_step = max((max(b.steps) for b in batches), default=None)
        known = self._cached_ids(run_id, batches) if self._writer.postgres and batches else None
        if known is not None:
            # PostgreSQL, every series known: one statement marks the run as seen, stores
            # the points and merges their rollups.
            project_id, new = self._writer.write_touching(conn, known, (self._seen(), last_step, run_id))
            if project_id is None:
                raise _no_run(run_id)
            created: dict[str, int] = {}
        else:
            # One statement marks the run as seen and tells whether it exists.
            project_id = self._touch_run(conn, run_id, last_step)
            if project_id is None:
                raise _no_run(run_id)
            ids, created = self._resolve_series(conn, run_id, [b.name for b in batches])
            new = self._writer.write(conn, [(ids[b.name], b) for b in batches])
        new_points = [(sb.name, sb.steps, sb.values) for _, sb in new]
        alerts: list[dict] = []
        committed: list[Callable[[], None]] = []
        if self.on_points is not None and new_points:
            # Same transaction as the points: detector state and alerts commit with them,
            # so a crash or a second worker neither forgets nor doubles an alert.
            if getattr(self.on_points, "takes_after_commit", False):
                alerts = self.on_points(conn, run_id, project_id, new_points, committed)
            else:
                alerts = self.on_points(conn, run_id, project_id, new_points)
        inserted = sum(len(sb.steps) for _, sb in new)
        result = IngestResult(total, inserted, alerts=alerts, new_points=new_points)
        result._commit_info = (run_id, created, committed, project_id, last_step)
        return result

    def _touch_run(self, conn: Connection, run_id: str, last_step: int | None) -> int | None:
        """Mark the run as seen (and its last step as at least ``last_step``); its project id,
        or None when there is no such run. Plain SQL text: building the statement with
        SQLAlchemy's expression language cost ~0.19 ms on every batch (its cache key and
        compiled-statement look-up), the text ~15 us; ``exec_driver_sql`` still wraps the
        driver's errors, so an outage is still a 503 and a lost connection still invalidated."""
        seen = self._seen()
        if last_step is None:
            rows = conn.exec_driver_sql(self._touch_sql, (seen, run_id)).all()
        else:
            rows = conn.exec_driver_sql(self._touch_step_sql, (seen, last_step, last_step, run_id)).all()
        return rows[0][0] if rows else None

    def _seen(self):
        seen = utcnow()
        if self._seen_bind is not None:
            seen = self._seen_bind(seen)  # SQLite: the text SQLAlchemy itself stores
        return seen

    def _cached_ids(self, run_id: str, batches: list[SeriesBatch]) -> list[tuple[int, SeriesBatch]] | None:
        """(series id, batch) for each batch when the cache knows every series; else None."""
        out = []
        cache = self._series_ids
        with self._cache_lock:
            for b in batches:
                sid = cache.get((run_id, b.name))
                if sid is None:
                    return None
                out.append((sid, b))
        return out

    def _after_ingest_commit(self, result: IngestResult) -> None:
        run_id, created, committed, project_id, last_step = result._commit_info
        self._remember(run_id, created, project_id, last_step)
        # What ``on_points`` asked to run once its writes are durable (the detector runner's
        # state cache): never for a transaction that rolled back (a group that ran again
        # without a failed job builds new results, and their own callbacks).
        for fn in committed:
            try:
                fn()
            except Exception:  # the batch is stored: its reply must not turn into an error
                log.exception("after-commit callback failed on run %r", run_id)

    def _resolve_series(self, conn: Connection, run_id: str, names: list[str]) -> tuple[dict[str, int], dict[str, int]]:
        ids: dict[str, int] = {}
        missing: list[str] = []
        with self._cache_lock:
            for n in names:
                sid = self._series_ids.get((run_id, n))
                if sid is None:
                    missing.append(n)
                else:
                    ids[n] = sid
        created: dict[str, int] = {}
        if missing:
            found = self._series_named(conn, run_id, missing)
            todo = [n for n in missing if n not in found]
            self._check_series_limit(conn, run_id, len(todo))
            for k in range(0, len(todo), NAMES_PER_STATEMENT):
                # One statement for up to a thousand of a run's new series (its first batch
                # brings dozens). A name another worker created in between is skipped by
                # the conflict clause and read back below.
                chunk = todo[k : k + NAMES_PER_STATEMENT]
                stmt = self._insert_new(S).values([{"run_id": run_id, "name": n} for n in chunk])
                found.update(
                    conn.execute(
                        stmt.on_conflict_do_nothing(index_elements=[S.c.run_id, S.c.name]).returning(S.c.name, S.c.id)
                    ).all()
                )
            late = [n for n in todo if n not in found]
            if late:
                found.update(self._series_named(conn, run_id, late))
            ids.update(found)
            created = found
        return ids, created

    @staticmethod
    def _series_named(conn: Connection, run_id: str, names: list[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for k in range(0, len(names), NAMES_PER_STATEMENT):
            chunk = names[k : k + NAMES_PER_STATEMENT]
            found.update(conn.execute(select(S.c.name, S.c.id).where(S.c.run_id == run_id, S.c.name.in_(chunk))).all())
        return found

    def _check_series_limit(self, conn: Connection, run_id: str, new: int) -> None:
        # Counted only when a batch brings new names (rare once a run is going). Two workers
        # adding series at once may each pass and overshoot by a batch: a bound, not a quota.
        limit = self.max_series_per_run
        if not new or limit is None:
            return
        have = conn.execute(select(func.count()).select_from(S).where(S.c.run_id == run_id)).scalar_one()
        if have + new > limit:
            raise LimitExceeded(
                f"run {run_id!r} has {have} series and this batch would add {new} more, past the limit of {limit} "
                f"series per run (STETHOSCOPE_MAX_SERIES_PER_RUN); nothing of the batch was stored"
            )

    def _remember(
        self, run_id: str, ids: dict[str, int], project_id: int | None = None, last_step: int | None = None
    ) -> None:
        # Only after commit: a rolled-back insert must not leave a dangling id in the cache.
        if project_id is not None:
            # A run's project never changes (``upsert_run`` refuses another) and runs are not
            # deleted: the id stays true. The last step only grows (batches of one run may
            # commit out of order on several threads).
            with self._cache_lock:
                had = self._run_projects.get(run_id)
                if had is not None and had[1] is not None and (last_step is None or had[1] >= last_step):
                    last_step = had[1]
                self._run_projects[run_id] = (project_id, last_step)
                while len(self._run_projects) > SERIES_CACHE_SIZE:
                    self._run_projects.popitem(last=False)
        if not ids:
            return
        with self._cache_lock:
            for n, sid in ids.items():
                self._series_ids[(run_id, n)] = sid
            while len(self._series_ids) > SERIES_CACHE_SIZE:
                self._series_ids.popitem(last=False)

    def list_series(self, run_id: str) -> list[dict]:
        ph = placeholder(self.dialect)
        with self.reading() as conn:
            _runs.get_run(conn, run_id)
            rows = conn.execute(select(S.c.id, S.c.name).where(S.c.run_id == run_id).order_by(S.c.name)).all()
            out = []
            for sid, name in rows:
                last = conn.exec_driver_sql(
                    f"SELECT step, value FROM points WHERE series_id = {ph} ORDER BY step DESC LIMIT 1", (sid,)
                ).first()
                first = conn.exec_driver_sql(f"SELECT min(step) FROM points WHERE series_id = {ph}", (sid,)).scalar()
                out.append(
                    {
                        "name": name,
                        "first_step": first,
                        "last_step": last[0] if last else None,
                        "last_value": (float("nan") if last[1] is None else last[1]) if last else None,
                    }
                )
            return out

    def read_series(
        self, run_id: str, name: str, start: int | None = None, end: int | None = None, max_points: int = 2000
    ) -> SeriesRead:
        with self.reading() as conn:
            sid = conn.execute(select(S.c.id).where(S.c.run_id == run_id, S.c.name == name)).scalar()
            if sid is None:
                _runs.get_run(conn, run_id)  # 404 for the run first, if that is what is missing
                raise NotFound(f"run {run_id!r} has no series {name!r}")
            return self._reader.read(conn, sid, start, end, max_points)

    def read_many(
        self, run_id: str, names: list[str], start: int | None = None, end: int | None = None, max_points: int = 2000
    ) -> dict[str, SeriesRead]:
        """``read_series`` of several series of a run in one transaction and a few statements
        (see ``SeriesReader.read_many``); a name the run lacks is left out of the result."""
        with self.reading() as conn:
            ids = self._series_named(conn, run_id, list(dict.fromkeys(names)))
            got = self._reader.read_many(conn, list(ids.values()), start, end, max_points)
        return {name: got[sid] for name, sid in ids.items()}

    # -- events -----------------------------------------------------------------------
    def add_events(self, run_id: str, events: list[dict]) -> int:
        """Store events; an event whose key is stored already is skipped. Returns how many were new."""
        with self.writing() as conn:
            _runs.get_run(conn, run_id)
            keys = [e["key"] for e in events]
            have = set(conn.execute(select(E.c.key).where(E.c.run_id == run_id, E.c.key.in_(keys))).scalars())
            fresh = []
            seen: set[str] = set()
            for e in events:
                if e["key"] in have or e["key"] in seen:
                    continue
                seen.add(e["key"])
                fresh.append({**e, "run_id": run_id})
            if fresh:
                conn.execute(insert(E), fresh)
            return len(fresh)

    def list_events(self, run_id: str, kind: str | None = None) -> list[dict]:
        with self.reading() as conn:
            _runs.get_run(conn, run_id)
            stmt = select(E).where(E.c.run_id == run_id)
            if kind is not None:
                stmt = stmt.where(E.c.kind == kind)
            return [
                {
                    "key": r.key,
                    "step": r.step,
                    "kind": r.kind,
                    "message": r.message,
                    "info": r.info or {},
                    "wall": r.wall,
                }
                for r in conn.execute(stmt.order_by(E.c.step, E.c.id))
            ]

    # -- the dashboard's reads (store/overview.py) --------------------------------------
    @cached_property
    def overview(self) -> Overview:
        """The dashboard's read-only queries: ``store.overview.alerts(project="demo")``."""
        return Overview(self)

    # -- schema and summaries (issue 15) ----------------------------------------------
    def schema_revision(self) -> str | None:
        """The migration the database is at (None: an empty database)."""
        from alembic.runtime.migration import MigrationContext

        with self.reading() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def continual_summary(self, run_id: str, max_points: int = 2000) -> dict:
        """The run's continual-learning summary (``store/continual.py``)."""
        from .continual import run_summary

        return run_summary(self, run_id, max_points)
