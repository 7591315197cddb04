"""The HTML pages. They carry the text (escaped by the templates); charts load their JSON.

Each page's tables and lists are "regions": fragments rendered by their own templates, once
into the page and again for the page's one live poll (``_data.live_*``), which sends them
only when their fingerprint changed. A page makes one request per poll, whatever its panels.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse
from markupsafe import Markup

from stethoscope.core.detectors import severity_rank
from stethoscope.core.wire import RUN_STATUSES
from stethoscope_server.auth import visible_project, visible_projects, visible_runs
from stethoscope_server.store import NotFound, group_incidents

from . import _panels
from ._detector_help import advice, detector_docs
from ._figures import alert_range, first_step, fmt, run_colour
from ._web import env, render

router = APIRouter(include_in_schema=False)

#: Most runs the overview lists; the filters narrow it down.
OVERVIEW_LIMIT = 500
#: Points of the loss sparkline and its size in CSS pixels.
SPARK_POINTS, SPARK_W, SPARK_H = 90, 120, 26
#: How often a running run's page asks whether there is news (milliseconds).
LIVE_POLL_MS = 1000
#: How often the runs overview and the alerts page ask (milliseconds): their one poll renders
#: every listed row (sparklines included), so it is slower than a run page's.
LIST_POLL_MS = 3000
#: Config keys shown as columns of the runs overview: those most runs have, scalars only.
CONFIG_COLUMNS = 4
#: Evidence entries shown per alert, and the longest text of one value.
EVIDENCE_ITEMS, EVIDENCE_CHARS = 12, 120
#: Steps shown around an alert's range when a click zooms to it, as a share of its length.
ZOOM_PAD = 0.25

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


def _evidence(ev: dict) -> list[tuple[str, str]]:
    out = []
    for k, v in list((ev or {}).items())[:EVIDENCE_ITEMS]:
        if isinstance(v, bool) or v is None:
            text = json.dumps(v)
        elif isinstance(v, (int, float)):
            text = fmt(float(v)) if isinstance(v, float) else str(v)
        else:
            text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
        out.append((str(k), text if len(text) <= EVIDENCE_CHARS else text[: EVIDENCE_CHARS - 1] + "…"))
    return out


def _shown(alerts: list[dict]) -> list[dict]:
    """Alerts as the pages show them: times as ISO text, to the second; the first detection's
    step, the range to zoom to, the evidence as short text, and what to do."""
    for a in alerts:
        for k in ("opened_at", "resolved_at", "acknowledged_at"):
            if a[k] is not None and not isinstance(a[k], str):
                a[k] = a[k].isoformat(timespec="seconds")
        a["first_step"] = first_step(a)
        span = alert_range(a)
        if span is not None:
            pad = max(5, math.ceil((span[1] - span[0]) * ZOOM_PAD))
            a["zoom"] = (max(0, span[0] - pad), span[1] + pad)
        a["evidence_items"] = _evidence(a.get("evidence") or {})
        a["first_evidence_items"] = _evidence((a.get("first_detection") or {}).get("evidence") or {})
        a["advice"] = advice(a["detector"])
    return alerts


def _incident_rows(incidents: list[dict]) -> list[dict]:
    """A run's incidents as table rows: each root, then the alerts its cause explains."""
    rows = []
    for inc in incidents:
        rows.append(inc)
        rows += inc["consequences"]
    return _shown(rows)


def nest(alerts: list[dict]) -> list[dict]:
    """Alerts in the given order, each consequence moved under its root when the root is
    listed too (a consequence whose root is not listed stays where it was), oldest first."""
    by_id = operator.itemgetter("id")
    return [row for inc in group_incidents(alerts) for row in (inc, *sorted(inc["consequences"], key=by_id))]


def fragment(template: str, **context) -> Markup:
    """A region rendered alone (autoescaped, as in the page)."""
    return Markup(env.get_template(template).render(**context))


def fingerprint(regions: dict[str, Markup], extra: object = None) -> str:
    h = hashlib.sha1(usedforsecurity=False)
    for k in sorted(regions):
        h.update(k.encode() + b"\0" + str(regions[k]).encode() + b"\0")
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


