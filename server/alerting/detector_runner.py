"""Detectors on ingest: state in, points through, alert rows and outbox rows out, one transaction.

The store calls :class:`DetectorRunner` inside each ingest transaction with the points that
were new. It loads the run's detector states (one query), feeds the points to the project's
:class:`~stethoscope.core.detectors.DetectorSet`, saves the states, turns the alert changes into
alert rows (one per episode) and enqueues webhook deliveries, all before the commit: a crash
or a second worker neither forgets nor doubles an alert. The stalled-run check runs the same
way from a periodic thread (:meth:`DetectorRunner.check_stalled`).

    runner = DetectorRunner(settings, wake_outbox=outbox.wake_on_commit)
    store = Store(engine, on_points=runner)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from itertools import repeat
from types import SimpleNamespace
from typing import Any, Callable

import orjson
from sqlalchemy import Connection, select

from stethoscope.core.detectors import RESOLVE, AlertChange, DetectorSet, severity_rank
from stethoscope.core.detectors.stalled import StalledRunDetector

from ..store.models import Alert, DetectorSetting, DetectorState, Project, Run, utcnow
from ..ops.observability import METRICS
from .outbox import enqueue_for_alert, run_link
from ..settings import Settings
from ..store import Store
from ..store import alerts as _alerts
from ..store import detector_settings as _settings
from ..store import webhooks as _webhooks
from ..store.sql import placeholder

log = logging.getLogger("stethoscope.server.detectors")

DS = DetectorState.__table__
DSET = DetectorSetting.__table__
R = Run.__table__
P = Project.__table__
A = Alert.__table__

#: Detector states are one row per (run, detector); the table's ``key`` column stays empty.
STATE_KEY = ""
STALLED = StalledRunDetector.name


class _ProjectDetectors:
    """A project's detector set and which of its detectors each series name feeds."""

    __slots__ = ("dset", "expires", "_routes")

    def __init__(self, dset: DetectorSet, expires: float) -> None:
        self.dset = dset
        self.expires = expires
        self._routes: dict[str, tuple[str, ...]] = {}

    def route(self, series: str) -> tuple[str, ...]:
        r = self._routes.get(series)
        if r is None:
            if len(self._routes) > 4096:
                self._routes.clear()
            r = self._routes[series] = tuple(d.name for d in self.dset.detectors if d.accepts(series))
        return r

    @property
    def stalled_timeout(self) -> float | None:
        for d in self.dset.detectors:
            if d.name == STALLED:
                return d.params.timeout_s
        return None


