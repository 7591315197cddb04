"""plotly figure builders: one figure per panel, returned as plain JSON-ready dicts.

Non-finite values are data, never silently dropped: a line has a gap where a value is NaN or
+-inf, and a marker trace on a fixed 0..1 overlay axis (``y2``) puts a red X at the top of the
plot for NaN and +inf, and at the bottom for -inf, with the value in the hover text. The
overlay axis keeps them visible at any zoom and on a log scale.

Every string that came from a user (series names, module names, task names, alert and event
messages) passes through ``esc``: plotly renders a small HTML subset in names and hover text.
"""

from __future__ import annotations

import html
import math
import zlib
from typing import Iterable

import plotly.graph_objects as go

#: Colours of alert shading and markers, by severity.
SEVERITY_COLOURS = {"critical": "#d62728", "warning": "#ff7f0e", "info": "#1f77b4"}
NONFINITE_COLOUR = "#d62728"
#: Where non-finite markers sit on the 0..1 overlay axis.
TOP, BOTTOM = 0.93, 0.04
#: Where alert flags sit on the overlay axis: on the top edge, above the non-finite markers.
ALERT_Y = 1.0
PLOT_HEIGHT = 300
#: A panel whose positive values span more than this many decades is drawn on a log y axis
#: (until the user chooses): a loss going from 1 to 1e10 before its NaN, or falling from 3 to
#: 6e-8, is a flat line on a linear axis. Three decades is where a linear axis stops showing
#: the smallest tenth of the data at all (it sits within one pixel row of a 300 px plot).
LOG_DECADES = 3.0
#: One colour per run, the same on every page: 24 colours that stay apart (plotly's Dark24,
#: https://plotly.com/python/discrete-color/), so ~20 runs on one chart do not repeat.
RUN_PALETTE = (
    "#2E91E5", "#E15F99", "#1CA71C", "#FB0D0D", "#DA16FF", "#222A2A", "#B68100", "#750D86",
    "#EB663B", "#511CFB", "#00A08B", "#FB00D1", "#FC0080", "#B2828D", "#6C7C32", "#778AAE",
    "#862A16", "#A777F1", "#620042", "#1616A7", "#DA60CA", "#6C4516", "#0D2A63", "#AF0038",
)  # fmt: skip


def esc(s: object) -> str:
    return html.escape(str(s), quote=True)


def fmt(v: float) -> str:
    if v != v:
        return "NaN"
    if v in (math.inf, -math.inf):
        return "+inf" if v > 0 else "-inf"
    return f"{v:.6g}"


def spans_decades(values: Iterable[float], decades: float = LOG_DECADES) -> bool:
    """True when the finite values are all positive and max/min exceeds 10**decades: the
    panel should start on a log axis. Any value <= 0 keeps it linear (log cannot show it)."""
    lo, hi = math.inf, 0.0
    for v in values:
        if v is None or v - v != 0.0:  # gaps and non-finite values are markers, not the scale
            continue
        if v <= 0.0:
            return False
        lo, hi = min(lo, v), max(hi, v)
    return hi > 0.0 and hi / lo > 10.0**decades


def run_colour(run_id: str, taken: set[str] | None = None) -> str:
    """The run's colour: a slot of ``RUN_PALETTE`` chosen by a stable hash of its id (crc32,
    not Python's salted ``hash``), so the run keeps it on every page and after restarts.
    ``taken``: colours already given on this chart; on a clash the next free slot is used,
    so up to 24 runs on one chart never share one (the clash makes it move on that chart only)."""
    i = zlib.crc32(run_id.encode("utf-8", "surrogatepass")) % len(RUN_PALETTE)
    for k in range(len(RUN_PALETTE)):
        colour = RUN_PALETTE[(i + k) % len(RUN_PALETTE)]
        if not taken or colour not in taken:
            return colour
    return RUN_PALETTE[i]


#: plotly's default line colours, given explicitly because figures go out without their
#: template (``figure_json``).
COLORWAY = [
    "#636efa",
    "#EF553B",
    "#00cc96",
    "#ab63fa",
    "#FFA15A",
    "#19d3f3",
    "#FF6692",
    "#B6E880",
    "#FF97FF",
    "#FECB52",
]


def figure_json(fig: go.Figure) -> dict:
    """The figure as JSON without plotly.py's default template: ~7 KB per chart that every
    reply carried and plotly.js merged again on each redraw; the layout sets what we use of it."""
    out = fig.to_plotly_json()
    out.get("layout", {}).pop("template", None)
    return out


