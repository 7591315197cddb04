"""Which project a thing belongs to: the gate's look-ups, behind ``store.access``.

    store.access.run_projects(["r1", "r2"])   # {"r1": "vision"}: runs that do not exist are left out
    store.access.alert_project(7)              # "vision", or None: no such alert
    store.access.token_project(3)              # (True, None): a token for every project

Each method is one transaction. What the gate remembers, and what a missing thing means for a
request, is the gate's business (``server/auth/access.py``).
"""

from __future__ import annotations

from sqlalchemy import select

from .models import Alert, Project, Run, Token, Webhook

R, P, A, W, T = Run.__table__, Project.__table__, Alert.__table__, Webhook.__table__, Token.__table__

#: Run ids one statement looks up (a comparison page names a few; well inside parameter limits).
RUNS_PER_STATEMENT = 1000


class AccessStore:
    """``store.access``: the project of a run, an alert, a webhook or a token."""

    def __init__(self, store) -> None:
        self._store = store

    def run_projects(self, run_ids: list[str]) -> dict[str, str]:
        """``{run id: project name}`` of the runs that exist."""
        out: dict[str, str] = {}
        with self._store.reading() as conn:
            for k in range(0, len(run_ids), RUNS_PER_STATEMENT):
                chunk = run_ids[k : k + RUNS_PER_STATEMENT]
                q = select(R.c.id, P.c.name).join(P, P.c.id == R.c.project_id).where(R.c.id.in_(chunk))
                out.update(conn.execute(q).all())
        return out

    def alert_project(self, alert_id: int) -> str | None:
        with self._store.reading() as conn:
            return conn.execute(select(P.c.name).join(A, A.c.project_id == P.c.id).where(A.c.id == alert_id)).scalar()

    def webhook_project(self, webhook_id: int) -> str | None:
        with self._store.reading() as conn:
            return conn.execute(select(P.c.name).join(W, W.c.project_id == P.c.id).where(W.c.id == webhook_id)).scalar()

    def token_project(self, token_id: int) -> tuple[bool, str | None]:
        """(whether the token exists, its project's name: None for a token of every project)."""
        with self._store.reading() as conn:
            row = conn.execute(
                select(T.c.project_id, P.c.name)
                .select_from(T.outerjoin(P, P.c.id == T.c.project_id))
                .where(T.c.id == token_id)
            ).first()
        if row is None:
            return False, None
        return True, (None if row.project_id is None else row.name)
