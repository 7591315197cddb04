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
                "id": 1,
                "first_detection": {"step": 3, "message": "<b>first</b>"},
            }
        ],
    )
    assert "<script>" not in fig.data[0].text[0] and "&lt;script&gt;" in fig.data[0].text[0]
    assert "<b>" not in fig.data[0].text[0] and "&lt;b&gt;first" in fig.data[0].text[0]


def test_alerts_shade_their_detected_range_and_flag_their_first_detection():
    """Issue 14: the flag and its message sit where the detector first saw the episode (not its
    latest peak), and an open alert shades only what was detected (start..end), not the rest
    of the run; each flag carries its range for click-to-zoom."""
    fig = go.Figure()
    layout = F.base_layout("loss")
    alerts = [
        {
            "id": 7,
            "start_step": 10,
            "peak_step": 12,
            "end_step": 20,
            "status": "resolved",
            "severity": "warning",
            "detector": "d",
            "message": "peak message",
            "first_detection": {"step": 11, "message": "first message"},
        },
        {
            "id": 8,
            "start_step": 31,
            "peak_step": 242,
            "end_step": 250,
            "status": "open",
            "severity": "critical",
            "detector": "divergence",
            "message": "divergence at its peak",
            "first_detection": {"step": 31, "message": "loss 10x its minimum"},
        },
        {  # an alert from before first detections were kept: its start stands in
            "id": 9,
            "start_step": 400,
            "peak_step": 405,
            "end_step": None,
            "status": "open",
            "severity": "info",
            "detector": "d",
            "message": "m",
            "first_detection": None,
        },
    ]
    F.add_alerts(fig, layout, alerts)
    rects = [(s["x0"], s["x1"]) for s in layout["shapes"] if s["type"] == "rect"]
    assert rects == [(10, 20), (31, 250), (400, 405)]
    flags = fig.data[0]
    assert list(flags.x) == [11, 31, 400] and flags.meta == {"alerts": True}
    assert "first detected at step 31: loss 10x its minimum" in flags.text[1]
    assert "peak at step 242: divergence at its peak" in flags.text[1]
    assert [list(c) for c in flags.customdata] == [[10, 20, 7], [31, 250, 8], [400, 405, 9]]


def test_log_scale_is_chosen_when_positive_values_span_more_than_three_decades():
    assert F.spans_decades([3.0, 1.0, 6e-8])  # a loss falling from 3 to 6e-8
    assert F.spans_decades([1.0, 10.0, 1e10, NAN, INF, None])  # before its NaN; markers aside
    assert not F.spans_decades([1.0, 2.0, 900.0])  # under three decades
    assert not F.spans_decades([-1.0, 1e6, 1e-3])  # a value <= 0 cannot be drawn on log
    assert not F.spans_decades([0.0, 1e5])
    assert not F.spans_decades([NAN, NAN]) and not F.spans_decades([])


def test_run_colours_are_stable_and_apart_for_twenty_runs():
    ids = [f"run-{i}" for i in range(20)]
    assert [F.run_colour(i) for i in ids] == [F.run_colour(i) for i in ids]  # a stable hash, not hash()
    taken: set[str] = set()
    for rid in ids:
        taken.add(F.run_colour(rid, taken))
    assert len(taken) == 20 and len(F.RUN_PALETTE) >= 20
    assert F.run_colour("run-3", set()) == F.run_colour("run-3")  # nothing taken: its own slot


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