def base_layout(title: str, y_title: str = "", log_y: bool = False) -> dict:
    return {
        "title": {"text": esc(title), "x": 0.01, "font": {"size": 14}},
        "height": PLOT_HEIGHT,
        "margin": {"l": 60, "r": 20, "t": 40, "b": 30},
        # No x title: every axis is the step axis, and the legend sits below it.
        "xaxis": {"showspikes": True, "spikemode": "across", "spikethickness": 1, "zeroline": False},
        "yaxis": {"title": {"text": esc(y_title)}, "type": "log" if log_y else "linear", "exponentformat": "power"},
        # Fixed 0..1 axis for markers that must stay in view whatever the data's scale.
        "yaxis2": {"overlaying": "y", "range": [0, 1], "visible": False, "fixedrange": True},
        "hovermode": "closest",
        "legend": {"orientation": "h", "y": -0.12, "yanchor": "top", "uirevision": "keep"},
        "plot_bgcolor": "#fff",
        "colorway": COLORWAY,
        "shapes": [],
        "annotations": [],
    }


def line_traces(name: str, steps: list[int], values: list[float], **line) -> list[go.Scatter]:
    """The series as a line with gaps at non-finite values, plus their explicit markers."""
    ys: list[float | None] = []
    bad_x: list[int] = []
    bad_y: list[float] = []
    bad_text: list[str] = []
    bad_symbol: list[str] = []
    for s, v in zip(steps, values):
        if v - v == 0.0:
            ys.append(v)
            continue
        ys.append(None)
        bad_x.append(s)
        bad_y.append(BOTTOM if v == -math.inf else TOP)
        bad_symbol.append("x" if v != v else ("triangle-up" if v > 0 else "triangle-down"))
        bad_text.append(f"{esc(name)}: {fmt(v)} at step {s}")
    traces = [
        go.Scatter(
            x=steps,
            y=ys,
            name=esc(name),
            mode="lines",
            line={"width": 1.5, **line},
            legendgroup=esc(name),
            connectgaps=False,
            hovertemplate="%{y:.6g} at step %{x}<extra>" + esc(name) + "</extra>",
        )
    ]
    if bad_x:
        traces.append(
            go.Scatter(
                x=bad_x,
                y=bad_y,
                yaxis="y2",
                mode="markers",
                name=esc(f"{name}: NaN/inf"),
                legendgroup=esc(name),
                marker={
                    "color": NONFINITE_COLOUR,
                    "size": 11,
                    "symbol": bad_symbol,
                    "line": {"width": 2, "color": NONFINITE_COLOUR},
                },
                text=bad_text,
                hoverinfo="text",
                meta={"nonfinite": esc(name)},
            )
        )
    return traces


def hline(layout: dict, y: float, label: str, colour: str = "#555") -> None:
    """A dashed horizontal reference line across the plot (e.g. the 16.6-nat bound)."""
    layout["shapes"].append(
        {
            "type": "line",
            "xref": "paper",
            "x0": 0,
            "x1": 1,
            "y0": y,
            "y1": y,
            "line": {"dash": "dash", "color": colour, "width": 1.5},
        }
    )
    layout["annotations"].append(
        {
            "xref": "paper",
            "x": 0.01,
            "y": y,
            "xanchor": "left",
            "yanchor": "bottom",
            "text": esc(label),
            "showarrow": False,
            "font": {"size": 11, "color": colour},
        }
    )


def add_events(layout: dict, events: Iterable[dict]) -> None:
    """Events as dotted vertical lines across the plot; task switches darker."""
    for e in events:
        colour = "#6a3d9a" if e["kind"] == "task_switch" else "#999"
        layout["shapes"].append(
            {
                "type": "line",
                "xref": "x",
                "yref": "paper",
                "x0": e["step"],
                "x1": e["step"],
                "y0": 0,
                "y1": 1,
                "layer": "below",
                "line": {"dash": "dot", "color": colour, "width": 1},
            }
        )


def event_trace(events: list[dict]) -> go.Scatter | None:
    """Events as hoverable markers at the bottom of the plot (the lines alone have no hover)."""
    if not events:
        return None
    return go.Scatter(
        x=[e["step"] for e in events],
        y=[0.0] * len(events),
        yaxis="y2",
        mode="markers",
        name="events",
        marker={"symbol": "diamond", "size": 9, "color": "#6a3d9a"},
        text=[esc(event_label(e)) + f" at step {e['step']}" for e in events],
        hoverinfo="text",
    )


def event_label(e: dict) -> str:
    task = (e.get("info") or {}).get("task")
    label = e["kind"] if task is None else f"{e['kind']} → {task}"
    return f"{label}: {e['message']}" if e.get("message") else label


def alert_range(a: dict) -> tuple[int, int] | None:
    """The steps an alert's episode covers as detected: start..end (for an open alert, the
    last step that still showed it), never the rest of the run."""
    start = a["start_step"] if a["start_step"] is not None else a["peak_step"]
    if start is None:
        return None
    end = max(x for x in (a["end_step"], a["peak_step"], start) if x is not None)
    return start, end