class DetectorRunner:
    """The store's ``on_points`` callable, and the periodic stalled-run check."""

    def __init__(self, settings: Settings, wake_outbox: Callable[[Connection], None] | None = None) -> None:
        self.ttl = settings.detector_settings_ttl_s
        self.base_url = settings.base_url
        self.wake_outbox = wake_outbox
        #: Internal failures: logged, and the points are stored without detection (tests assert 0).
        self.errors = 0
        self._cache: dict[int, _ProjectDetectors] = {}
        self._lock = threading.Lock()

    # -- settings ----------------------------------------------------------------------
    def invalidate(self) -> None:
        """Forget cached settings (after a change through this worker)."""
        with self._lock:
            self._cache.clear()

    def _project(self, conn: Connection, project_id: int) -> _ProjectDetectors:
        now = time.monotonic()
        p = self._cache.get(project_id)
        if p is not None and p.expires > now:
            return p
        p = _ProjectDetectors(_settings.detector_set(_settings.load_overrides(conn, project_id)), now + self.ttl)
        with self._lock:
            self._cache[project_id] = p
        return p

    # -- on ingest -----------------------------------------------------------------------
    def __call__(self, conn: Connection, run_id: str, project_id: int, new_points: list[tuple[str, list[int], list[float]]]) -> list[dict]:
        proj = self._project(conn, project_id)
        fed: set[str] = set()
        points: list[tuple[str, int, float]] = []
        last_step = None
        for name, steps, values in new_points:
            route = proj.route(name)
            if route:
                fed.update(route)
                points.extend(zip(repeat(name), steps, values))
                top = max(steps)
                last_step = top if last_step is None else max(last_step, top)
        if not points:
            # Nothing for the detectors. A stalled alert of this run, if any, is resolved by
            # the periodic check within ``stall_check_s``.
            return []
        t0 = time.perf_counter()
        try:
            return self._run(conn, run_id, project_id, proj, points, fed, last_step)
        except Exception:
            # A bug in a detector must not cost the points (the client would retry the batch
            # forever): they commit, detection skips this batch. Nothing of it reached the
            # database: state is written last, alerts inside a savepoint.
            self.errors += 1
            log.exception("detectors failed on run %r; its points are stored without detection", run_id)
            return []
        finally:
            METRICS.detector_seconds.observe(time.perf_counter() - t0)

    def _run(self, conn: Connection, run_id: str, project_id: int, proj: _ProjectDetectors,
             points: list[tuple[str, int, float]], fed: set[str], last_step: int) -> list[dict]:
        state = load_states(conn, run_id)
        stored = set(state)
        changes = proj.dset.update(state, points)
        stalled = state.get(STALLED)
        if stalled and stalled.get("episodes"):
            # Data is flowing again: the stalled alert resolves now, not at the next check.
            now = time.time()
            changes += proj.dset.check(state, now, now, "running", last_step)
            fed.add(STALLED)
        # Encoded before any write: a state that is not strict JSON fails here, and then
        # neither it nor the alerts are written (they commit together or not at all).
        states = encode_states({d: state[d] for d in fed if d in state})
        opened: list[dict] = []
        if changes:
            # Alerts are rare: their savepoint costs two round trips only when there are some.
            with conn.begin_nested():
                opened = self.apply_changes(conn, run_id, project_id, changes)
        save_states(conn, run_id, states, stored)
        return opened

    # -- alert rows and deliveries ---------------------------------------------------------
    def apply_changes(self, conn: Connection, run_id: str, project_id: int, changes: list[AlertChange]) -> list[dict]:
        """Write alert changes as rows and enqueue webhook deliveries; returns the alerts opened."""
        open_rows: dict[tuple[str, str], Any] = _alerts.open_alerts(conn, run_id)
        opened: list[int] = []
        events: list[tuple[str, int, int]] = []  # (event, alert id, its change number)
        for c in changes:
            k = (c.detector, c.key)
            row = open_rows.get(k)
            if c.action == RESOLVE:
                if row is not None:
                    _alerts.update_alert(conn, row.id, c, resolve=True)
                    del open_rows[k]
                    events.append(("alert.resolved", row.id, _alerts.next_change(conn, row.id)))
            elif row is None:  # OPEN, or an UPDATE of an episode whose row is gone: one row per episode
                aid = _alerts.insert_alert(conn, run_id, project_id, c)
                open_rows[k] = SimpleNamespace(id=aid, severity=c.severity)
                opened.append(aid)
                events.append(("alert.opened", aid, 1))
            else:
                _alerts.update_alert(conn, row.id, c, resolve=False)
                if severity_rank(c.severity) > severity_rank(row.severity):
                    events.append(("alert.escalated", row.id, _alerts.next_change(conn, row.id)))
                open_rows[k] = SimpleNamespace(id=row.id, severity=c.severity)
        if not events:
            return []
        alerts = {a["id"]: a for a in _alerts.get_alerts(conn, {aid for _, aid, _ in events})}
        hooks = _webhooks.enabled_for_project(conn, project_id)
        if hooks:
            run = conn.execute(select(R.c.id, R.c.name, P.c.name.label("project")).join(P, P.c.id == R.c.project_id).where(R.c.id == run_id)).one()
            run_info = {"id": run.id, "name": run.name, "project": run.project}
            link = run_link(self.base_url, run_id)
            queued = []
            for name, aid, seq in events:
                notified = _webhooks.notified_for_alert(conn, aid) if name == "alert.resolved" else set()
                queued += enqueue_for_alert(conn, hooks, notified, name, alerts[aid], run_info, link, seq)
            if queued and self.wake_outbox is not None:
                self.wake_outbox(conn)
        return [alerts[aid] for aid in opened]

    # -- stalled runs ----------------------------------------------------------------------
    def check_stalled(self, store: Store) -> int:
        """Open or resolve stalled-run alerts; returns how many runs changed."""
        now = utcnow()
        with store.reading() as conn:
            timeouts = [p.get("timeout_s") for p in conn.execute(select(DSET.c.params).where(DSET.c.detector == STALLED)).scalars()]
            shortest = min([t for t in timeouts if isinstance(t, (int, float))] + [DetectorSet().settings()[STALLED]["timeout_s"]])
            cutoff = now.timestamp() - shortest
            running = conn.execute(select(R.c.id, R.c.project_id, R.c.status, R.c.last_seen_at).where(R.c.status == "running", R.c.last_seen_at.is_not(None))).all()
            open_ids = set(conn.execute(select(A.c.run_id).where(A.c.detector == STALLED, A.c.status == "open")).scalars())
            others = conn.execute(select(R.c.id, R.c.project_id, R.c.status, R.c.last_seen_at).where(R.c.id.in_(open_ids - {r.id for r in running}))).all() if open_ids else []
            todo = []
            for r in [*running, *others]:
                seen = _alerts.aware(r.last_seen_at)
                silent_long = r.status == "running" and seen is not None and seen.timestamp() <= cutoff
                if silent_long or r.id in open_ids:
                    timeout = self._project(conn, r.project_id).stalled_timeout
                    if timeout is None:  # disabled for the project: nothing opens or resolves
                        continue
                    stalled = silent_long and now.timestamp() - seen.timestamp() > timeout
                    if stalled != (r.id in open_ids):
                        todo.append(r.id)
        for run_id in todo:
            with store.writing() as conn:
                self._check_run(conn, run_id)
        return len(todo)

    def _check_run(self, conn: Connection, run_id: str) -> None:
        # FOR UPDATE: ingest of this run (which updates the row first) waits, so the state
        # read-modify-write below cannot interleave with it on PostgreSQL.
        run = conn.execute(select(R.c.project_id, R.c.status, R.c.last_seen_at, R.c.last_step).where(R.c.id == run_id).with_for_update()).first()
        if run is None:
            return
        proj = self._project(conn, run.project_id)
        row = conn.execute(select(DS.c.state).where(DS.c.run_id == run_id, DS.c.detector == STALLED, DS.c.key == STATE_KEY)).first()
        state = {STALLED: row.state or {}} if row is not None else {}
        seen = _alerts.aware(run.last_seen_at)
        changes = proj.dset.check(state, time.time(), seen.timestamp() if seen else None, run.status, run.last_step)
        if not changes:
            return
        save_states(conn, run_id, encode_states({STALLED: state[STALLED]}), {STALLED} if row is not None else set())
        self.apply_changes(conn, run_id, run.project_id, changes)


