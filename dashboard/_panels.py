"""The run page's panels and the compare figure, built from the store.

Each panel is one plotly figure over the step axis; the page links their x zoom. A zoom asks
for ``start``/``end`` again, and every series is re-read at full detail for that range
(the store downsamples to ``max_points`` keeping each bucket's min, max and first NaN).

A run may have thousands of series (a metric per module of a large model). Each panel draws
at most ``MAX_SERIES_PER_PANEL`` of them, its named series first, then those whose name
contains the page's filter (``match``), then the rest by name; the reply says how many were
left out so the page can offer the filter. The series drawn are read in a few statements
(``Store.read_many``), so the request costs the same whatever the run's series count.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import plotly.graph_objects as go

from stethoscope_server.store import NotFound, Store

from . import _figures as F

#: float32 absorbs x into 1 + x for x <= 2^-24, so a softmax is exactly one-hot once the
#: margin passes 24 ln 2 = 16.64 nats (Prieto et al. 2025, "Grokking at the Edge of
#: Numerical Stability").
SC_MARGIN_BOUND = 24 * math.log(2)
#: Points per series per read: a bucket gives up to 3 points, so ~500 buckets over a plot
#: about 1000 px wide.
MAX_POINTS = 1500
#: Per module in the gradient heatmap: the heatmap bins them again into HEATMAP_BINS columns.
HEATMAP_POINTS = 600
HEATMAP_BINS = 200
#: Lines per chart, or rows of the gradient heatmap. plotly's palette repeats after 10
#: colours and its legend fills the chart long before 64 entries, and the heatmap at 22 px a
#: row is ~1,400 px tall at 64: past this nobody reads a series, while each costs a read
#: and a trace on every request (9,000 series took 8-15 s of server CPU per page load).
MAX_SERIES_PER_PANEL = 64


@dataclass
class PanelSpec:
    id: str
    title: str
    names: tuple[str, ...] = ()
    prefix: str | None = None
    y_title: str = ""
    dashed: tuple[str, ...] = ()
    #: Series drawn against a second y axis on the right (``y3``; ``y2`` holds the markers).
    right: tuple[str, ...] = ()
    right_title: str = ""
    hlines: tuple[tuple[float, str], ...] = ()
    alerts: bool = False
    heatmap: bool = False
    #: Fractions and accuracies start the y axis at 0 (a flat zero is not centred on -1..1).
    to_zero: bool = False
    taken: list[str] = field(default_factory=list)
    #: How many of ``taken`` are not drawn (past ``MAX_SERIES_PER_PANEL``).
    hidden: int = 0


def run_panel_specs() -> list[PanelSpec]:
    return [
        PanelSpec("loss", "Loss, with alerts", ("loss",), alerts=True),
        PanelSpec("grad", "Gradient norm (global)", ("grad/norm",), y_title="‖g‖"),
        PanelSpec("grad_modules", "Gradient norm per module", prefix="grad/norm/", heatmap=True),
        PanelSpec(
            "logits", "Logits: max |z|, mean log Z, entropy", ("logits/max_abs", "logits/mean_logz", "logits/entropy")
        ),
        PanelSpec(
            "collapse",
            "Softmax Collapse: SC fraction and zero-loss fraction",
            ("logits/sc_fraction", "logits/zero_loss_fraction"),
            y_title="fraction",
            to_zero=True,
        ),
        PanelSpec(
            "margin",
            "Median margin against the float32 bound",
            ("logits/median_margin",),
            y_title="nats",
            hlines=((SC_MARGIN_BOUND, f"SC bound {SC_MARGIN_BOUND:.1f} nats"),),
        ),
        # lambda_max against 2/lr decides GD's stability (Cohen et al. 2021): they share the
        # left axis. tr(H) sums every eigenvalue (often 10x lambda_max): on the same axis it
        # flattened the two that matter, so it has its own axis on the right.
        PanelSpec(
            "hessian",
            "Sharpness: λmax against 2/lr (tr(H) on the right axis)",
            ("hessian/lambda_max", "hessian/two_over_lr", "hessian/trace"),
            y_title="λmax, 2/lr",
            dashed=("hessian/two_over_lr",),
            right=("hessian/trace",),
            right_title="tr(H)",
        ),
        PanelSpec(
            "continual",
            "Per-task accuracy, min-ACC and WC-ACC",
            ("continual/min_acc", "continual/wc_acc"),
            prefix="eval/acc/",
            y_title="accuracy",
            dashed=("continual/min_acc", "continual/wc_acc"),
            to_zero=True,
        ),
        PanelSpec("lr", "Learning rate", ("lr",)),
        # The hook's default-on step time (slow_steps reads it), throughput on its own axis.
        PanelSpec(
            "perf",
            "Step time (samples/s on the right axis)",
            ("perf/step_ms",),
            y_title="ms",
            right=("perf/samples_per_s",),
            right_title="samples/s",
        ),
        PanelSpec(
            "cuda_mem", "CUDA memory: in use and peak", ("perf/cuda_mem_mb", "perf/cuda_mem_peak_mb"), y_title="MiB"
        ),
        # attach(dead_units=True): the share of each ReLU layer's units silent on the whole batch.
        PanelSpec("dead", "Dead units per layer (share of units)", prefix="dead/", heatmap=True),
    ]


def _assign(specs: list[PanelSpec], names: list[str]) -> list[str]:
    """Give each series to its panel; returns the ones no panel takes."""
    left = []
    for n in names:
        for p in specs:
            if n in p.names or (p.prefix is not None and n.startswith(p.prefix) and n != p.prefix.rstrip("/")):
                p.taken.append(n)
                break
        else:
            left.append(n)
    return left


def run_panels(store: Store, run_id: str, start: int | None, end: int | None, match: str | None = None) -> dict:
    run = store.get_run(run_id)
    names = store.overview.series_names(run_id)
    events = store.list_events(run_id)
    alerts = store.overview.alerts(run_id=run_id)
    specs = run_panel_specs()
    other = _assign(specs, names)
    specs += _other_panels(other)
    for spec in specs:
        _keep_first(spec, match)
    derived = _continual_series(store, run_id, specs, start, end)
    lines = [n for p in specs if not p.heatmap for n in p.taken if n not in derived]
    reads = store.read_many(run_id, lines, start, end, MAX_POINTS)
    reads.update(store.read_many(run_id, [n for p in specs if p.heatmap for n in p.taken], start, end, HEATMAP_POINTS))
    panels = []
    for spec in specs:
        if not spec.taken:
            continue
        shown = [e for e in events if _in(e["step"], start, end)]
        if spec.heatmap:
            fig = _heatmap_panel(reads, spec, shown)
        else:
            fig = _line_panel(reads, spec, start, end, shown, alerts, derived)
        if fig is not None:
            panels.append(
                {
                    "id": spec.id,
                    "title": spec.title,
                    "log_toggle": not spec.heatmap,
                    # Positive values over more than LOG_DECADES decades: start on a log axis.
                    "auto_log": not spec.heatmap and _spans_decades(reads, derived, spec),
                    "hidden": spec.hidden,
                    "note": _note(spec.hidden, match),
                    "figure": F.figure_json(fig),
                }
            )
    hidden = sum(p.hidden for p in specs)
    return {
        "run": {"id": run["id"], **run_version(run, alerts, len(events))},
        "panels": panels,
        "series": {"total": len(names), "hidden": hidden, "per_panel": MAX_SERIES_PER_PANEL, "match": match or ""},
        "alerts": [
            {
                "id": a["id"],
                "start_step": a["start_step"],
                "first_step": F.first_step(a),
                "peak_step": a["peak_step"],
                "end_step": a["end_step"],
                "severity": a["severity"],
                "status": a["status"],
            }
            for a in alerts
        ],
    }


def run_version(run: dict, alerts: list[dict], n_events: int) -> dict:
    """What changes when a run page must redraw: new points, alerts, events or status."""
    return {
        "status": run["status"],
        "last_step": run["last_step"],
        "alerts": len(alerts),
        "open_alerts": sum(a["status"] == "open" for a in alerts),
        # Changes when an alert opens (new id), resolves or reopens, or joins an incident as a
        # consequence: a cheap fingerprint of the list.
        "alert_version": max((a["id"] for a in alerts), default=0)
        + sum(a["status"] != "open" for a in alerts)
        + sum(a["cause_alert_id"] is not None for a in alerts),
        "events": n_events,
    }


def _other_panels(names: list[str]) -> list[PanelSpec]:
    """Series no panel takes, one panel per family (the name's first path part: ``act/rms/x``
    is family ``act``), so unrelated scales and a long legend do not share one chart."""
    families: dict[str, list[str]] = {}
    for n in names:
        families.setdefault(n.split("/", 1)[0] if "/" in n else "", []).append(n)
    out = []
    for fam, members in sorted(families.items()):
        pid = "other-" + (re.sub(r"[^A-Za-z0-9_-]+", "_", fam) or "_") if fam else "other"
        title = f"Other series: {fam}/…" if fam else "Other series"
        out.append(PanelSpec(pid, title, prefix=f"{fam}/" if fam else None, taken=members))
    # Two families whose names differ only in characters the id drops would share an id.
    seen: dict[str, int] = {}
    for spec in out:
        k = seen[spec.id] = seen.get(spec.id, 0) + 1
        if k > 1:
            spec.id = f"{spec.id}-{k}"
    return out


def _spans_decades(reads: dict, derived: dict, spec: PanelSpec) -> bool:
    """Whether the panel's left-axis series, together, span more than ``LOG_DECADES``."""
    values: list[float] = []
    for name in spec.taken:
        if name in spec.right:
            continue
        if derived and name in derived:
            values += derived[name][1]
        elif name in reads:
            values += reads[name].values
    return F.spans_decades(values)