def first_step(a: dict) -> int | None:
    """Where the alert was first detected (its first detection), else where it starts."""
    first = a.get("first_detection") or {}
    step = first.get("step")
    return step if isinstance(step, int) else (a["start_step"] if a["start_step"] is not None else a["peak_step"])


def add_alerts(fig: go.Figure, layout: dict, alerts: list[dict]) -> None:
    """The detected range of each alert shaded, and a flag at its first detection with that
    message (and the peak's) on hover; a click on a flag zooms to the range (its customdata)."""
    xs, text, colours, ranges = [], [], [], []
    for a in alerts:
        span = alert_range(a)
        if span is None:
            continue
        start, end = span
        colour = SEVERITY_COLOURS.get(a["severity"], "#888")
        layout["shapes"].append(
            {
                "type": "rect",
                "xref": "x",
                "yref": "paper",
                "x0": start,
                "x1": max(end, start),
                "y0": 0,
                "y1": 1,
                "fillcolor": colour,
                "opacity": 0.13,
                "line": {"width": 0},
                "layer": "below",
            }
        )
        first = a.get("first_detection") or {}
        at = first_step(a)
        xs.append(at)
        colours.append(colour)
        ranges.append([start, end, a["id"]])
        said = first.get("message") or a["message"]
        peak = (
            f"<br>peak at step {a['peak_step']}: {esc(a['message'])}"
            if a["peak_step"] is not None and (a["peak_step"] != at or said != a["message"])
            else ""
        )
        text.append(
            f"{esc(a['severity'])} · {esc(a['detector'])} ({esc(a['status'])})<br>"
            f"first detected at step {at}: {esc(said)}{peak}<br>steps {start}–{end} (click to zoom)"
        )
    if xs:
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=[ALERT_Y] * len(xs),
                yaxis="y2",
                mode="markers",
                name="alerts",
                cliponaxis=False,
                marker={"symbol": "triangle-down", "size": 13, "color": colours, "line": {"width": 1, "color": "#000"}},
                text=text,
                customdata=ranges,
                hoverinfo="text",
                meta={"alerts": True},
            )
        )


def heatmap(
    title: str, rows: list[tuple[str, list[int], list[float]]], n_bins: int = 200, events: Iterable[dict] = ()
) -> go.Figure | None:
    """Series on a common step grid (max |value| per bin), log10 colour; non-finite cells marked."""
    steps = [s for _, ss, _ in rows for s in ss]
    if not steps:
        return None
    lo, hi = min(steps), max(steps)
    n = max(1, min(n_bins, hi - lo + 1))
    width = (hi - lo + 1) / n
    xs = [lo + (i + 0.5) * width - 0.5 for i in range(n)]
    z: list[list[float | None]] = []
    raw: list[list[str]] = []
    bad_x, bad_y, bad_text = [], [], []
    for name, ss, vs in rows:
        cells: list[float | None] = [None] * n
        bad: list[float | None] = [None] * n
        for s, v in zip(ss, vs):
            i = min(n - 1, int((s - lo) / width))
            if v - v != 0.0:
                if bad[i] is None:
                    bad[i] = v
                    bad_x.append(xs[i])
                    bad_y.append(esc(name))
                    bad_text.append(f"{esc(name)}: {fmt(v)} at step {s}")
            elif cells[i] is None or abs(v) > cells[i]:
                cells[i] = abs(v)
        z.append([math.log10(c) if c is not None and c > 0 else None for c in cells])
        raw.append(["" if c is None else fmt(c) for c in cells])
    fig = go.Figure(
        go.Heatmap(
            x=xs,
            y=[esc(r[0]) for r in rows],
            z=z,
            customdata=raw,
            colorscale="Viridis",
            hoverongaps=False,
            colorbar={"title": {"text": "log10"}, "thickness": 12},
            hovertemplate="%{y}<br>step %{x:.0f}: %{customdata}<extra></extra>",
        )
    )
    if bad_x:
        fig.add_trace(
            go.Scatter(
                x=bad_x,
                y=bad_y,
                mode="markers",
                name="NaN/inf",
                text=bad_text,
                hoverinfo="text",
                marker={"symbol": "x", "size": 10, "color": NONFINITE_COLOUR},
                meta={"nonfinite": "heatmap"},
            )
        )
    layout = base_layout(title)
    layout["height"] = max(PLOT_HEIGHT, 60 + 22 * len(rows))
    layout["yaxis"] = {"automargin": True, "type": "category"}
    layout["showlegend"] = False
    add_events(layout, events)
    fig.update_layout(layout)
    return fig
