"""Alert rows: the episodes the detectors open, update and resolve; listing and acknowledging.

Every function takes a connection inside a transaction the caller owns, so the detector
runner can apply alert changes in the same transaction as the points and detector states.
"""

from __future__ import annotations

from typing import Any, Iterable

from sqlalchemy import Connection, insert, select, update

from .errors import NotFound
from .models import Alert, Project, Run, aware, utcnow

A = Alert.__table__
R = Run.__table__
P = Project.__table__

ALERT_STATUSES = ("open", "resolved")

#: Columns of an alert as the API, the ingest reply and webhook payloads show it.
_COLUMNS = (
    A.c.id,
    A.c.run_id,
    A.c.detector,
    A.c.key,
    A.c.severity,
    A.c.status,
    A.c.start_step,
    A.c.peak_step,
    A.c.end_step,
    A.c.message,
    A.c.evidence,
    A.c.opened_at,
    A.c.resolved_at,
    A.c.acknowledged_at,
)


def alert_dict(row: Any, project: str) -> dict:
    return {
        "id": row.id,
        "run_id": row.run_id,
        "project": project,
        "detector": row.detector,
        "key": row.key,
        "severity": row.severity,
        "status": row.status,
        "start_step": row.start_step,
        "peak_step": row.peak_step,
        "end_step": row.end_step,
        "message": row.message,
        "evidence": row.evidence or {},
        "opened_at": aware(row.opened_at),
        "resolved_at": aware(row.resolved_at),
        "acknowledged_at": aware(row.acknowledged_at),
    }


def open_alerts(conn: Connection, run_id: str) -> dict[tuple[str, str], Any]:
    """The run's open alerts by (detector, key): at most one each (a unique index says so)."""
    rows = conn.execute(
        select(A.c.id, A.c.detector, A.c.key, A.c.severity).where(A.c.run_id == run_id, A.c.status == "open")
    )
    return {(r.detector, r.key): r for r in rows}


def insert_alert(conn: Connection, run_id: str, project_id: int, change) -> int:
    return conn.execute(
        insert(A)
        .values(
            run_id=run_id,
            project_id=project_id,
            detector=change.detector,
            key=change.key,
            severity=change.severity,
            status="open",
            start_step=change.start_step,
            peak_step=change.peak_step,
            end_step=change.end_step,
            message=change.message,
            evidence=change.evidence,
            opened_at=utcnow(),
        )
        .returning(A.c.id)
    ).scalar_one()


def update_alert(conn: Connection, alert_id: int, change, resolve: bool) -> None:
    values: dict[str, Any] = dict(
        severity=change.severity,
        start_step=change.start_step,
        peak_step=change.peak_step,
        end_step=change.end_step,
        message=change.message,
        evidence=change.evidence,
    )
    if resolve:
        values.update(status="resolved", resolved_at=utcnow())
    conn.execute(update(A).where(A.c.id == alert_id).values(**values))


def next_change(conn: Connection, alert_id: int) -> int:
    """Count one more change of the alert that webhooks hear of; returns its number."""
    return conn.execute(
        update(A).where(A.c.id == alert_id).values(change_seq=A.c.change_seq + 1).returning(A.c.change_seq)
    ).scalar_one()


def get_alerts(conn: Connection, ids: Iterable[int]) -> list[dict]:
    ids = list(ids)
    if not ids:
        return []
    rows = conn.execute(
        select(*_COLUMNS, P.c.name.label("project"))
        .join(P, P.c.id == A.c.project_id)
        .where(A.c.id.in_(ids))
        .order_by(A.c.id)
    )
    return [alert_dict(r, r.project) for r in rows]


def list_run_alerts(conn: Connection, run_id: str, status: str | None = None) -> list[dict]:
    run = conn.execute(select(R.c.id, P.c.name).join(P, P.c.id == R.c.project_id).where(R.c.id == run_id)).first()
    if run is None:
        raise NotFound(f"run {run_id!r} does not exist")
    stmt = select(*_COLUMNS).where(A.c.run_id == run_id)
    if status is not None:
        stmt = stmt.where(A.c.status == status)
    return [alert_dict(r, run.name) for r in conn.execute(stmt.order_by(A.c.id))]


def list_project_alerts(
    conn: Connection,
    project: str,
    status: str | None = None,
    severity: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[dict]:
    pid = conn.execute(select(P.c.id).where(P.c.name == project)).scalar()
    if pid is None:
        raise NotFound(f"project {project!r} does not exist")
    stmt = select(*_COLUMNS).where(A.c.project_id == pid)
    if status is not None:
        stmt = stmt.where(A.c.status == status)
    if severity is not None:
        stmt = stmt.where(A.c.severity == severity)
    stmt = stmt.order_by(A.c.opened_at.desc(), A.c.id.desc()).limit(limit).offset(offset)
    return [alert_dict(r, project) for r in conn.execute(stmt)]


def acknowledge(conn: Connection, alert_id: int) -> dict:
    """Mark an alert as seen by a person; the first acknowledgement's time is kept."""
    conn.execute(update(A).where(A.c.id == alert_id, A.c.acknowledged_at.is_(None)).values(acknowledged_at=utcnow()))
    found = get_alerts(conn, [alert_id])
    if not found:
        raise NotFound(f"alert {alert_id} does not exist")
    return found[0]


class AlertStore:
    """``store.alerts``: listing and acknowledging alerts, each method one transaction. (The
    detector runner writes alert rows with the functions above, inside the ingest transaction.)"""

    def __init__(self, store) -> None:
        self._store = store

    def list_run(self, run_id: str, status: str | None = None) -> list[dict]:
        with self._store.reading() as conn:
            return list_run_alerts(conn, run_id, status)

    def list_project(
        self, project: str, status: str | None = None, severity: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[dict]:
        with self._store.reading() as conn:
            return list_project_alerts(conn, project, status, severity, limit, offset)

    def acknowledge(self, alert_id: int) -> dict:
        with self._store.writing() as conn:
            return acknowledge(conn, alert_id)