# ---- run page -------------------------------------------------------------------------


def run_live(store, run_id: str) -> tuple[dict, dict[str, Markup], str]:
    """(chart state, regions, fingerprint) of a run page."""
    run = store.get_run(run_id)
    rows = _incident_rows(store.overview.incidents(run_id))
    events = store.list_events(run_id)
    state = {
        **_panels.run_version(run, rows, len(events)),
        "status": run["status"],
        "last_step": run["last_step"],
    }
    regions = {
        "alerts": fragment("_run_alerts.html", alerts=rows),
        "events": fragment("_run_events.html", events=events),
    }
    return state, regions, fingerprint(regions, state)


@router.get("/runs/{run_id}")
def run_page(run_id: str, request: Request):
    store = request.app.state.store
    try:
        if not visible_runs(request, [run_id]):  # another project's: answered as a missing one
            raise NotFound(run_id)
        run = store.get_run(run_id)
    except NotFound:
        return not_found(request, f"There is no run {run_id!r}.", "It may have been deleted, or the link is wrong.")
    config = [(k, json.dumps(v, ensure_ascii=False, default=str)) for k, v in sorted(run["config"].items())]
    _, regions, version = run_live(store, run_id)
    return render(
        request,
        "run.html",
        run=run,
        config=config,
        regions=regions,
        live_v=version,
        poll_ms=LIVE_POLL_MS,
        page="run",
        colour=run_colour(run["id"]),
        compare_url="/compare?" + urlencode({"project": run["project"], "run": run["id"]}),
    )


def not_found(request: Request, what: str, hint: str = ""):
    return render(request, "404.html", status_code=404, what=what, hint=hint, page="")


# ---- runs overview --------------------------------------------------------------------


def _config_columns(runs: list[dict]) -> list[str]:
    counts: dict[str, int] = {}
    for r in runs:
        for k, v in r["config"].items():
            if isinstance(v, (str, int, float, bool)) or v is None:
                counts[k] = counts.get(k, 0) + 1
    return [k for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:CONFIG_COLUMNS]]


def _worst_alerts(store, project: str | None) -> dict[str, dict]:
    """Per run: its worst open alert (most severe, then newest)."""
    worst: dict[str, dict] = {}
    for a in store.overview.alerts(project=project, status="open"):  # newest first
        w = worst.get(a["run_id"])
        if w is None or severity_rank(a["severity"]) > severity_rank(w["severity"]):
            worst[a["run_id"]] = a
    return worst


def overview_live(store, project, status, q, tag) -> tuple[dict, dict[str, Markup], str]:
    """(context, regions, fingerprint) of the runs overview."""
    runs = store.list_runs(project=project, status=status, q=q, tag=tag, limit=OVERVIEW_LIMIT)
    ids = [r["id"] for r in runs]
    health = store.overview.run_health(ids)
    worst = _worst_alerts(store, project)
    last = store.overview.last_values(ids, KEY_SERIES)
    columns = _config_columns(runs)
    rows = []
    for r in runs:
        try:
            spark = store.read_series(r["id"], "loss", max_points=SPARK_POINTS)
            spark = sparkline(spark.steps, spark.values)
        except NotFound:  # no loss series yet
            spark = None
        vals = last.get(r["id"], {})
        h = health.get(r["id"], {"severity": None, "open": 0})
        rows.append(
            {
                "run": r,
                "colour": run_colour(r["id"]),
                "health": h,
                "worst": worst.get(r["id"]),
                "config": [json.dumps(r["config"][k], ensure_ascii=False) if k in r["config"] else "" for k in columns],
                "values": [(n, fmt(vals[n]), not math.isfinite(vals[n])) for n in KEY_SERIES if n in vals],
                "loss": vals.get("loss"),
                "spark": spark,
            }
        )
    filtered = bool(q or project or status or tag)
    regions = {"runs": fragment("_runs_rows.html", rows=rows, columns=columns, filtered=filtered)}
    ctx = {"columns": columns, "tags": sorted({t for r in runs for t in r["tags"]} | ({tag} if tag else set()))}
    return ctx, regions, fingerprint(regions, ctx)


