"""Alert rows: the episodes the detectors open, update, resolve and reopen; incidents; listing
and acknowledging.

One row per episode, named by (run, detector, key, start_step): an episode that comes back
soon after it resolved (the detector's ``rejoin_steps``) reopens its row. A row whose
``cause_alert_id`` names another alert is a consequence in that alert's incident; a root has
none. Every function takes a connection inside a transaction the caller owns, so the detector
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
    A.c.first_detection,
    A.c.cause_alert_id,
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
        "first_detection": row.first_detection,
        "cause_alert_id": row.cause_alert_id,
    }


#: What the detector runner needs of a row it changes.
_EPISODE = (A.c.id, A.c.detector, A.c.key, A.c.start_step, A.c.severity, A.c.status, A.c.cause_alert_id)


def open_alerts(conn: Connection, run_id: str) -> dict[tuple[str, str], Any]:
    """The run's open alerts by (detector, key): at most one each (a unique index says so)."""
    rows = conn.execute(select(*_EPISODE).where(A.c.run_id == run_id, A.c.status == "open"))
    return {(r.detector, r.key): r for r in rows}


def find_episode(conn: Connection, run_id: str, detector: str, key: str, start_step: int) -> Any | None:
    """The row of episode (detector, key, start_step) of the run, open or resolved; None if it
    has none. (Should a row have been doubled before episodes rejoined, the latest.)"""
    return conn.execute(
        select(*_EPISODE)
        .where(A.c.run_id == run_id, A.c.detector == detector, A.c.key == key, A.c.start_step == start_step)
        .order_by(A.c.id.desc())
        .limit(1)
    ).first()


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
            first_detection=change.first,
            opened_at=utcnow(),
        )
        .returning(A.c.id)
    ).scalar_one()


def update_alert(conn: Connection, alert_id: int, change, status: str | None = None) -> None:
    """Write ``change`` to the row; ``status`` ``resolved`` resolves it, ``open`` reopens a
    resolved one (an episode that came back), None leaves the status as it is."""
    values: dict[str, Any] = dict(
        severity=change.severity,
        start_step=change.start_step,
        peak_step=change.peak_step,
        end_step=change.end_step,
        message=change.message,
        evidence=change.evidence,
    )
    if change.first is not None:  # None from detector states saved before first detections were kept
        values["first_detection"] = change.first
    if status == "resolved":
        values.update(status="resolved", resolved_at=utcnow())
    elif status == "open":
        values.update(status="open", resolved_at=None)
    conn.execute(update(A).where(A.c.id == alert_id).values(**values))


def set_cause(conn: Connection, alert_id: int, cause_alert_id: int | None) -> None:
    """Make the alert a consequence of ``cause_alert_id`` (None: a root)."""
    conn.execute(update(A).where(A.c.id == alert_id).values(cause_alert_id=cause_alert_id))


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


def consequences_of(conn: Connection, run_id: str, root_ids: Iterable[int]) -> dict[int, list[dict]]:
    """The alerts each of ``root_ids`` (alerts of the run) explains, directly or through another
    consequence, oldest first: ``{root id: [alert, ...]}``; roots with none are left out."""
    roots = set(root_ids)
    if not roots:
        return {}
    rows = conn.execute(
        select(*_COLUMNS, P.c.name.label("project"))
        .join(P, P.c.id == A.c.project_id)
        .where(A.c.run_id == run_id, A.c.cause_alert_id.is_not(None) | A.c.id.in_(roots))
        .order_by(A.c.id)
    )
    incidents = group_incidents([alert_dict(r, r.project) for r in rows])
    return {i["id"]: i["consequences"] for i in incidents if i["id"] in roots and i["consequences"]}


def group_incidents(alerts: list[dict]) -> list[dict]:
    """Alerts as incidents: each root (an alert with no cause among ``alerts``), in the order
    given, as ``{**root, "consequences": [...]}``, where the consequences are the alerts whose
    chain of causes leads to it (a consequence of a consequence too), in the order given."""
    by_id = {a["id"]: a for a in alerts}

    def root_of(a: dict) -> int:
        seen = {a["id"]}
        while a["cause_alert_id"] in by_id and a["cause_alert_id"] not in seen:
            a = by_id[a["cause_alert_id"]]
            seen.add(a["id"])
        return a["id"]

    incidents: dict[int, dict] = {}
    members: list[tuple[int, dict]] = []
    for a in alerts:
        root = root_of(a)
        if root == a["id"]:
            incidents[root] = {**a, "consequences": []}
        else:
            members.append((root, a))
    for root, a in members:
        incidents[root]["consequences"].append(a)
    return list(incidents.values())


def _run_project(conn: Connection, run_id: str) -> str:
    run = conn.execute(select(R.c.id, P.c.name).join(P, P.c.id == R.c.project_id).where(R.c.id == run_id)).first()
    if run is None:
        raise NotFound(f"run {run_id!r} does not exist")
    return run.name


def list_run_incidents(conn: Connection, run_id: str, status: str | None = None) -> list[dict]:
    """The run's incidents, oldest first: each root alert with its consequences; ``status``
    filters by the root's status."""
    incidents = group_incidents(list_run_alerts(conn, run_id))
    return [i for i in incidents if status is None or i["status"] == status]


def list_run_alerts(conn: Connection, run_id: str, status: str | None = None) -> list[dict]:
    project = _run_project(conn, run_id)
    stmt = select(*_COLUMNS).where(A.c.run_id == run_id)
    if status is not None:
        stmt = stmt.where(A.c.status == status)
    return [alert_dict(r, project) for r in conn.execute(stmt.order_by(A.c.id))]


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

    def incidents(self, run_id: str, status: str | None = None) -> list[dict]:
        with self._store.reading() as conn:
            return list_run_incidents(conn, run_id, status)

    def list_project(
        self, project: str, status: str | None = None, severity: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[dict]:
        with self._store.reading() as conn:
            return list_project_alerts(conn, project, status, severity, limit, offset)

    def acknowledge(self, alert_id: int) -> dict:
        with self._store.writing() as conn:
            return acknowledge(conn, alert_id)
