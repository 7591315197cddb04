"""JSON for the charts: a run's panels (any step range), its live state, a compare overlay."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from stethoscope.core.wire import RUN_STATUSES
from stethoscope_server.auth import visible_project, visible_runs

from . import _pages, _panels

router = APIRouter(prefix="/ui/api", include_in_schema=False)

Step = Annotated[int | None, Query(ge=-(2**63), le=2**63 - 1)]


def _json(obj) -> Response:
    # Figures hold only lists and numbers (non-finite values became gaps plus markers).
    return Response(
        orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY),
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


@router.get("/runs/{run_id}/panels")
def run_panels(
    run_id: str,
    request: Request,
    start: Step = None,
    end: Step = None,
    match: Annotated[
        str | None, Query(max_length=200, description="series whose name contains this are drawn first")
    ] = None,
):
    return _json(_panels.run_panels(request.app.state.store, run_id, start, end, match or None))


@router.get("/runs/{run_id}/state")
def run_state(run_id: str, request: Request):
    """What the page polls: a change in any of these fetches the panels again."""
    store = request.app.state.store
    run = store.get_run(run_id)
    return _json(_panels.run_version(run, store.overview.alerts(run_id=run_id), len(store.list_events(run_id))))


@router.get("/compare")
def compare(
    request: Request,
    metric: Annotated[list[str], Query(min_length=1, max_length=50)],
    run: Annotated[list[str] | None, Query(max_length=50)] = None,
    start: Step = None,
    end: Step = None,
):
    metrics = [m for m in metric if 0 < len(m) <= 200]
    return _json(_panels.compare_figure(request.app.state.store, visible_runs(request, run or []), metrics, start, end))


# ---- the one poll of each page ----------------------------------------------------------
# A page sends the fingerprint of what it shows (``v``); the reply holds the page's regions
# only when they changed, so an idle page costs one small reply per poll.

Version = Annotated[str | None, Query(max_length=64)]
Filter = Annotated[str | None, Query(max_length=200)]


def _live(version: str, seen: str | None, regions: dict, **extra) -> Response:
    out = {"v": version, **extra}
    if version != seen:
        out["regions"] = {k: str(v) for k, v in regions.items()}
    return _json(out)


@router.get("/live/runs/{run_id}")
def live_run(run_id: str, request: Request, v: Version = None):
    """A run page's poll: the charts' state (a change re-fetches the panels) and, when they
    changed, its alerts and events tables."""
    state, regions, version = _pages.run_live(request.app.state.store, run_id)
    return _live(version, v, regions, state=state)


@router.get("/live/overview")
def live_overview(
    request: Request,
    project: Filter = None,
    status: Filter = None,
    q: Filter = None,
    tag: Filter = None,
    v: Version = None,
):
    status = status if status in RUN_STATUSES else None
    project = visible_project(request, project or None)
    _, regions, version = _pages.overview_live(request.app.state.store, project or None, status, q or None, tag or None)
    return _live(version, v, regions)


@router.get("/live/alerts")
def live_alerts(request: Request, project: Filter = None, status: Filter = None, v: Version = None):
    status = status if status in ("open", "resolved") else None
    project = visible_project(request, project or None)
    regions, version = _pages.alerts_live(request.app.state.store, project or None, status)
    return _live(version, v, regions)
