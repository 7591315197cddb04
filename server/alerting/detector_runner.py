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
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy import Connection

from stethoscope.core.detectors import CAUSES, RESOLVE, AlertChange, DetectorSet, severity_rank
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

#: Runs whose decoded detector states a runner keeps between requests (least recently used
#: dropped first); a run's states are some tens of KB.
STATE_CACHE_RUNS = 256


def _as_left_by(c: AlertChange) -> dict:
    """What an open, reopen or escalation showed of its alert when it happened."""
    return {
        "status": "open",
        "resolved_at": None,
        "severity": c.severity,
        "peak_step": c.peak_step,
        "end_step": c.end_step,
        "message": c.message,
        "evidence": c.evidence,
    }


@dataclass(slots=True)
class _Row:
    """What ``apply_changes`` keeps of an alert row it changes."""

    id: int
    severity: str
    cause_alert_id: int | None


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
    """The store's ``on_points`` callable, and the periodic stalled-run check.

    It keeps the states it saved, decoded, with the text it wrote (at most ``state_cache_runs``
    runs; 0: none). A request takes a run's kept states out (no other request can change them
    meanwhile) and uses one only where the text it read from the database in its own
    transaction is the text kept: another worker's write, the stalled-run check's, a restart
    or a rollback all show as another text, and that state is decoded afresh. The states it
    saves go back once the transaction committed (the store's after-commit callbacks); a
    request that fails or rolls back puts nothing back. A state kept is the objects the
    detectors left, so the sorted copies of its windows (``SortedWindows``, kept by the
    lists' identity) stay valid from one request to the next instead of being rebuilt.
    """

    #: The store passes ``__call__`` a list of after-commit callbacks.
    takes_after_commit = True

    def __init__(
        self,
        settings: Settings,
        wake_outbox: Callable[[Connection], None] | None = None,
        state_cache_runs: int = STATE_CACHE_RUNS,
    ) -> None:
        self.ttl = settings.detector_settings_ttl_s
        self.base_url = settings.base_url
        self.wake_outbox = wake_outbox
        #: Internal failures: logged, and the points are stored without detection (tests assert 0).
        self.errors = 0
        self._cache: dict[int, _ProjectDetectors] = {}
        self._lock = threading.Lock()
        self.state_cache_runs = state_cache_runs
        #: run id -> {detector: (stored text, the state decoded from it)}, least recently used first.
        self._states: OrderedDict[str, dict[str, tuple[str, dict]]] = OrderedDict()
        self._states_lock = threading.Lock()

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
    def takes_none(self, project_id: int, names: list[str]) -> bool:
        """True when the project's detectors, as cached now (not expired), take no series of
        these names: ``__call__`` would then route nothing and return no alert without a
        statement, so the store may write such a batch without a transaction of its own
        (``Store._ingest_autocommit``). False when one is taken, or the settings are not at hand."""
        p = self._cache.get(project_id)
        return p is not None and p.expires > time.monotonic() and not p.dset.takes_any(names)

    def __call__(
        self,
        conn: Connection,
        run_id: str,
        project_id: int,
        new_points: list[tuple[str, list[int], list[float]]],
        after_commit: list[Callable[[], None]] | None = None,
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
            return self._run(conn, run_id, project_id, proj, routed, after_commit)
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
        after_commit: list[Callable[[], None]] | None = None,
    ) -> list[dict]:
        state = self._load_states(conn, run_id)
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
        # A root that opens adopts the open episodes of other detectors (their state records
        # the cause), and a held alert may be claimed: their states changed too.
        fed |= {c.detector for c in changes}
        if any(c.cause is None and c.action == "open" for c in changes):
            fed |= set(CAUSES)
        states = _states.encode_states({d: state[d] for d in fed if d in state})
        opened: list[dict] = []
        if changes:
            # Alerts are rare: their savepoint costs two round trips only when there are some.
            with conn.begin_nested():
                opened = self.apply_changes(conn, run_id, project_id, changes)
        _states.save_states(conn, run_id, states, stored)
        if after_commit is not None and self.state_cache_runs > 0:
            # Only the states saved: their text is theirs exactly. One loaded but not saved
            # is dropped (decoded again next time) rather than trusted to be unchanged.
            saved = {d: (text, state[d]) for d, text in states.items()}
            after_commit.append(lambda: self._keep_states(run_id, saved))
        return opened

    # -- decoded states kept between requests -----------------------------------------------
    def _load_states(self, conn: Connection, run_id: str) -> dict[str, dict]:
        """``load_states``, reusing a state kept whose text is the one read now."""
        rows = _states.load_state_texts(conn, run_id)
        with self._states_lock:
            # Taken out, all of the run's: the detectors change them in place from here on.
            kept = self._states.pop(run_id, None)
        if not kept:
            return {d: _states.decode_state(text) for d, text in rows}
        state = {}
        for d, text in rows:
            hit = kept.get(d)
            state[d] = hit[1] if hit is not None and hit[0] == text else _states.decode_state(text)
        return state

    def _keep_states(self, run_id: str, saved: dict[str, tuple[str, dict]]) -> None:
        """After the commit: keep the states saved (run as the most recently used)."""
        with self._states_lock:
            cache = self._states
            other = cache.pop(run_id, None)  # put back meanwhile by another transaction of the run
            if other:
                other.update(saved)
                saved = other
            cache[run_id] = saved
            while len(cache) > self.state_cache_runs:
                cache.popitem(last=False)

    # -- alert rows and deliveries ---------------------------------------------------------
    def apply_changes(self, conn: Connection, run_id: str, project_id: int, changes: list[AlertChange]) -> list[dict]:
        """Write alert changes as rows (one per episode: one that comes back reopens its row),
        link consequences to their root's row, and enqueue webhook deliveries for roots only.
        Returns the alerts opened or reopened, each with its ``cause_alert_id``."""
        open_rows = {k: _Row(r.id, r.severity, r.cause_alert_id) for k, r in _alerts.open_alerts(conn, run_id).items()}
        # Open consequences before this batch: one that is a root after it (a divergence that
        # turned critical) was never paged as itself.
        were_consequences = {r.id for r in open_rows.values() if r.cause_alert_id is not None}
        written: dict[tuple[str, str, int], _Row] = {}  # episodes changed now, by (detector, key, start)
        opened: list[int] = []
        # (event, alert id, the alert as that change left it), in the order the alerts changed:
        # an episode opened and resolved within one batch is delivered as "opened" with the
        # status, severity and peak it had then, not as the resolved row it is by the end.
        events: list[tuple[str, int, dict]] = []
        for c in changes:
            then = _as_left_by(c)
            k = (c.detector, c.key)
            row = open_rows.get(k)
            if c.action == RESOLVE:
                if row is None:
                    continue
                _alerts.update_alert(conn, row.id, c, "resolved")
                del open_rows[k]
                events.append(("alert.resolved", row.id, {}))
            elif row is None:
                # OPEN, or an UPDATE of an episode whose row is not open: one row per episode, so
                # an episode that came back (``rejoin_steps``) reopens the row it resolved.
                row = _alerts.find_episode(conn, run_id, c.detector, c.key, c.start_step)
                if row is None:
                    row = _Row(_alerts.insert_alert(conn, run_id, project_id, c), c.severity, None)
                    events.append(("alert.opened", row.id, then))
                else:
                    _alerts.update_alert(conn, row.id, c, "open")
                    events.append(("alert.reopened", row.id, then))
                    if severity_rank(c.severity) > severity_rank(row.severity):
                        events.append(("alert.escalated", row.id, then))
                opened.append(row.id)
                open_rows[k] = row = _Row(row.id, c.severity, row.cause_alert_id)
            else:
                _alerts.update_alert(conn, row.id, c)
                if severity_rank(c.severity) > severity_rank(row.severity):
                    events.append(("alert.escalated", row.id, then))
                row.severity = c.severity
            written[(c.detector, c.key, c.start_step)] = row
        consequences = self._link_causes(conn, run_id, changes, written)
        # A consequence is not paged: it shows in its root's deliveries. Its resolution still
        # reaches the webhooks that heard of it while it was a root (adopted later), and a
        # reopening only those that heard of the alert before.
        events = [(e, aid, then) for e, aid, then in events if aid not in consequences or e == "alert.resolved"]
        ids = {aid for _, aid, _ in events} | set(opened)
        if not ids:
            return []
        alerts = {a["id"]: a for a in _alerts.get_alerts(conn, ids)}
        # Numbered in order; "opened" is change 1, the insert's default.
        numbered = [
            (e, aid, then, 1 if e == "alert.opened" else _alerts.next_change(conn, aid)) for e, aid, then in events
        ]
        hooks = _webhooks.enabled_for_project(conn, project_id)
        if hooks and numbered:
            run_info = _runs.run_ref(conn, run_id)
            link = run_link(self.base_url, run_id)
            explained = _alerts.consequences_of(conn, run_id, {aid for _, aid, _, _ in numbered} - consequences)
            queued = []
            for name, aid, then, seq in numbered:
                to = hooks
                notified: set[int] = set()
                if name in ("alert.resolved", "alert.reopened"):
                    notified = _webhooks.notified_for_alert(conn, aid)
                    if name == "alert.reopened" or aid in consequences:
                        to = [h for h in hooks if h.id in notified]
                elif name == "alert.escalated" and aid in were_consequences:
                    # A consequence that became a root by escalating: the webhooks that never heard
                    # of it (it was not paged) hear of it as opened; those that did, as escalated.
                    notified = _webhooks.notified_for_alert(conn, aid)
                    first = [h for h in hooks if h.id not in notified]
                    queued += enqueue_for_alert(
                        conn,
                        first,
                        set(),
                        "alert.opened",
                        {**alerts[aid], **then},
                        run_info,
                        link,
                        seq,
                        explained.get(aid, []),
                    )
                    to = [h for h in hooks if h.id in notified]
                queued += enqueue_for_alert(
                    conn, to, notified, name, {**alerts[aid], **then}, run_info, link, seq, explained.get(aid, [])
                )
            if queued and self.wake_outbox is not None:
                self.wake_outbox(conn)
        return [alerts[aid] for aid in dict.fromkeys(opened)]

    @staticmethod
    def _link_causes(
        conn: Connection, run_id: str, changes: list[AlertChange], written: dict[tuple[str, str, int], _Row]
    ) -> set[int]:
        """Point each changed alert at the row of the root its change names (``cause``; None for
        a root): written in this batch, or earlier. Returns the ids that are consequences."""
        final: dict[int, int | None] = {}
        for c in changes:
            row = written.get((c.detector, c.key, c.start_step))
            if row is None:  # a resolve of an episode with no open row
                continue
            cause = None
            if c.cause is not None:
                ck = (c.cause["detector"], c.cause["key"], c.cause["start_step"])
                root = written.get(ck) or _alerts.find_episode(conn, run_id, *ck)
                # A root with no row (its detector failed on that batch): the alert stays a root,
                # and is paged as one rather than hidden under nothing.
                cause = root.id if root is not None and root.id != row.id else None
            final[row.id] = cause
            if cause != row.cause_alert_id:
                _alerts.set_cause(conn, row.id, cause)
                row.cause_alert_id = cause
        return {aid for aid, cause in final.items() if cause is not None}

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
