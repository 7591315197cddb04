"""Route: the continual-learning summary of a run (metrics computed on read, see ``server/continual.py``)."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel

from .deps import StoreDep, StrictJSONRoute
from .runs import RunId

router = APIRouter(tags=["continual"], route_class=StrictJSONRoute)


class PreviousTask(BaseModel):
    task: str
    pre_step: int
    pre_acc: float
    min_acc: float
    min_step: int
    gap: float
    recovered: bool
    recovered_step: int | None
    recovery_steps: int | None


class SwitchOut(BaseModel):
    step: int
    task: str
    from_task: str | None
    gap: float | None
    gap_task: str | None
    recovery_steps: int | None
    previous: list[PreviousTask]


class CurrentOut(BaseModel):
    step: int | None
    task: str | None
    k: int
    acc: float | None
    min_acc: float | None
    wc_acc: float | None
    wf10: float | None
    wf100: float | None


class SeriesOut(BaseModel):
    steps: list[int]
    values: list[float]
    downsampled: bool


class ContinualOut(BaseModel):
    run_id: str
    tasks: list[str]
    switches: list[SwitchOut]
    current: CurrentOut
    series: dict[str, SeriesOut]


@router.get("/runs/{run_id}/continual", response_model=ContinualOut, responses={404: {"description": "no such run"}})
def continual_summary(
    run_id: RunId,
    store: StoreDep,
    max_points: Annotated[
        int,
        Query(ge=3, le=1_000_000, description="at most this many points per series; each bucket keeps its min and max"),
    ] = 2000,
):
    """min-ACC, WC-ACC, WF^10 and WF^100 now and as series over the run's evaluations, and each
    task switch with the gap it opened on previous tasks and how long they took to recover,
    from the ``eval/acc/<task>`` series and the ``task_switch`` events (De Lange et al., ICLR 2023)."""
    body = store.continual_summary(run_id, max_points)
    # orjson: a summary with long series would spend longer in pydantic than in computing it.
    return Response(orjson.dumps(body), media_type="application/json")
