"""Detection in the hook: the server's detectors, run in the sender thread one step at a time.

The server runs the detectors on ingest, about once a second per run (the hook ships a batch a
second), so an alert reached ``mon.on_alert`` only after the batch holding the NaN was sent,
and an offline run heard of nothing. Here the same :class:`~stethoscope.core.detectors.DetectorSet`
reads each record's host floats as the sender thread takes the record off the queue (a record
wakes the thread when it is idle, and while records flow it looks every 20 ms; the values are
the ones it already copied to the host for the batch), so ``on_alert`` hears of a non-finite
loss at the step that logged it. The training thread pays
nothing: ``log()`` queues the record as before and never waits for detection.

Only ``on_alert`` hears of the hook's alerts, so while no callback is registered the detectors
do not run (on a ~1 ms step they were most of the sender thread's CPU): the sender keeps the
last ``MAX_BACKLOG`` records, and a callback registered later has the detectors catch up on
them first, so it hears what it would have heard had they run all along (the opens and
escalations from its registration on; the state of detectors whose history is longer than
the backlog starts with its oldest record).

The server stays the record: the hook sends its alerts nowhere, and an alert the ingest reply
lists for an episode the hook already delivered (same ``(detector, key, start_step)``) is not
delivered again. What ``on_alert`` hears of, from the hook and from the server alike, is one
list of alert dicts per call:

- an episode opening (an ``open`` change),
- an escalation (an episode's severity rising above what was delivered for it),

never an update that changes only the peak, nor a resolution (the server's alerts API and
webhooks have those). As resolutions are not delivered, an episode that comes back within its
detector's ``rejoin_steps`` (an ``open`` change with its old ``start_step``) never ended for the
callback, and is not delivered again unless it comes back worse.

A consequence (a loss spike or Softmax Collapse during a divergence) is delivered like any
alert but names its root in ``cause`` (``{"detector", "key", "start_step"}``; None for a root),
so a job can act on roots only::

    mon.on_alert(lambda alerts: stop.set() if any(a["cause"] is None and a["severity"] == "critical"
                                                  for a in alerts) else None)

A consequence that opened before its root (a loss spike, then the divergence that adopts it)
was delivered as a root: an adoption is an update, not delivered.

A hook alert has the keys of a server alert, with ``"id": None``, ``"cause_alert_id": None``
and ``"source": "hook"``. An alert from the ingest reply gets ``"source": "server"`` and a
``cause`` made from its ``cause_alert_id`` (the root's episode, from the replies seen so far,
with ``"alert_id"``; only ``"alert_id"`` is known of a root this process never heard of).

A bug in a detector is logged once, counted (``mon.detector_errors``, the series
``stethoscope/detector_errors``) and never raised into training; sending goes on.
"""

from __future__ import annotations

import logging
from collections import deque
from datetime import datetime, timezone

from . import _errors
from .core.detectors import DetectorSet, severity_rank

logger = logging.getLogger("stethoscope")

#: The series that counts detector failures in the hook.
DETECTOR_ERRORS = "stethoscope/detector_errors"
#: Episodes remembered as delivered; the oldest are forgotten past this many (a run has a few).
MAX_REMEMBERED = 10_000
#: Records kept for the detectors while no ``on_alert`` callback is registered (a few MB at
#: most); a callback registered later has them fed first, and older records are not fed.
MAX_BACKLOG = 10_000


def detector_set(detectors) -> DetectorSet | None:
    """The detectors ``attach(detectors=...)`` asks for, checked at once: None or True for
    the defaults, False for none, or a dict of settings in the shape the server's
    ``PUT /projects/{project}/detectors`` takes (``{"loss_spike": {"threshold": 8.0},
    "stalled": {"enabled": False}}``); anything else is a ``ValueError`` naming the problem."""
    if detectors is None or detectors is True:
        return DetectorSet()
    if detectors is False:
        return None
    if not isinstance(detectors, dict):
        raise ValueError(
            "detectors must be a dict of detector settings (e.g. {'loss_spike': {'threshold': 8.0}}), "
            f"True for the defaults or False to turn detection in the hook off, not {detectors!r}"
        )
    try:
        return DetectorSet(detectors)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"detectors: {exc}") from None


