"""Figure builders and the sparkline: non-finite values become explicit markers, user text is
escaped, alerts become shaded ranges and flags at their steps."""

from __future__ import annotations

import math

import plotly.graph_objects as go

from stethoscope_dashboard import _figures as F
from stethoscope_dashboard._pages import sparkline
from stethoscope_dashboard._panels import SC_MARGIN_BOUND, PanelSpec, _assign, run_panel_specs

NAN, INF = math.nan, math.inf


def test_non_finite_values_are_gaps_plus_markers_never_dropped():
    line, bad = F.line_traces("loss", [0, 1, 2, 3, 4], [1.0, NAN, INF, -INF, 0.5])
    assert list(line.x) == [0, 1, 2, 3, 4]
    assert list(line.y) == [1.0, None, None, None, 0.5]
    assert line.connectgaps is False
    assert list(bad.x) == [1, 2, 3] and bad.yaxis == "y2"
    assert list(bad.y) == [F.TOP, F.TOP, F.BOTTOM]
    assert list(bad.marker.symbol) == ["x", "triangle-up", "triangle-down"]
    assert [t.split(" at ")[0] for t in bad.text] == ["loss: NaN", "loss: +inf", "loss: -inf"]


def test_finite_series_has_no_marker_trace():
    assert len(F.line_traces("loss", [0, 1], [1.0, 2.0])) == 1


def test_user_text_is_escaped_in_names_and_hover():
    name = "<img src=x onerror=alert(1)>"
    line, bad = F.line_traces(name, [0, 1], [1.0, NAN])
    assert "<img" not in line.name and "&lt;img" in line.name
    assert "<img" not in bad.text[0]
    fig = go.Figure()
    layout = F.base_layout("t")
    F.add_alerts(
        fig,
        layout,
        [
            {
                "start_step": 3,
                "peak_step": 4,
                "end_step": 6,
                "status": "resolved",
                "severity": "warning",
                "detector": "loss_spike",
                "message": "<script>x</script>",
            }
        ],
        10,
    )
    assert "<script>" not in fig.data[0].text[0] and "&lt;script&gt;" in fig.data[0].text[0]


def test_alerts_are_shaded_ranges_and_flags_at_peak_steps():
    fig = go.Figure()
    layout = F.base_layout("loss")
    alerts = [
        {
            "start_step": 10,
            "peak_step": 12,
            "end_step": 20,
            "status": "resolved",
            "severity": "warning",
            "detector": "d",
            "message": "m",
        },
        {
            "start_step": 50,
            "peak_step": 55,
            "end_step": 60,
            "status": "open",
            "severity": "critical",
            "detector": "d",
            "message": "m",
        },
    ]
    F.add_alerts(fig, layout, alerts, last_step=90)
    rects = [(s["x0"], s["x1"]) for s in layout["shapes"] if s["type"] == "rect"]
    assert rects == [(10, 20), (50, 90)]  # an open alert runs to the last step
    assert list(fig.data[0].x) == [12, 55] and fig.data[0].meta == {"alerts": True}


def test_heatmap_bins_modules_and_marks_non_finite_cells():
    rows = [("fc1", [0, 1, 2, 3], [1.0, 10.0, 100.0, NAN]), ("fc2", [0, 1, 2, 3], [0.1, 0.1, INF, 0.1])]
    fig = F.heatmap("g", rows, n_bins=4)
    hm, bad = fig.data
    assert list(hm.y) == ["fc1", "fc2"]
    assert [list(r) for r in hm.z] == [[0.0, 1.0, 2.0, None], [-1.0, -1.0, None, -1.0]]
    assert sorted(zip(bad.x, bad.y)) == [(2.0, "fc2"), (3.0, "fc1")]


def test_panels_take_the_series_the_hook_sends():
    specs = run_panel_specs()
    names = [
        "loss",
        "lr",
        "grad/norm",
        "grad/norm/fc1",
        "logits/median_margin",
        "hessian/two_over_lr",
        "eval/acc/A",
        "continual/min_acc",
        "throughput",
    ]
    left = _assign(specs, names)
    by_id = {s.id: s.taken for s in specs}
    assert by_id["grad"] == ["grad/norm"] and by_id["grad_modules"] == ["grad/norm/fc1"]
    assert by_id["continual"] == ["eval/acc/A", "continual/min_acc"]
    assert left == ["throughput"]
    assert abs(SC_MARGIN_BOUND - 16.6355) < 1e-3  # -ln(2^-24)
    assert isinstance(specs[0], PanelSpec)


def test_sparkline_breaks_at_non_finite_points_and_marks_them():
    sp = sparkline([0, 1, 2, 3, 4], [4.0, 3.0, NAN, 2.0, 1.0])
    assert len(sp["segments"]) == 2 and len(sp["bad"]) == 1
    assert sparkline([], []) is None
    assert sparkline([0], [NAN])["bad"] == [1.0]
