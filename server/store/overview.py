"""The reads of the dashboard's pages, beyond the store's own methods: alerts with their run's
name, each run's health, series names, last values, and a run's continual-learning summary.

Read-only: writes (acknowledge, settings, webhooks) go through the REST API. Reached as
``Store.overview``, so the dashboard speaks to the store alone and holds no SQL::

    store.overview.alerts(project="demo", status="open")
    store.overview.run_health(["r1", "r2"])   # {"r1": {"severity": "critical", "open": 2}}
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from sqlalchemy import select

from stethoscope.core.detectors import severity_rank

from .alerts import alert_dict, group_incidents
from .models import Alert, Project, Run, Series
from .sql import placeholder

if TYPE_CHECKING:
    from . import Store

__all__ = ["Overview", "ALERT_LIMIT"]

ALERTS = Alert.__table__
PROJECTS = Project.__table__
RUNS = Run.__table__
SERIES = Series.__table__


#: Most alerts a page lists at once; older ones are a filter away.
ALERT_LIMIT = 500


class Overview:
    """The dashboard's read-only queries; each method is one read transaction."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def alerts(self, run_id: str | None = None, project: str | None = None, status: str | None = None) -> list[dict]:
        """Alerts of a run or a project (or all), newest first, at most ``ALERT_LIMIT``;
        ``status`` is ``open`` or ``resolved``. The API's alert shape plus ``run_name``."""
        stmt = (
            select(ALERTS, RUNS.c.name.label("run_name"), PROJECTS.c.name.label("project"))
            .join(RUNS, RUNS.c.id == ALERTS.c.run_id)
            .join(PROJECTS, PROJECTS.c.id == ALERTS.c.project_id)
        )
        if run_id is not None:
            stmt = stmt.where(ALERTS.c.run_id == run_id)
        if project:
            stmt = stmt.where(PROJECTS.c.name == project)
        if status:
            stmt = stmt.where(ALERTS.c.status == status)
        stmt = stmt.order_by(ALERTS.c.opened_at.desc(), ALERTS.c.id.desc()).limit(ALERT_LIMIT)
        with self._store.reading() as conn:
            return [{**alert_dict(r, r.project), "run_name": r.run_name} for r in conn.execute(stmt)]

    def incidents(self, run_id: str) -> list[dict]:
        """The run's alerts (at most ``ALERT_LIMIT``, the newest) as incidents, newest root first:
        each root, as :meth:`alerts` has it, with ``consequences`` (oldest first)."""
        alerts = sorted(self.alerts(run_id=run_id), key=lambda a: a["id"])
        return group_incidents(alerts)[::-1]

    def run_health(self, run_ids: list[str]) -> dict[str, dict]:
        """Per run: the worst open alert's severity and how many alerts are open."""
        if not run_ids:
            return {}
        stmt = select(ALERTS.c.run_id, ALERTS.c.severity).where(ALERTS.c.status == "open", ALERTS.c.run_id.in_(run_ids))
        out: dict[str, dict] = {}
        with self._store.reading() as conn:
            for rid, sev in conn.execute(stmt):
                h = out.setdefault(rid, {"severity": None, "open": 0})
                h["open"] += 1
                if h["severity"] is None or severity_rank(sev) > severity_rank(h["severity"]):
                    h["severity"] = sev
        return out

    def series_names(self, run_id: str) -> list[str]:
        """The run's series names, sorted (none for an unknown run)."""
        with self._store.reading() as conn:
            stmt = select(SERIES.c.name).where(SERIES.c.run_id == run_id).order_by(SERIES.c.name)
            return list(conn.execute(stmt).scalars())

    def series_names_of_runs(self, run_ids: list[str]) -> list[str]:
        """Every name any of the runs has, sorted, once each."""
        if not run_ids:
            return []
        with self._store.reading() as conn:
            return sorted(set(conn.execute(select(SERIES.c.name).where(SERIES.c.run_id.in_(run_ids))).scalars()))

    def last_values(self, run_ids: list[str], names: tuple[str, ...]) -> dict[str, dict[str, float]]:
        """``{run_id: {series: last value}}`` for the named series (NaN stays NaN)."""
        if not run_ids:
            return {}
        ph = placeholder(self._store.dialect)
        last_sql = f"SELECT value FROM points WHERE series_id = {ph} ORDER BY step DESC LIMIT 1"
        out: dict[str, dict[str, float]] = {}
        with self._store.reading() as conn:
            stmt = select(SERIES.c.id, SERIES.c.run_id, SERIES.c.name).where(
                SERIES.c.run_id.in_(run_ids), SERIES.c.name.in_(names)
            )
            for sid, rid, name in conn.execute(stmt).all():
                got = conn.exec_driver_sql(last_sql, (sid,)).first()
                if got is not None:
                    out.setdefault(rid, {})[name] = math.nan if got[0] is None else got[0]
        return out