def _keep_first(spec: PanelSpec, match: str | None) -> None:
    """Keep the ``MAX_SERIES_PER_PANEL`` series of the panel that come first: its named ones,
    then those whose name contains ``match`` (any case), then the rest by name."""
    if len(spec.taken) <= MAX_SERIES_PER_PANEL:
        return
    needle = (match or "").lower()
    spec.taken.sort(key=lambda n: (n not in spec.names, not (needle and needle in n.lower()), n))
    spec.hidden = len(spec.taken) - MAX_SERIES_PER_PANEL
    del spec.taken[MAX_SERIES_PER_PANEL:]


def _note(hidden: int, match: str | None) -> str:
    if not hidden:
        return ""
    how = f"those matching {match!r} first" if match else "filter by name to pick others"
    return f"{hidden} more series not shown (at most {MAX_SERIES_PER_PANEL} per chart; {how})"


def _continual_series(store: Store, run_id: str, specs: list[PanelSpec], start, end) -> dict[str, tuple[list, list]]:
    """min-ACC and WC-ACC are computed on read from the accuracies and task switches
    (``Store.continual_summary``), not stored: fetch them for the continual panel."""
    spec = next(p for p in specs if p.id == "continual")
    if not any(n.startswith(spec.prefix) for n in spec.taken):
        return {}
    out = {}
    series = store.continual_summary(run_id, max_points=MAX_POINTS)["series"]
    for name in spec.names:
        if name in series and name not in spec.taken:
            kept = [(st, v) for st, v in zip(series[name]["steps"], series[name]["values"]) if _in(st, start, end)]
            out[name] = ([st for st, _ in kept], [v for _, v in kept])
            spec.taken.append(name)
    return out


