"""JSON for the charts: a run's panels (any step range), its live state, a compare overlay."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from stethoscope_server.auth import visible_runs

from . import _panels

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
    metric: Annotated[str, Query(min_length=1, max_length=200)],
    run: Annotated[list[str] | None, Query(max_length=50)] = None,
    start: Step = None,
    end: Step = None,
):
    return _json(_panels.compare_figure(request.app.state.store, visible_runs(request, run or []), metric, start, end))
