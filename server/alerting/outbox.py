"""Webhook delivery: payloads (JSON or Slack), signatures, and the outbox worker.

Deliveries are rows written in the transaction that changed the alert (see
``store/webhooks.py``), so ingest never waits on a receiver and a restart loses none. A
background thread in each server worker claims due rows, POSTs them with the standard
library to checked addresses only (``webhook_targets``), and records the outcome; a failed
attempt is retried with exponential backoff and jitter until ``webhook_max_attempts``, then marked ``failed``.

Receivers verify ``X-Stethoscope-Signature: sha256=<hex>``, the HMAC-SHA256 of the exact body
bytes under the webhook's secret::

    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    ok = hmac.compare_digest(expected, request.headers["X-Stethoscope-Signature"])
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, event

from .. import __version__
from ..ops.background import Periodic
from ..ops.observability import METRICS
from ..settings import Settings
from ..store import Store
from ..store import webhooks as _webhooks  # enqueue: inside the ingest transaction
from ..store.models import utcnow
from .webhook_targets import post

log = logging.getLogger("stethoscope.server.webhooks")

SIGNATURE_HEADER = "X-Stethoscope-Signature"
EVENT_HEADER = "X-Stethoscope-Event"
DELIVERY_HEADER = "X-Stethoscope-Delivery"
#: The alert's change number (1 when opened, then +1 per escalation, reopening and resolution).
SEQUENCE_HEADER = "X-Stethoscope-Sequence"
FORMATS = ("json", "slack")

#: Deliveries sent at once by one worker; a receiver that hangs holds up only its own.
CONCURRENCY = 4
#: A claimed delivery is hidden from other workers for the request timeout plus this margin;
#: if the worker dies mid-send the row comes due again afterwards.
LEASE_MARGIN_S = 30.0
#: Slack shows at most 3,000 characters in a section block.
SLACK_TEXT_LIMIT = 2900

#: Key in a pooled connection's ``info``: deliveries were enqueued in its transaction.
_WAKE = "stethoscope_wake_outbox"

_SEVERITY_MARK = {"info": ":information_source:", "warning": ":warning:", "critical": ":rotating_light:"}
_EVENT_WORD = {
    "alert.opened": "opened",
    "alert.escalated": "escalated",
    "alert.reopened": "reopened",
    "alert.resolved": "resolved",
    "test": "test",
}
#: Consequences named one by one in a Slack message; the rest are counted.
SLACK_CONSEQUENCES_NAMED = 5


# -- payloads ----------------------------------------------------------------------------
def jsonable(alert: dict) -> dict:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in alert.items()}


def run_link(base_url: str, run_id: str) -> str:
    return f"{base_url.rstrip('/')}/runs/{run_id}"


def body_for(
    fmt: str,
    event_name: str,
    alert: dict,
    run: dict,
    link: str,
    sequence: int | None = None,
    consequences: list[dict] | None = None,
) -> dict:
    """The JSON object a webhook of format ``fmt`` receives for this alert event; ``sequence``
    is the alert's change number, so a receiver can order one alert's deliveries itself.
    ``consequences`` are the alerts of its incident known now (the alert is their root): the
    JSON body lists them (``id``, ``detector``, ``key``, ``severity``, ``status``,
    ``message``) when there are any; a Slack message names them. The alert's
    ``first_detection`` (what it said when it was raised) comes with it."""
    alert = jsonable(alert)
    brief = [_consequence(c) for c in consequences or ()]
    if fmt == "slack":
        return _slack(event_name, alert, run, link, brief)
    body = {"event": event_name, "alert": alert, "run": run, "link": link}
    if sequence is not None:
        body["sequence"] = sequence
    if brief:
        body["consequences"] = brief
    return body


def _consequence(alert: dict) -> dict:
    return {k: alert[k] for k in ("id", "detector", "key", "severity", "status", "message")}


def sequence_header(payload: dict) -> dict[str, str]:
    """``X-Stethoscope-Sequence`` for a delivery of an alert change (none for a test-send)."""
    return {SEQUENCE_HEADER: str(payload["sequence"])} if payload.get("sequence") is not None else {}


def plain_and_evidence(message: str) -> tuple[str, str]:
    """An alert message's first sentence (what happened, at which step, in plain words) and
    the evidence after it; detector messages are written that way."""
    first, sep, rest = message.partition(". ")
    return (first + "." if sep else first), rest


def _slack(event_name: str, alert: dict, run: dict, link: str, consequences: list[dict]) -> dict:
    word = _EVENT_WORD.get(event_name, event_name)
    sev = alert["severity"]
    steps = (
        f"steps {alert['start_step']}-{alert['end_step']}"
        if alert.get("end_step") != alert.get("start_step")
        else f"step {alert['start_step']}"
    )
    plain, detail = plain_and_evidence(alert["message"])
    head = f"[{sev.upper()}] {alert['detector']} {word} on run {run['name']} ({run['project']})"
    # Its first detection and the alerts it explains, when there is something to say.
    incident = _slack_incident(alert, consequences)
    # The plain sentence first (a notification shows the start of "text"), the rest after it.
    text = f"{plain} {head}. {detail} {incident.replace(chr(10), ' ')}".strip()[:SLACK_TEXT_LIMIT]
    evidence = ", ".join(f"{k}={v}" for k, v in (alert.get("evidence") or {}).items())
    return {
        "text": text,
        "blocks": [
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": f"{_SEVERITY_MARK.get(sev, '')} *{plain}*\n{detail}\n_{head}_\n{incident}".strip()[
                        :SLACK_TEXT_LIMIT
                    ],
                },
            },
            {
                "type": "context",
                "elements": [
                    {"type": "mrkdwn", "text": f"{steps} | alert {alert['id']} | {evidence}"[:SLACK_TEXT_LIMIT]}
                ],
            },
            {
                "type": "actions",
                "elements": [{"type": "button", "text": {"type": "plain_text", "text": "Open run"}, "url": link}],
            },
        ],
    }


def _slack_incident(alert: dict, consequences: list[dict]) -> str:
    """Lines of a Slack message about the alert's incident: its first detection, when it said
    something else than the peak, and the consequences it explains."""
    lines = []
    first = alert.get("first_detection") or {}
    if first and first.get("message") != alert["message"]:
        said = plain_and_evidence(str(first.get("message", "")))[0]
        lines.append(f"First detected at step {first.get('step')} ({first.get('severity')}): {said}")
    if consequences:
        named = ", ".join(f"{c['detector']} #{c['id']}" for c in consequences[:SLACK_CONSEQUENCES_NAMED])
        more = len(consequences) - SLACK_CONSEQUENCES_NAMED
        n = len(consequences)
        lines.append(f"Also explains {n} alert{'s' if n > 1 else ''}: {named}{f' and {more} more' if more > 0 else ''}")
    return "\n".join(lines)


def encode_body(body: dict) -> bytes:
    """The exact bytes sent (and signed): compact, keys sorted, no NaN (evidence encodes it)."""
    return json.dumps(body, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False).encode()


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def backoff_s(attempts: int, base: float, cap: float, rng: random.Random = random._inst) -> float:  # type: ignore[attr-defined]
    """Delay before the next attempt after ``attempts`` failed ones: doubling, capped, jittered
    to 50-100% so that many deliveries failing together do not retry together."""
    return min(cap, base * 2.0 ** min(attempts - 1, 60)) * rng.uniform(0.5, 1.0)


# -- the worker --------------------------------------------------------------------------
class Outbox:
    """Delivers pending webhook rows in the background; ``wake()`` after enqueueing.

    outbox = Outbox(store, settings); outbox.start()
    ...                       # the detector runner enqueues rows and wakes it on commit
    outbox.stop()
    """

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.lease_s = settings.webhook_timeout_s + LEASE_MARGIN_S
        self._pool = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="stethoscope-webhook")
        self._periodic = Periodic("webhook-outbox", settings.outbox_poll_s, self.deliver_due)

    @property
    def errors(self) -> int:
        return self._periodic.errors

    def start(self) -> None:
        self._periodic.start()

    def stop(self) -> None:
        self._periodic.stop(self.settings.webhook_timeout_s + 5)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def wake(self) -> None:
        self._periodic.wake()

    def watch(self, engine: Engine) -> None:
        """Wake the worker when a connection that enqueued deliveries goes back to ``engine``'s
        pool: its transaction is over by then. (The ``commit`` event would be too early: it
        comes before the commit, and the worker would find nothing yet.)"""

        def checkin(_dbapi_conn, record) -> None:
            if record.info.pop(_WAKE, False):
                self.wake()

        event.listen(engine, "checkin", checkin)

    def wake_on_commit(self, conn: Connection) -> None:
        """Wake the worker once ``conn``'s transaction is over (see :meth:`watch`)."""
        conn.info[_WAKE] = True

    def deliver_due(self) -> bool:
        """Send up to ``CONCURRENCY`` due deliveries; true if there may be more due now."""
        rows = self.store.webhooks.claim_due(utcnow(), CONCURRENCY, self.lease_s)
        if not rows:
            return False
        list(self._pool.map(self._attempt, rows))
        return len(rows) == CONCURRENCY

    def _attempt(self, row: dict) -> dict:
        payload = row["payload"] or {}
        body = encode_body(payload.get("body") or {})
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"stethoscope-webhooks/{__version__}",
            **sequence_header(payload),
            SIGNATURE_HEADER: sign(row["secret"], body),
            EVENT_HEADER: str(payload.get("event", "")),
            DELIVERY_HEADER: str(row["id"]),
        }
        code, retry_after, error = post(
            row["url"], body, headers, self.settings.webhook_timeout_s, self.settings.webhook_allow_private
        )
        attempts = row["attempts"]
        if error is None:
            status, next_at = "delivered", None
        elif attempts >= self.settings.webhook_max_attempts or payload.get("event") == "test":
            status, next_at = "failed", None  # a test-send is tried once: its reply says what happened
        else:
            delay = backoff_s(attempts, self.settings.webhook_backoff_s, self.settings.webhook_backoff_max_s)
            if retry_after is not None and retry_after.strip().isdigit():
                delay = max(delay, min(float(retry_after), self.settings.webhook_backoff_max_s))
            status, next_at = "pending", utcnow() + timedelta(seconds=delay)
        if error is not None:
            # A class only ("HTTP 5xx", "connection failed", ...); the detail is logged at debug level.
            log.warning("webhook %s delivery %s attempt %d: %s", row["webhook_id"], row["id"], attempts, error)
        self.store.webhooks.record(row["id"], status, code, error, next_at)
        METRICS.webhook_deliveries.inc(1, "retrying" if status == "pending" else status)
        return {"status": status, "code": code, "error": error}

    def send_test(self, webhook_id: int, base_url: str) -> dict:
        """Send a sample alert to one webhook now, through the delivery log; returns the delivery."""
        now = utcnow()

        def payload_for(hook: dict) -> dict:
            sample = {
                "id": 0,
                "run_id": "stethoscope-test",
                "project": hook["project"],
                "detector": "test",
                "key": "",
                "severity": "info",
                "status": "open",
                "start_step": 0,
                "peak_step": 0,
                "end_step": 0,
                "message": "test message from Stethoscope: this webhook is set up correctly",
                "evidence": {},
                "opened_at": now,
                "resolved_at": None,
                "acknowledged_at": None,
                "first_detection": None,
                "cause_alert_id": None,
            }
            run = {"id": "stethoscope-test", "name": "stethoscope-test", "project": hook["project"]}
            return {
                "event": "test",
                "body": body_for(hook["format"], "test", sample, run, run_link(base_url, run["id"])),
            }

        # Inserted as claimed by this request (attempt 1, leased): the worker leaves it alone.
        row = self.store.webhooks.insert_test(webhook_id, payload_for, now + timedelta(seconds=self.lease_s))
        self._attempt(row)
        return self.store.webhooks.delivery(row["id"])


def enqueue_for_alert(
    conn: Connection,
    hooks: list[Any],
    notified: set[int],
    event_name: str,
    alert: dict,
    run: dict,
    link: str,
    sequence: int | None = None,
    consequences: list[dict] | None = None,
) -> list[int]:
    """Outbox rows for one alert event, one per webhook that wants it (same transaction);
    ``sequence`` is the alert's change number (``store.alerts.next_change``), ``consequences``
    the alerts it is the root of (``store.alerts.consequences_of``)."""
    rows = []
    for h in hooks:
        wants = alert["severity"] in (h.severities or []) or h.id in notified
        if wants:
            rows.append(
                {
                    "webhook_id": h.id,
                    "alert_id": alert["id"],
                    "payload": {
                        "event": event_name,
                        "sequence": sequence,
                        "body": body_for(h.format, event_name, alert, run, link, sequence, consequences),
                    },
                }
            )
    return _webhooks.enqueue(conn, rows)