def _in(step: int, start: int | None, end: int | None) -> bool:
    return (start is None or step >= start) and (end is None or step <= end)


def _read(store: Store, run_id: str, name: str, start, end, max_points: int):
    try:
        r = store.read_series(run_id, name, start, end, max_points)
    except NotFound:  # deleted in between
        return [], []
    return r.steps, r.values


def _line_panel(reads: dict, spec: PanelSpec, start, end, events, alerts, derived=None) -> go.Figure | None:
    layout = F.base_layout(spec.title, spec.y_title)
    if spec.to_zero:
        layout["yaxis"]["rangemode"] = "tozero"
    fig = go.Figure()
    any_points = False
    # Named series in their order, then the others as chosen (by name, the filter's first).
    for name in sorted(spec.taken, key=lambda n: (n not in spec.names, spec.names.index(n) if n in spec.names else 0)):
        if derived and name in derived:
            steps, values = derived[name]
        else:
            r = reads.get(name)  # missing: deleted in between
            steps, values = (r.steps, r.values) if r is not None else ([], [])
        any_points |= bool(steps)
        line = {"dash": "dash"} if name in spec.dashed else {}
        label = name[len(spec.prefix) :] if spec.prefix and name.startswith(spec.prefix) else name
        label = f"task {label}" if spec.prefix == "eval/acc/" and name.startswith(spec.prefix) else label
        traces = F.line_traces(label, steps, values, **line)
        if name in spec.right:
            traces[0].update(yaxis="y3", name=F.esc(f"{label} (right axis)"))
        fig.add_traces(traces)
    if not any_points:
        return None
    if spec.right:
        layout["yaxis3"] = {
            "title": {"text": F.esc(spec.right_title)},
            "overlaying": "y",
            "side": "right",
            "showgrid": False,
            "exponentformat": "power",
        }
        layout["margin"]["r"] = 60
    for y, label in spec.hlines:
        F.hline(layout, y, label)
    if spec.alerts:
        F.add_alerts(fig, layout, [a for a in alerts if _overlaps(a, start, end)])
    if spec.id in ("loss", "continual"):
        ev = F.event_trace(events)
        if ev is not None:
            fig.add_trace(ev)
    F.add_events(layout, events)
    fig.update_layout(layout)
    return fig