@router.get("/")
def runs_overview(
    request: Request, project: Filter = None, status: Filter = None, q: Filter = None, tag: Filter = None
):
    store = request.app.state.store
    status = status if status in RUN_STATUSES else None
    project = visible_project(request, project or None)  # a project's token sees its project only
    ctx, regions, version = overview_live(store, project or None, status, q or None, tag or None)
    return render(
        request,
        "runs.html",
        regions=regions,
        live_v=version,
        live_src="/ui/api/live/overview?"
        + urlencode({k: v for k, v in (("project", project), ("status", status), ("q", q), ("tag", tag)) if v}),
        poll_ms=LIST_POLL_MS,
        projects=visible_projects(request, store.list_projects()),
        statuses=RUN_STATUSES,
        f_project=project or "",
        f_status=status or "",
        f_q=q or "",
        f_tag=tag or "",
        page="runs",
        **ctx,
    )


# ---- alerts page ----------------------------------------------------------------------


def alerts_live(store, project, status) -> tuple[dict[str, Markup], str]:
    alerts = _shown(nest(store.overview.alerts(project=project, status=status)))
    regions = {"alerts": fragment("_alerts_table.html", alerts=alerts, filtered=bool(project or status))}
    return regions, fingerprint(regions)


@router.get("/alerts")
def alerts_page(request: Request, project: Filter = None, status: Filter = None):
    store = request.app.state.store
    status = status if status in ("open", "resolved") else None
    project = visible_project(request, project or None)
    regions, version = alerts_live(store, project or None, status)
    return render(
        request,
        "alerts.html",
        regions=regions,
        live_v=version,
        live_src="/ui/api/live/alerts?" + urlencode({k: v for k, v in (("project", project), ("status", status)) if v}),
        poll_ms=LIST_POLL_MS,
        projects=visible_projects(request, store.list_projects()),
        f_project=project or "",
        f_status=status or "",
        page="alerts",
    )


# ---- compare --------------------------------------------------------------------------


@router.get("/compare")
def compare_page(
    request: Request,
    project: Filter = None,
    metric: Annotated[list[str] | None, Query(max_length=50)] = None,
    run: Annotated[list[str] | None, Query(max_length=50)] = None,
):
    store = request.app.state.store
    project = visible_project(request, project or None)
    runs = store.list_runs(project=project or None, limit=OVERVIEW_LIMIT)
    chosen = visible_runs(request, run or [])
    metrics = store.overview.series_names_of_runs(chosen)
    picked = [m for m in (metric or []) if m in metrics][: _panels.MAX_COMPARE_METRICS]
    if not picked and metrics:
        picked = ["loss" if "loss" in metrics else metrics[0]]
    src = (
        "/ui/api/compare?" + urlencode([("metric", m) for m in picked] + [("run", r) for r in chosen])
        if picked and chosen
        else None
    )
    # Colours as the chart gives them: each run's own slot, moved on only on a clash.
    taken: set[str] = set()
    colours = {}
    for rid in chosen:
        colours[rid] = run_colour(rid, taken)
        taken.add(colours[rid])
    return render(
        request,
        "compare.html",
        runs=runs,
        chosen=set(chosen),
        colours=colours,
        metrics=metrics,
        picked=set(picked),
        src=src,
        projects=visible_projects(request, store.list_projects()),
        f_project=project or "",
        page="compare",
    )


# ---- settings -------------------------------------------------------------------------


@router.get("/settings")
def settings_index(request: Request, project: Filter = None):
    """The navigation's Settings: the project's settings, or a list of projects to choose."""
    store = request.app.state.store
    projects = visible_projects(request, store.list_projects())
    project = project or (projects[0]["name"] if len(projects) == 1 else None)
    if project:
        return RedirectResponse(f"/projects/{_quote(project)}/settings", status_code=303)
    return render(request, "settings_index.html", projects=projects, page="settings")


def _quote(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="")


@router.get("/projects/{project}/settings")
def settings_page(project: str, request: Request):
    store = request.app.state.store
    return render(
        request,
        "settings.html",
        project=project,
        projects=visible_projects(request, store.list_projects()),
        docs=json.dumps(detector_docs(), ensure_ascii=False),
        page="settings",
    )
