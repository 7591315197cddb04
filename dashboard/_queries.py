"""Reads the dashboard needs beyond the store's own methods: alerts, series names, last values.

The alert rows are read straight from the ``alerts`` table (read-only): the pages need the
open/resolved lifecycle and steps, which is all in the row. Writes (acknowledge, settings,
webhooks) go through the REST API, never through here.
"""

from __future__ import annotations

import math
from datetime import datetime

from sqlalchemy import select

from stethoscope.core.detectors import severity_rank

from stethoscope_server.store.models import Alert, Project, Run, Series
from stethoscope_server.store import Store
from stethoscope_server.store.alerts import alert_dict
from stethoscope_server.store.sql import placeholder

A = Alert.__table__
P = Project.__table__
R = Run.__table__
S = Series.__table__

#: The last values the runs overview shows, in this order, when a run has them.
KEY_SERIES = ("loss", "grad/norm", "logits/sc_fraction", "hessian/lambda_max", "continual/min_acc")

#: Most alerts a page lists at once; older ones are a filter away.
ALERT_LIMIT = 500


def _alert_dict(row) -> dict:
    """The store's alert shape, plus the run's name, with times as ISO text for the pages."""
    alert = alert_dict(row, row.project)
    alert["run_name"] = row.run_name
    for k in ("opened_at", "resolved_at", "acknowledged_at"):
        alert[k] = _iso(alert[k])
    return alert


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat(timespec="seconds")


def list_alerts(store: Store, run_id: str | None = None, project: str | None = None, status: str | None = None) -> list[dict]:
    """Alerts of a run or a project (or all), newest first; ``status`` is ``open`` or ``resolved``."""
    stmt = (
        select(A, R.c.name.label("run_name"), P.c.name.label("project"))
        .join(R, R.c.id == A.c.run_id)
        .join(P, P.c.id == A.c.project_id)
    )
    if run_id is not None:
        stmt = stmt.where(A.c.run_id == run_id)
    if project:
        stmt = stmt.where(P.c.name == project)
    if status:
        stmt = stmt.where(A.c.status == status)
    stmt = stmt.order_by(A.c.opened_at.desc(), A.c.id.desc()).limit(ALERT_LIMIT)
    with store.reading() as conn:
        return [_alert_dict(r) for r in conn.execute(stmt)]


def run_health(store: Store, run_ids: list[str]) -> dict[str, dict]:
    """Per run: the worst open alert's severity and how many alerts are open."""
    if not run_ids:
        return {}
    stmt = select(A.c.run_id, A.c.severity).where(A.c.status == "open", A.c.run_id.in_(run_ids))
    out: dict[str, dict] = {}
    with store.reading() as conn:
        for rid, sev in conn.execute(stmt):
            h = out.setdefault(rid, {"severity": None, "open": 0})
            h["open"] += 1
            if h["severity"] is None or severity_rank(sev) > severity_rank(h["severity"]):
                h["severity"] = sev
    return out


def series_names(store: Store, run_id: str) -> list[str]:
    with store.reading() as conn:
        return list(conn.execute(select(S.c.name).where(S.c.run_id == run_id).order_by(S.c.name)).scalars())


def series_names_of_runs(store: Store, run_ids: list[str]) -> list[str]:
    if not run_ids:
        return []
    with store.reading() as conn:
        return sorted(set(conn.execute(select(S.c.name).where(S.c.run_id.in_(run_ids))).scalars()))


def last_values(store: Store, run_ids: list[str], names: tuple[str, ...] = KEY_SERIES) -> dict[str, dict[str, float]]:
    """``{run_id: {series: last value}}`` for the named series (NaN stays NaN)."""
    if not run_ids:
        return {}
    ph = placeholder(store.dialect)
    last_sql = f"SELECT value FROM points WHERE series_id = {ph} ORDER BY step DESC LIMIT 1"
    out: dict[str, dict[str, float]] = {}
    with store.reading() as conn:
        rows = conn.execute(select(S.c.id, S.c.run_id, S.c.name).where(S.c.run_id.in_(run_ids), S.c.name.in_(names))).all()
        for sid, rid, name in rows:
            got = conn.exec_driver_sql(last_sql, (sid,)).first()
            if got is not None:
                out.setdefault(rid, {})[name] = math.nan if got[0] is None else got[0]
    return out


def run_version(run: dict, alerts: list[dict], n_events: int) -> dict:
    """What changes when a run page must redraw: new points, alerts, events or status."""
    return {
        "status": run["status"],
        "last_step": run["last_step"],
        "alerts": len(alerts),
        "open_alerts": sum(a["status"] == "open" for a in alerts),
        # Grows when an alert opens (new id) or resolves: a cheap fingerprint of the list.
        "alert_version": max((a["id"] for a in alerts), default=0) + sum(a["status"] != "open" for a in alerts),
        "events": n_events,
    }