def load_states(conn: Connection, run_id: str) -> dict[str, dict]:
    """A run's detector states, by detector."""
    ph = placeholder(conn.dialect.name)
    rows = conn.exec_driver_sql(f"SELECT detector, state FROM detector_states WHERE run_id = {ph} AND key = ''", (run_id,)).all()
    # psycopg hands json columns over parsed; SQLite as text.
    return {d: (_parse(st) if isinstance(st, (str, bytes)) else st) or {} for d, st in rows}


def _parse(text: str | bytes) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:  # what orjson does not take (an integer past 64 bits)
        return json.loads(text)


def encode_states(states: dict[str, dict]) -> dict[str, str]:
    """States as strict JSON text. ``ValueError`` for one that is not (an infinity a
    detector kept): on PostgreSQL its statement would fail and take the whole ingest
    transaction with it."""
    return {d: json.dumps(st, allow_nan=False, separators=(",", ":")) for d, st in states.items()}


def save_states(conn: Connection, run_id: str, states: dict[str, str], stored: set[str]) -> None:
    """Write encoded detector states (``encode_states``): UPDATE the rows that exist, INSERT
    the others (the run's row is locked by the transaction, so no other writer can insert
    them in between). Plain SQL, parameters as tuples: this runs on every ingest."""
    ph = placeholder(conn.dialect.name)
    js = f"CAST({ph} AS json)" if conn.dialect.name == "postgresql" else ph
    ups = [(s, run_id, d) for d, s in states.items() if d in stored]
    new = [(run_id, d, s) for d, s in states.items() if d not in stored]
    if ups:
        conn.exec_driver_sql(f"UPDATE detector_states SET state = {js} WHERE run_id = {ph} AND detector = {ph} AND key = ''", ups)
    if new:
        conn.exec_driver_sql(f"INSERT INTO detector_states (run_id, detector, key, state) VALUES ({ph}, {ph}, '', {js})", new)
