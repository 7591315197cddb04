"""Per-project detector settings: which detectors run and their parameter overrides.

A project without rows runs every detector with its defaults. A row holds what a person set
for one detector (``enabled`` and the parameters they changed); the effective settings are
the defaults with those overrides, validated by :class:`stethoscope.core.detectors.DetectorSet`.
"""

from __future__ import annotations

import logging

from sqlalchemy import Connection, delete, insert, select

from stethoscope.core.detectors import DETECTORS, DetectorSet

from .errors import NotFound
from .models import DetectorSetting, Project
from .runs import ensure_project

log = logging.getLogger("stethoscope.server.detectors")

D = DetectorSetting.__table__
P = Project.__table__


def project_id(conn: Connection, project: str) -> int:
    pid = conn.execute(select(P.c.id).where(P.c.name == project)).scalar()
    if pid is None:
        raise NotFound(f"project {project!r} does not exist")
    return pid


def load_overrides(conn: Connection, pid: int) -> dict[str, dict]:
    """``{detector: {"enabled": ..., param: value}}`` as stored for the project."""
    rows = conn.execute(select(D.c.detector, D.c.enabled, D.c.params).where(D.c.project_id == pid))
    return {r.detector: {"enabled": bool(r.enabled), **(r.params or {})} for r in rows}


def detector_set(overrides: dict[str, dict]) -> DetectorSet:
    """The detectors to run. A stored entry that no longer validates (a parameter renamed in a
    newer version) falls back to that detector's defaults, with a log line, rather than
    stopping every detector of the project."""
    try:
        return DetectorSet(overrides)
    except ValueError:
        good = {}
        for name, cfg in overrides.items():
            try:
                DetectorSet({name: cfg})
                good[name] = cfg
            except ValueError as e:
                log.warning("ignoring stored settings of detector %r: %s", name, e)
        return DetectorSet(good)


def effective(conn: Connection, project: str) -> dict[str, dict]:
    return detector_set(load_overrides(conn, project_id(conn, project))).settings()


def put(conn: Connection, project: str, changes: dict[str, dict]) -> dict[str, dict]:
    """Replace the settings of each detector named in ``changes`` (others keep theirs).

    A detector's object holds ``enabled`` and any of its parameters; parameters left out take
    their defaults. ``ValueError`` (nothing stored) if a detector, parameter or value is wrong.
    """
    for name, cfg in changes.items():
        if name not in DETECTORS:
            raise ValueError(f"unknown detector {name!r}; known detectors: {', '.join(DETECTORS)}")
        if not isinstance(cfg, dict):
            raise ValueError(f"settings for {name!r} must be an object of parameters, got {cfg!r}")
    pid = ensure_project(conn, project)
    merged = {**load_overrides(conn, pid), **changes}
    DetectorSet(merged)  # validates every name, type and range; raises ValueError
    for name, cfg in changes.items():
        cfg = dict(cfg)
        enabled = cfg.pop("enabled", True)
        conn.execute(delete(D).where(D.c.project_id == pid, D.c.detector == name))
        conn.execute(insert(D).values(project_id=pid, detector=name, enabled=enabled, params=cfg))
    return DetectorSet(merged).settings()


def stalled_timeouts(conn: Connection, detector: str) -> list:
    """The ``timeout_s`` each project set for the stalled-run detector (None where unset)."""
    return [p.get("timeout_s") for p in conn.execute(select(D.c.params).where(D.c.detector == detector)).scalars()]


class DetectorSettingsStore:
    """``store.detector_settings``: each method one transaction."""

    def __init__(self, store) -> None:
        self._store = store

    def effective(self, project: str) -> dict[str, dict]:
        with self._store.reading() as conn:
            return effective(conn, project)

    def put(self, project: str, changes: dict[str, dict]) -> dict[str, dict]:
        with self._store.writing() as conn:
            return put(conn, project, changes)

    def overrides(self, project_id: int) -> dict[str, dict]:
        with self._store.reading() as conn:
            return load_overrides(conn, project_id)
