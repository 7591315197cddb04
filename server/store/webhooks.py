"""Webhooks per project and their durable outbox (``webhook_deliveries``).

A delivery row is written in the transaction that opens or resolves the alert, so an alert
that committed has its deliveries committed too, and a restart finds them still pending.
The outbox worker claims due rows (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so workers never
take the same row), pushes their ``next_attempt_at`` past a lease, sends outside any
transaction, and records the outcome.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Callable

from sqlalchemy import Connection, delete, func, insert, select, update

from ..alerting.webhook_targets import public_error
from .alerts import aware
from .errors import NotFound
from .models import Project, Webhook, WebhookDelivery, utcnow
from .runs import ensure_project

W = Webhook.__table__
WD = WebhookDelivery.__table__
P = Project.__table__

DELIVERY_STATUSES = ("pending", "delivered", "failed")


def webhook_dict(row: Any, project: str, secret: str | None = None) -> dict:
    d = {
        "id": row.id,
        "project": project,
        "url": row.url,
        "severities": list(row.severities or []),
        "format": row.format,
        "enabled": bool(row.enabled),
        "created_at": aware(row.created_at),
    }
    if secret is not None:  # only in the reply that creates it
        d["secret"] = secret
    return d


def create(
    conn: Connection, project: str, url: str, secret: str, severities: list[str], fmt: str, enabled: bool
) -> dict:
    pid = ensure_project(conn, project)
    wid = conn.execute(
        insert(W)
        .values(
            project_id=pid,
            url=url,
            secret=secret,
            severities=severities,
            format=fmt,
            enabled=enabled,
            created_at=utcnow(),
        )
        .returning(W.c.id)
    ).scalar_one()
    return get(conn, wid, secret=secret)


def get(conn: Connection, webhook_id: int, secret: str | None = None) -> dict:
    row = conn.execute(
        select(W, P.c.name.label("project")).join(P, P.c.id == W.c.project_id).where(W.c.id == webhook_id)
    ).first()
    if row is None:
        raise NotFound(f"webhook {webhook_id} does not exist")
    return webhook_dict(row, row.project, secret)


def list_for_project(conn: Connection, project: str) -> list[dict]:
    pid = conn.execute(select(P.c.id).where(P.c.name == project)).scalar()
    if pid is None:
        raise NotFound(f"project {project!r} does not exist")
    return [webhook_dict(r, project) for r in conn.execute(select(W).where(W.c.project_id == pid).order_by(W.c.id))]


def delete_webhook(conn: Connection, webhook_id: int) -> None:
    # Deliveries go with it (ON DELETE CASCADE): nothing pending is left pointing nowhere.
    conn.execute(delete(WD).where(WD.c.webhook_id == webhook_id))
    if conn.execute(delete(W).where(W.c.id == webhook_id)).rowcount == 0:
        raise NotFound(f"webhook {webhook_id} does not exist")


def set_enabled(conn: Connection, webhook_id: int, enabled: bool) -> dict:
    """Pause (or resume) a webhook: a disabled one is kept, with its secret, but gets no new deliveries."""
    if conn.execute(update(W).where(W.c.id == webhook_id).values(enabled=enabled)).rowcount == 0:
        raise NotFound(f"webhook {webhook_id} does not exist")
    return get(conn, webhook_id)


def enabled_for_project(conn: Connection, project_id: int) -> list[Any]:
    """(id, severities, format) of the project's enabled webhooks."""
    return conn.execute(
        select(W.c.id, W.c.severities, W.c.format).where(W.c.project_id == project_id, W.c.enabled.is_(True))
    ).all()


def notified_for_alert(conn: Connection, alert_id: int) -> set[int]:
    """Webhooks already sent something about this alert (they also hear of its resolution)."""
    return set(conn.execute(select(WD.c.webhook_id).where(WD.c.alert_id == alert_id).distinct()).scalars())


def enqueue(conn: Connection, rows: list[dict]) -> list[int]:
    """Insert pending deliveries: ``{"webhook_id", "alert_id", "payload"}`` each, where
    ``payload`` is ``{"event": ..., "body": <the JSON object to send>}``."""
    if not rows:
        return []
    now = utcnow()
    return list(
        conn.execute(
            insert(WD).returning(WD.c.id),
            [{**r, "status": "pending", "attempts": 0, "next_attempt_at": now, "created_at": now} for r in rows],
        ).scalars()
    )


def claim_due(conn: Connection, now: datetime, limit: int, lease_s: float) -> list[dict]:
    """Take up to ``limit`` due deliveries: count the attempt and hide them for ``lease_s``.

    If the worker dies mid-send the row comes due again when the lease ends and another
    attempt is made: delivery is at least once, and receivers can dedupe on the delivery id.

    Deliveries of one alert reach a webhook in the order the alert changed: a row waits
    while an earlier row of the same (webhook, alert) is pending, being sent or waiting for
    its retry, in any worker, until that one is delivered or has finally failed. Rows are
    written in the order of the changes, so the lower id is the earlier change.
    """
    earlier = WD.alias("earlier")
    waits = (
        select(earlier.c.id)
        .where(
            earlier.c.alert_id == WD.c.alert_id,
            earlier.c.webhook_id == WD.c.webhook_id,
            earlier.c.id < WD.c.id,
            earlier.c.status == "pending",
        )
        .exists()
    )
    ids = list(
        conn.execute(
            select(WD.c.id)
            .where(WD.c.status == "pending", WD.c.next_attempt_at <= now, ~waits)
            .order_by(WD.c.next_attempt_at, WD.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)  # PostgreSQL; SQLite has one writer at a time anyway
        ).scalars()
    )
    if not ids:
        return []
    conn.execute(
        update(WD)
        .where(WD.c.id.in_(ids))
        .values(attempts=WD.c.attempts + 1, next_attempt_at=now + timedelta(seconds=lease_s))
    )
    rows = conn.execute(
        select(WD.c.id, WD.c.webhook_id, WD.c.alert_id, WD.c.payload, WD.c.attempts, W.c.url, W.c.secret, W.c.format)
        .join(W, W.c.id == WD.c.webhook_id)
        .where(WD.c.id.in_(ids))
        .order_by(WD.c.id)
    )
    return [dict(r._mapping) for r in rows]


