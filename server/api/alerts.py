"""Routes: alerts (per run, per project, acknowledge) and per-project detector settings."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Path, Query, Request

from ..parsing import ALERT_ID_MAX, id_path
from .alert_schemas import AlertOut, AlertStatus, IncidentOut, Severity
from .deps import StoreDep, StrictJSONRoute
from .runs import RunId
from .schemas import NO_NUL, JsonObject

router = APIRouter(tags=["alerts"], route_class=StrictJSONRoute)

ProjectName = Annotated[str, Path(min_length=1, max_length=200, pattern=NO_NUL, description="project name")]
AlertId = id_path(ALERT_ID_MAX, "the alert's id")

_SETTINGS_EXAMPLE = {"loss_spike": {"threshold": 8.0, "window": 256}, "stalled": {"enabled": True, "timeout_s": 600}}


@router.get("/runs/{run_id}/alerts", response_model=list[AlertOut], responses={404: {"description": "no such run"}})
def run_alerts(run_id: RunId, store: StoreDep, status: AlertStatus | None = None):
    """The run's alerts, oldest first: one per episode, open or resolved."""
    return store.alerts.list_run(run_id, status)


@router.get(
    "/runs/{run_id}/incidents", response_model=list[IncidentOut], responses={404: {"description": "no such run"}}
)
def run_incidents(run_id: RunId, store: StoreDep, status: AlertStatus | None = None):
    """The run's incidents, oldest first: each root alert (one with no cause) with the alerts
    its cause explains (``consequences``); ``status`` filters by the root's status."""
    return store.alerts.incidents(run_id, status)


@router.get(
    "/projects/{project}/alerts", response_model=list[AlertOut], responses={404: {"description": "no such project"}}
)
def project_alerts(
    project: ProjectName,
    store: StoreDep,
    status: AlertStatus | None = None,
    severity: Severity | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
):
    """The project's alerts, newest first."""
    return store.alerts.list_project(project, status, severity, limit, offset)


@router.post("/alerts/{alert_id}/ack", response_model=AlertOut, responses={404: {"description": "no such alert"}})
def acknowledge(alert_id: AlertId, store: StoreDep):
    """A person has seen the alert. Safe to repeat: the first acknowledgement's time is kept."""
    return store.alerts.acknowledge(alert_id)


@router.get(
    "/projects/{project}/detectors",
    response_model=dict[str, dict[str, Any]],
    responses={404: {"description": "no such project"}},
)
def get_detector_settings(project: ProjectName, store: StoreDep):
    """Effective settings of every detector: ``{name: {"enabled": ..., param: value, ...}}``."""
    return store.detector_settings.effective(project)


@router.put(
    "/projects/{project}/detectors",
    response_model=dict[str, dict[str, Any]],
    responses={422: {"description": "unknown detector or parameter, or a bad value; nothing is stored"}},
)
def put_detector_settings(
    project: ProjectName,
    store: StoreDep,
    request: Request,
    # Plain JSON only: a lone surrogate in a parameter was stored and then failed every read.
    body: Annotated[dict[str, JsonObject], Body(examples=[_SETTINGS_EXAMPLE])],
):
    """Set the detectors named in the body; each gets exactly the parameters given (the rest
    back to defaults) and ``enabled`` (default true). Detectors not named keep their settings.
    Creates the project if needed, so alerts can be set up before the first run. Returns the
    effective settings of every detector."""
    try:
        out = store.detector_settings.put(project, body)
    except ValueError as e:
        raise HTTPException(422, detail=str(e)) from None
    runner = getattr(request.app.state, "detector_runner", None)
    if runner is not None:
        runner.invalidate()
    return out