def _overlaps(a: dict, start, end) -> bool:
    span = F.alert_range(a)
    if span is None:
        return False
    lo, hi = span
    return (end is None or lo <= end) and (start is None or hi >= start)


def _heatmap_panel(reads: dict, spec: PanelSpec, events) -> go.Figure | None:
    rows = []
    for name in spec.taken:
        r = reads.get(name)
        if r is not None and r.steps:
            rows.append((name[len(spec.prefix) :], r.steps, r.values))
    return F.heatmap(spec.title, rows, HEATMAP_BINS, events)


#: Most metrics the compare page draws at once (one chart each).
MAX_COMPARE_METRICS = 8


def compare_figure(store: Store, run_ids: list[str], metrics: list[str], start: int | None, end: int | None) -> dict:
    """Each metric a chart, the runs overlaid; every run has its own colour
    (``_figures.run_colour``), the same on every chart and page, and the legend names it."""
    runs = []
    taken: set[str] = set()
    for rid in run_ids:
        try:
            run = store.get_run(rid)
        except NotFound:
            continue
        colour = F.run_colour(rid, taken)
        taken.add(colour)
        runs.append((run, colour))
    panels = []
    for metric in metrics[:MAX_COMPARE_METRICS]:
        layout = F.base_layout(f"{metric} across runs")
        layout["height"] = 420
        fig = go.Figure()
        values: list[float] = []
        for run, colour in runs:
            rid = run["id"]
            steps, vals = _read(store, rid, metric, start, end, MAX_POINTS)
            if steps:
                label = f"{run['name']} ({rid})" if run["name"] != rid else rid
                fig.add_traces(F.line_traces(label, steps, vals, color=colour))
                values += vals
        fig.update_layout(layout)
        pid = "compare" if len(panels) == 0 else f"compare-{len(panels)}"
        panels.append(
            {
                "id": pid,
                "title": metric,
                "log_toggle": True,
                "auto_log": F.spans_decades(values),
                "figure": F.figure_json(fig),
            }
        )
    return {
        "panels": panels,
        "run": None,
        "alerts": [],
        "colours": {run["id"]: colour for run, colour in runs},
    }