def insert_claimed(conn: Connection, webhook_id: int, payload: dict, lease_until: datetime) -> dict:
    """A delivery the caller sends itself right away (a test-send): inserted as claimed."""
    now = utcnow()
    did = conn.execute(
        insert(WD)
        .values(
            webhook_id=webhook_id,
            alert_id=None,
            payload=payload,
            status="pending",
            attempts=1,
            next_attempt_at=lease_until,
            created_at=now,
        )
        .returning(WD.c.id)
    ).scalar_one()
    hook = conn.execute(select(W.c.url, W.c.secret).where(W.c.id == webhook_id)).one()
    return {
        "id": did,
        "webhook_id": webhook_id,
        "alert_id": None,
        "payload": payload,
        "attempts": 1,
        "url": hook.url,
        "secret": hook.secret,
    }


def record(
    conn: Connection,
    delivery_id: int,
    status: str,
    status_code: int | None,
    error: str | None,
    next_attempt_at: datetime | None = None,
) -> None:
    values: dict[str, Any] = {"status": status, "last_status_code": status_code, "last_error": error}
    if status == "delivered":
        values["delivered_at"] = utcnow()
    if next_attempt_at is not None:
        values["next_attempt_at"] = next_attempt_at
    conn.execute(update(WD).where(WD.c.id == delivery_id).values(**values))


def delivery_dict(row: Any) -> dict:
    payload = row.payload or {}
    return {
        "id": row.id,
        "webhook_id": row.webhook_id,
        "alert_id": row.alert_id,
        "event": payload.get("event"),
        "status": row.status,
        "attempts": row.attempts,
        "next_attempt_at": aware(row.next_attempt_at) if row.status == "pending" else None,
        "last_status_code": row.last_status_code,
        # A status class only; rows stored before classes held the reply's first bytes.
        "last_error": public_error(row.last_error, row.last_status_code),
        "created_at": aware(row.created_at),
        "delivered_at": aware(row.delivered_at),
        "body": payload.get("body"),
    }


def list_deliveries(conn: Connection, webhook_id: int, status: str | None = None, limit: int = 100) -> list[dict]:
    get(conn, webhook_id)  # 404 for an unknown webhook
    stmt = select(WD).where(WD.c.webhook_id == webhook_id)
    if status is not None:
        stmt = stmt.where(WD.c.status == status)
    return [delivery_dict(r) for r in conn.execute(stmt.order_by(WD.c.id.desc()).limit(limit))]


def get_delivery(conn: Connection, delivery_id: int) -> dict:
    row = conn.execute(select(WD).where(WD.c.id == delivery_id)).first()
    if row is None:
        raise NotFound(f"delivery {delivery_id} does not exist")
    return delivery_dict(row)


def pending_count(conn: Connection) -> int:
    return conn.execute(select(func.count()).select_from(WD).where(WD.c.status == "pending")).scalar_one()


class WebhookStore:
    """``store.webhooks``: webhooks and their delivery log, each method one transaction. (The
    detector runner enqueues deliveries with ``enqueue``, inside the ingest transaction.)"""

    def __init__(self, store) -> None:
        self._store = store

    def list(self, project: str) -> list[dict]:
        with self._store.reading() as conn:
            return list_for_project(conn, project)

    def create(self, project: str, url: str, secret: str, severities: list[str], fmt: str, enabled: bool) -> dict:
        with self._store.writing() as conn:
            return create(conn, project, url, secret, severities, fmt, enabled)

    def delete(self, webhook_id: int) -> None:
        with self._store.writing() as conn:
            delete_webhook(conn, webhook_id)

    def set_enabled(self, webhook_id: int, enabled: bool) -> dict:
        with self._store.writing() as conn:
            return set_enabled(conn, webhook_id, enabled)

    def deliveries(self, webhook_id: int, status: str | None = None, limit: int = 100) -> list[dict]:
        with self._store.reading() as conn:
            return list_deliveries(conn, webhook_id, status, limit)

    def delivery(self, delivery_id: int) -> dict:
        with self._store.reading() as conn:
            return get_delivery(conn, delivery_id)

    def pending_count(self) -> int:
        with self._store.reading() as conn:
            return pending_count(conn)

    def claim_due(self, now: datetime, limit: int, lease_s: float) -> list[dict]:
        with self._store.writing() as conn:
            return claim_due(conn, now, limit, lease_s)

    def record(
        self,
        delivery_id: int,
        status: str,
        status_code: int | None,
        error: str | None,
        next_attempt_at: datetime | None = None,
    ) -> None:
        with self._store.writing() as conn:
            record(conn, delivery_id, status, status_code, error, next_attempt_at)

    def insert_test(self, webhook_id: int, payload_for: Callable[[dict], dict], lease_until: datetime) -> dict:
        """A test-send's delivery: ``payload_for(webhook)`` makes its payload; inserted as claimed
        (``insert_claimed``) in one transaction with reading the webhook (``NotFound`` if none)."""
        with self._store.writing() as conn:
            return insert_claimed(conn, webhook_id, payload_for(get(conn, webhook_id)), lease_until)