class Watch:
    """The hook's detectors and the delivery of alerts to ``on_alert`` callbacks.

    Used by the sender thread alone: :meth:`points` for each record's host values,
    :meth:`server_alerts` for the alerts of an ingest reply.
    """

    def __init__(self, detectors: DetectorSet | None, run_id: str, project: str, callbacks: list) -> None:
        self.detectors = detectors
        self.run_id = run_id
        self.project = project
        self.callbacks = callbacks
        #: Failures of the detectors (bugs): logged once, counted, never raised.
        self.errors = 0
        self.reset()

    def reset(self) -> None:
        """Forget the state (a forked child starts afresh)."""
        self.state: dict = {}
        #: (detector, key, start_step) -> rank of the severity delivered for that episode.
        self.delivered: dict[tuple, int] = {}
        self._episodes: dict[int, tuple] = {}  # server alert id -> its (detector, key, start_step)
        #: Records not yet fed, kept while no callback is registered (see :meth:`points`).
        self._backlog: deque = deque(maxlen=MAX_BACKLOG)

    # -- the hook's own detection ----------------------------------------------------------
    def points(self, step: int, names, values) -> None:
        """One record's host values at ``step``: feed the detectors, deliver what opened.

        While no callback is registered, nobody would hear of the hook's alerts (the server
        runs the same detectors on what is sent): the record is only kept (the last
        ``MAX_BACKLOG``), and the detectors catch up on those records, delivering nothing,
        when a callback is registered. A late callback hears what it did before this was
        lazy: the opens and escalations from its registration on.
        """
        dset = self.detectors
        if dset is None:
            return
        if not self.callbacks:
            self._backlog.append((step, names, values))
            return
        if self._backlog:
            self._catch_up()
        self._feed(dset, step, names, values, True)

    def _catch_up(self) -> None:
        backlog, self._backlog = self._backlog, deque(maxlen=MAX_BACKLOG)
        dset = self.detectors
        for step, names, values in backlog:
            self._feed(dset, step, names, values, False)

    def _feed(self, dset: DetectorSet, step: int, names, values, deliver: bool) -> None:
        try:
            changes = dset.feed_step(self.state, step, tuple(names), values)
        except Exception as exc:  # noqa: BLE001 - a detector bug must not stop the sender
            self.errors += 1
            _errors.report("detectors", exc)
            return
        news = []
        for c in changes:
            k = (c.detector, c.key, c.start_step)
            rank = severity_rank(c.severity)
            before = self.delivered.get(k)
            if c.status == "open" and (before is None or rank > before):
                self._remember(k, rank)
                news.append(self._alert(c))
        if news and deliver:
            self._notify(news)

    def _alert(self, c) -> dict:
        """A change as a server alert looks (``stethoscope_server.store.alerts.alert_dict``)."""
        return {
            "id": None,
            "run_id": self.run_id,
            "project": self.project,
            "detector": c.detector,
            "key": c.key,
            "severity": c.severity,
            "status": c.status,
            "start_step": c.start_step,
            "peak_step": c.peak_step,
            "end_step": c.end_step,
            "message": c.message,
            "evidence": c.evidence,
            "first_detection": c.first,
            "cause": c.cause,
            "cause_alert_id": None,
            "opened_at": datetime.now(timezone.utc).isoformat(),
            "resolved_at": None,
            "acknowledged_at": None,
            "source": "hook",
        }

    # -- the server's alerts -----------------------------------------------------------------
    def server_alerts(self, alerts: list) -> None:
        """The alerts an ingest reply lists: deliver those of episodes not delivered yet."""
        alerts = [a for a in alerts if isinstance(a, dict)]
        for a in alerts:  # first: a root may come in the same reply as its consequence
            if a.get("id") is not None:
                self._episodes[a["id"]] = (a.get("detector"), a.get("key"), a.get("start_step"))
                if len(self._episodes) > MAX_REMEMBERED:
                    del self._episodes[next(iter(self._episodes))]
        news = []
        for a in alerts:
            k = (a.get("detector"), a.get("key"), a.get("start_step"))
            if k in self.delivered:
                continue  # the hook's detectors delivered this episode already
            self._remember(k, severity_rank(a.get("severity")))
            a.setdefault("source", "server")
            if "cause" not in a:
                root = a.get("cause_alert_id")
                ep = self._episodes.get(root, (None, None, None))
                a["cause"] = None if root is None else dict(zip(("detector", "key", "start_step"), ep), alert_id=root)
            news.append(a)
        if news:
            self._notify(news)

    # -- delivery ------------------------------------------------------------------------------
    def _remember(self, k: tuple, rank: int) -> None:
        delivered = self.delivered
        # Re-inserted, so the bound forgets the episodes delivered longest ago first.
        delivered[k] = max(rank, delivered.pop(k, -1))
        if len(delivered) > MAX_REMEMBERED:
            del delivered[next(iter(delivered))]

    def _notify(self, alerts: list) -> None:
        for fn in list(self.callbacks):
            try:
                fn(alerts)
            except Exception as exc:  # noqa: BLE001 - the user's callback, not our bug
                logger.warning("stethoscope: on_alert callback %r raised %r", fn, exc)
