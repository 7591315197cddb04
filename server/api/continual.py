"""Route: the continual-learning summary of a run (metrics computed on read, see ``server/continual.py``)."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel
from sqlalchemy import select

from .. import continual
from ..models import Event, Point, Series
from ..store import runs as _runs
from .deps import StoreDep
from .runs import RunId

router = APIRouter(tags=["continual"])

S, P, E = Series.__table__, Point.__table__, Event.__table__


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
    max_points: Annotated[int, Query(ge=3, le=1_000_000, description="at most this many points per series; each bucket keeps its min and max")] = 2000,
):
    """min-ACC, WC-ACC, WF^10 and WF^100 now and as series over the run's evaluations, and each
    task switch with the gap it opened on previous tasks and how long they took to recover,
    from the ``eval/acc/<task>`` series and the ``task_switch`` events (De Lange et al., ICLR 2023)."""
    with store.reading() as conn:
        _runs.get_run(conn, run_id)
        acc = _accuracies(conn, run_id)
        events = [{"step": r.step, "kind": "task_switch", "info": r.info or {}}
                  for r in conn.execute(select(E.c.step, E.c.info).where(E.c.run_id == run_id, E.c.kind == "task_switch").order_by(E.c.step, E.c.id))]
        switches = continual.switches_from_events(events)
        if not switches:  # points posted without events: the hook's continual/task series
            switches = [continual.Switch(s, str(int(v))) for s, v in _points(conn, run_id, continual.TASK_SERIES) if v == v]
    summary = continual.compute(acc, switches)
    series = {}
    for name, (steps, values) in summary.series.items():
        steps, values, down = continual.downsample(steps, values, max_points)
        series[name] = {"steps": steps, "values": values, "downsampled": down}
    body = {"run_id": run_id, "tasks": summary.tasks, "switches": summary.switches, "current": summary.current, "series": series}
    # orjson: a summary with long series would spend longer in pydantic than in computing it.
    return Response(orjson.dumps(body), media_type="application/json")


def _accuracies(conn, run_id: str) -> dict[str, list[tuple[int, float]]]:
    rows = conn.execute(select(S.c.id, S.c.name).where(S.c.run_id == run_id, S.c.name.startswith(continual.ACC_PREFIX, autoescape=True))).all()
    out = {}
    for sid, name in rows:
        task = continual.task_of(name)
        if task is not None:
            out[task] = [(s, v) for s, v in conn.execute(select(P.c.step, P.c.value).where(P.c.series_id == sid).order_by(P.c.step)) if v is not None]
    return out


def _points(conn, run_id: str, name: str) -> list[tuple[int, float]]:
    sid = conn.execute(select(S.c.id).where(S.c.run_id == run_id, S.c.name == name)).scalar()
    if sid is None:
        return []
    return [(s, v) for s, v in conn.execute(select(P.c.step, P.c.value).where(P.c.series_id == sid).order_by(P.c.step)) if v is not None]
