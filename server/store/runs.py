"""Projects and runs: create or resume idempotently, update status, list, get."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, cast, exists, func, insert, literal, or_, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError

from .errors import Conflict, NotFound
from .models import Project, Run, aware, utcnow

P = Project.__table__
R = Run.__table__


def touch_step_sql(ph: str) -> str:
    """The statement that marks a run as seen at a step: ``last_seen_at`` set, ``last_step``
    raised to the step if it is higher, the run's project id returned (no row: no such run).
    Parameters: last seen, the step twice, the run id; ``ph``, the driver's placeholder. The
    store runs it alone and the PostgreSQL point writer as the head of its one statement."""
    return (
        f"UPDATE runs SET last_seen_at = {ph}, last_step = CASE WHEN last_step IS NULL OR last_step < {ph} "
        f"THEN {ph} ELSE last_step END WHERE id = {ph} RETURNING project_id"
    )


def run_dict(row: Any, project: str) -> dict:
    return {
        "id": row.id,
        "project": project,
        "name": row.name,
        "status": row.status,
        "config": row.config or {},
        "tags": row.tags or [],
        "created_at": aware(row.created_at),
        "updated_at": aware(row.updated_at),
        "last_seen_at": aware(row.last_seen_at),
        "last_step": row.last_step,
    }


def ensure_project(conn: Connection, name: str) -> int:
    pid = conn.execute(select(P.c.id).where(P.c.name == name)).scalar()
    if pid is None:
        # ON CONFLICT is dialect-specific in SQLAlchemy; a savepoint keeps a lost race harmless.
        try:
            with conn.begin_nested():
                pid = conn.execute(insert(P).values(name=name, created_at=utcnow()).returning(P.c.id)).scalar()
        except IntegrityError:
            pid = conn.execute(select(P.c.id).where(P.c.name == name)).scalar()
            if pid is None:
                raise
    return pid


def project_names(conn: Connection) -> list[dict]:
    q = (
        select(P.c.name, P.c.created_at, func.count(R.c.id).label("runs"))
        .select_from(P.outerjoin(R, R.c.project_id == P.c.id))
        .group_by(P.c.id, P.c.name, P.c.created_at)
        .order_by(P.c.name)
    )
    return [{"name": r.name, "created_at": aware(r.created_at), "runs": r.runs} for r in conn.execute(q)]


def upsert_run(
    conn: Connection, run_id: str, project: str, name: str | None, config: dict | None, tags: list | None
) -> tuple[dict, bool]:
    """Create the run, or resume it (status back to running). Returns (run, created)."""
    row = conn.execute(
        select(R, P.c.name.label("project")).join(P, P.c.id == R.c.project_id).where(R.c.id == run_id)
    ).first()
    now = utcnow()
    if row is not None:
        if row.project != project:
            raise Conflict(f"run {run_id!r} belongs to project {row.project!r}, not {project!r}")
        values: dict[str, Any] = {"status": "running", "updated_at": now}
        if name is not None:
            values["name"] = name
        if config is not None:
            values["config"] = config
        if tags is not None:
            values["tags"] = tags
        conn.execute(update(R).where(R.c.id == run_id).values(**values))
        return get_run(conn, run_id), False
    pid = ensure_project(conn, project)
    conn.execute(
        insert(R).values(
            id=run_id,
            project_id=pid,
            name=name or run_id,
            status="running",
            config=config or {},
            tags=tags or [],
            created_at=now,
            updated_at=now,
        )
    )
    return get_run(conn, run_id), True


def get_run(conn: Connection, run_id: str) -> dict:
    row = conn.execute(
        select(R, P.c.name.label("project")).join(P, P.c.id == R.c.project_id).where(R.c.id == run_id)
    ).first()
    if row is None:
        raise NotFound(f"run {run_id!r} does not exist")
    return run_dict(row, row.project)


def run_ref(conn: Connection, run_id: str) -> dict:
    """The run as webhook payloads name it: ``{"id", "name", "project"}``."""
    q = select(R.c.id, R.c.name, P.c.name.label("project")).join(P, P.c.id == R.c.project_id).where(R.c.id == run_id)
    row = conn.execute(q).one()
    return {"id": row.id, "name": row.name, "project": row.project}


def update_run(conn: Connection, run_id: str, status: str | None, name: str | None, tags: list | None) -> dict:
    values: dict[str, Any] = {"updated_at": utcnow()}
    if status is not None:
        values["status"] = status
    if name is not None:
        values["name"] = name
    if tags is not None:
        values["tags"] = tags
    if conn.execute(update(R).where(R.c.id == run_id).values(**values)).rowcount == 0:
        raise NotFound(f"run {run_id!r} does not exist")
    return get_run(conn, run_id)


def list_runs(
    conn: Connection,
    project: str | None = None,
    status: str | None = None,
    tag: str | None = None,
    q: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[dict]:
    stmt = select(R, P.c.name.label("project")).join(P, P.c.id == R.c.project_id)
    if project is not None:
        stmt = stmt.where(P.c.name == project)
    if status is not None:
        stmt = stmt.where(R.c.status == status)
    if q:
        # A substring, not a pattern: autoescape makes % and _ match themselves (an ESCAPE clause).
        needle = q.lower()
        stmt = stmt.where(
            or_(
                func.lower(R.c.name).contains(needle, autoescape=True),
                func.lower(R.c.id).contains(needle, autoescape=True),
            )
        )
    if since is not None:
        stmt = stmt.where(R.c.created_at >= since)
    if tag is not None:
        stmt = stmt.where(_has_tag(conn, tag))
    # The page is cut in SQL: a list of 100 runs reads 100 rows, whatever the table holds.
    stmt = stmt.order_by(R.c.created_at.desc(), R.c.id).limit(limit).offset(offset)
    return [run_dict(r, r.project) for r in conn.execute(stmt)]


def _has_tag(conn: Connection, tag: str):
    """Whether the run's JSON list of tags holds ``tag``, in each database's own JSON terms."""
    if conn.dialect.name == "postgresql":
        return cast(R.c.tags, JSONB).contains([tag])
    each = func.json_each(R.c.tags).table_valued("value")
    return exists(select(literal(1)).select_from(each).where(each.c.value == tag))
