"""The HTML pages. They carry the text (escaped by the templates); charts load their JSON."""

from __future__ import annotations

import json
import math
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request

from stethoscope.core.wire import RUN_STATUSES
from stethoscope_server.auth import visible_project, visible_projects, visible_runs
from stethoscope_server.store import NotFound

from ._figures import fmt
from ._web import render

router = APIRouter(include_in_schema=False)

#: Most runs the overview lists; the filters narrow it down.
OVERVIEW_LIMIT = 500
#: Points of the loss sparkline and its size in CSS pixels.
SPARK_POINTS, SPARK_W, SPARK_H = 90, 120, 26
#: How often a running run's page asks whether there is news (milliseconds).
LIVE_POLL_MS = 1000

Filter = Annotated[str | None, Query(max_length=200)]

#: The last values the runs overview shows, in this order, when a run has them.
KEY_SERIES = ("loss", "grad/norm", "logits/sc_fraction", "hessian/lambda_max", "continual/min_acc")


def sparkline(steps: list[int], values: list[float]) -> dict | None:
    """SVG coordinates for a tiny loss line; non-finite points become red marks on the top edge."""
    if not steps:
        return None
    finite = [v for v in values if v - v == 0.0]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    s0, s1 = steps[0], steps[-1]
    sx = (SPARK_W - 2) / (s1 - s0) if s1 > s0 else 0.0
    sy = (SPARK_H - 4) / (hi - lo) if hi > lo else 0.0
    segments, seg, bad = [], [], []
    for s, v in zip(steps, values):
        x = 1 + (s - s0) * sx
        if v - v != 0.0:
            bad.append(round(x, 1))
            if seg:
                segments.append(" ".join(seg))
                seg = []
            continue
        seg.append(f"{x:.1f},{SPARK_H - 2 - (v - lo) * sy:.1f}")
    if seg:
        segments.append(" ".join(seg))
    return {"segments": segments, "bad": bad, "w": SPARK_W, "h": SPARK_H}


def _shown(alerts: list[dict]) -> list[dict]:
    """Alerts as the pages show them: times as ISO text, to the second."""
    for a in alerts:
        for k in ("opened_at", "resolved_at", "acknowledged_at"):
            a[k] = None if a[k] is None else a[k].isoformat(timespec="seconds")
    return alerts


def _incident_rows(incidents: list[dict]) -> list[dict]:
    """A run's incidents as table rows: each root, then the alerts its cause explains."""
    rows = []
    for inc in incidents:
        rows.append(inc)
        rows += inc["consequences"]
    return _shown(rows)


@router.get("/")
def runs_overview(request: Request, project: Filter = None, status: Filter = None, q: Filter = None):
    store = request.app.state.store
    status = status if status in RUN_STATUSES else None
    project = visible_project(request, project or None)  # a project's token sees its project only
    runs = store.list_runs(project=project or None, status=status, q=q or None, limit=OVERVIEW_LIMIT)
    ids = [r["id"] for r in runs]
    health = store.overview.run_health(ids)
    last = store.overview.last_values(ids, KEY_SERIES)
    rows = []
    for r in runs:
        try:
            spark = store.read_series(r["id"], "loss", max_points=SPARK_POINTS)
            spark = sparkline(spark.steps, spark.values)
        except NotFound:  # no loss series yet
            spark = None
        vals = last.get(r["id"], {})
        rows.append(
            {
                "run": r,
                "health": health.get(r["id"], {"severity": None, "open": 0}),
                "values": [(n, fmt(vals[n]), not math.isfinite(vals[n])) for n in KEY_SERIES if n in vals],
                "spark": spark,
            }
        )
    return render(
        request,
        "runs.html",
        rows=rows,
        projects=visible_projects(request, store.list_projects()),
        statuses=RUN_STATUSES,
        f_project=project or "",
        f_status=status or "",
        f_q=q or "",
        page="runs",
    )


@router.get("/runs/{run_id}")
def run_page(run_id: str, request: Request):
    store = request.app.state.store
    run = store.get_run(run_id)
    config = [(k, json.dumps(v, ensure_ascii=False, default=str)) for k, v in sorted(run["config"].items())]
    return render(
        request,
        "run.html",
        run=run,
        config=config,
        alerts=_incident_rows(store.overview.incidents(run_id)),
        events=store.list_events(run_id),
        poll_ms=LIVE_POLL_MS,
        page="run",
        compare_url="/compare?" + urlencode({"project": run["project"], "run": run["id"]}),
    )


@router.get("/alerts")
def alerts_page(request: Request, project: Filter = None, status: Filter = None):
    store = request.app.state.store
    status = status if status in ("open", "resolved") else None
    project = visible_project(request, project or None)
    alerts = _shown(store.overview.alerts(project=project or None, status=status))
    return render(
        request,
        "alerts.html",
        alerts=alerts,
        projects=visible_projects(request, store.list_projects()),
        f_project=project or "",
        f_status=status or "",
        page="alerts",
    )


@router.get("/compare")
def compare_page(
    request: Request,
    project: Filter = None,
    metric: Filter = None,
    run: Annotated[list[str] | None, Query(max_length=50)] = None,
):
    store = request.app.state.store
    project = visible_project(request, project or None)
    runs = store.list_runs(project=project or None, limit=OVERVIEW_LIMIT)
    chosen = visible_runs(request, run or [])
    metrics = store.overview.series_names_of_runs(chosen)
    metric = metric if metric in metrics else ("loss" if "loss" in metrics else (metrics[0] if metrics else None))
    src = (
        "/ui/api/compare?" + urlencode([("metric", metric)] + [("run", r) for r in chosen])
        if metric and chosen
        else None
    )
    return render(
        request,
        "compare.html",
        runs=runs,
        chosen=set(chosen),
        metrics=metrics,
        metric=metric,
        src=src,
        projects=visible_projects(request, store.list_projects()),
        f_project=project or "",
        page="compare",
    )


@router.get("/projects/{project}/settings")
def settings_page(project: str, request: Request):
    return render(request, "settings.html", project=project, page="settings")
