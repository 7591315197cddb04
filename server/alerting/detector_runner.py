"""Detectors on ingest: state in, points through, alert rows and outbox rows out, one transaction.

The store calls :class:`DetectorRunner` inside each ingest transaction with the points that
were new. It routes them once (``DetectorSet.route``), loads the run's detector states (one
query), feeds the routed points to the project's
:class:`~stethoscope.core.detectors.DetectorSet`, saves the states, turns the alert changes into
alert rows (one per episode) and enqueues webhook deliveries, all before the commit: a crash
or a second worker neither forgets nor doubles an alert. The stalled-run check runs the same
way from a periodic thread (:meth:`DetectorRunner.check_stalled`). Every statement is the
store's: the runner calls its functions with the transaction's connection.

    runner = DetectorRunner(settings, wake_outbox=outbox.wake_on_commit)
    store = Store(engine, on_points=runner)
"""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace
from typing import Any, Callable

from sqlalchemy import Connection

from stethoscope.core.detectors import RESOLVE, AlertChange, DetectorSet, severity_rank
from stethoscope.core.detectors.stalled import StalledRunDetector

from ..ops.observability import METRICS
from ..settings import Settings
from ..store import Store
from ..store import alerts as _alerts
from ..store import detector_settings as _settings
from ..store import detector_states as _states
from ..store import runs as _runs
from ..store import webhooks as _webhooks
from ..store.models import utcnow
from .outbox import enqueue_for_alert, run_link

log = logging.getLogger("stethoscope.server.detectors")

STALLED = StalledRunDetector.name


class _ProjectDetectors:
    """A project's detector set (it routes series to detectors, and remembers how)."""

    __slots__ = ("dset", "expires")

    def __init__(self, dset: DetectorSet, expires: float) -> None:
        self.dset = dset
        self.expires = expires

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

    def _project(self, project_id: int, overrides: Callable[[int], dict]) -> _ProjectDetectors:
        """The project's detectors, from ``overrides(project_id)`` when not cached."""
        now = time.monotonic()
        p = self._cache.get(project_id)
        if p is not None and p.expires > now:
            return p
        p = _ProjectDetectors(_settings.detector_set(overrides(project_id)), now + self.ttl)
        with self._lock:
            self._cache[project_id] = p
        return p

    # -- on ingest -----------------------------------------------------------------------
    def __call__(
        self, conn: Connection, run_id: str, project_id: int, new_points: list[tuple[str, list[int], list[float]]]
    ) -> list[dict]:
        proj = self._project(project_id, lambda pid: _settings.load_overrides(conn, pid))
        # Routed here, once: the detectors fed are the keys, and ``feed`` takes the same dict.
        routed = proj.dset.route(new_points)
        if not routed:
            # Nothing for the detectors. A stalled alert of this run, if any, is resolved by
            # the periodic check within ``stall_check_s``.
            return []
        t0 = time.perf_counter()
        try:
            return self._run(conn, run_id, project_id, proj, routed)
        except Exception:
            # A bug in a detector must not cost the points (the client would retry the batch
            # forever): they commit, detection skips this batch. Nothing of it reached the
            # database: state is written last, alerts inside a savepoint.
            self.errors += 1
            log.exception("detectors failed on run %r; its points are stored without detection", run_id)
            return []
        finally:
            METRICS.detector_seconds.observe(time.perf_counter() - t0)

    def _run(
        self,
        conn: Connection,
        run_id: str,
        project_id: int,
        proj: _ProjectDetectors,
        routed: dict[str, list[tuple[str, int, float]]],
    ) -> list[dict]:
        state = _states.load_states(conn, run_id)
        stored = set(state)
        fed = set(routed)
        changes = proj.dset.feed(state, routed)
        stalled = state.get(STALLED)
        if stalled and stalled.get("episodes"):
            # Data is flowing again: the stalled alert resolves now, not at the next check.
            now = time.time()
            last_step = max(pts[-1][1] for pts in routed.values())  # each list is in step order
            changes += proj.dset.check(state, now, now, "running", last_step)
            fed.add(STALLED)
        # Encoded before any write: a state that is not strict JSON fails here, and then
        # neither it nor the alerts are written (they commit together or not at all).
        states = _states.encode_states({d: state[d] for d in fed if d in state})
        opened: list[dict] = []
        if changes:
            # Alerts are rare: their savepoint costs two round trips only when there are some.
            with conn.begin_nested():
                opened = self.apply_changes(conn, run_id, project_id, changes)
        _states.save_states(conn, run_id, states, stored)
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
            run_info = _runs.run_ref(conn, run_id)
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
        watched = store.detector_states.watched_runs(STALLED)
        shortest = min(
            [t for t in watched.timeouts if isinstance(t, (int, float))]
            + [DetectorSet().settings()[STALLED]["timeout_s"]]
        )
        cutoff = now.timestamp() - shortest
        todo = []
        for r in watched.runs:
            seen = _alerts.aware(r.last_seen_at)
            silent_long = r.status == "running" and seen is not None and seen.timestamp() <= cutoff
            if silent_long or r.id in watched.open_ids:
                timeout = self._project(r.project_id, store.detector_settings.overrides).stalled_timeout
                if timeout is None:  # disabled for the project: nothing opens or resolves
                    continue
                stalled = silent_long and now.timestamp() - seen.timestamp() > timeout
                if stalled != (r.id in watched.open_ids):
                    todo.append(r.id)
        for run_id in todo:
            # FOR UPDATE: ingest of this run (which updates the row first) waits, so the state
            # read-modify-write below cannot interleave with it on PostgreSQL.
            store.detector_states.with_locked_run(run_id, self._check_run)
        return len(todo)

    def _check_run(self, conn: Connection, run: Any) -> None:
        proj = self._project(run.project_id, lambda pid: _settings.load_overrides(conn, pid))
        saved = _states.load_state(conn, run.id, STALLED)
        state = {STALLED: saved} if saved is not None else {}
        seen = _alerts.aware(run.last_seen_at)
        changes = proj.dset.check(state, time.time(), seen.timestamp() if seen else None, run.status, run.last_step)
        if not changes:
            return
        _states.save_states(
            conn, run.id, _states.encode_states({STALLED: state[STALLED]}), {STALLED} if saved is not None else set()
        )
        self.apply_changes(conn, run.id, run.project_id, changes)
