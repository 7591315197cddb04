"""The pages and chart JSON over HTTP, on both databases: escaping, security headers, plotly.js
served by us (no CDN), panels per series, zoom ranges, NaN round trip to the figures."""

from __future__ import annotations

from pathlib import Path

import httpx
import plotly
import pytest

EVIL = '<script>alert("x")</script>'


@pytest.fixture
def web(live_server):
    with httpx.Client(base_url=live_server.url, timeout=30) as c:
        c.put(
            "/api/v1/runs/r1", json={"project": "p<1>", "name": EVIL, "config": {"note": EVIL}, "tags": [EVIL]}
        ).raise_for_status()
        steps = list(range(100))
        loss = [2.0 / (1 + s) for s in steps]
        loss[40], loss[41], loss[42] = "NaN", "Infinity", "-Infinity"
        c.post(
            "/api/v1/runs/r1/points",
            json={
                "series": [
                    {"name": "loss", "steps": steps, "values": loss},
                    {"name": "grad/norm/fc1", "steps": steps, "values": [1.0] * 100},
                    {"name": "logits/median_margin", "steps": steps, "values": [s / 10 for s in steps]},
                    {"name": "my/custom", "steps": steps, "values": [0.0] * 100},
                ]
            },
        ).raise_for_status()
        c.post(
            "/api/v1/runs/r1/events",
            json={"events": [{"key": "s", "step": 50, "kind": "task_switch", "message": EVIL, "info": {"task": EVIL}}]},
        )
        yield c


def test_pages_escape_user_text_and_send_a_strict_csp(web):
    for path in ("/", "/runs/r1", "/alerts", "/compare?run=r1", "/projects/p%3C1%3E/settings"):
        r = web.get(path)
        assert r.status_code == 200, path
        assert EVIL not in r.text and "<1>" not in r.text, path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    page = web.get("/runs/r1").text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    assert "<script>" not in page.replace('<script src="', "")  # no inline script at all


def test_plotly_js_is_served_by_us_not_a_cdn(web):
    page = web.get("/runs/r1").text
    url = "/static/plotly-cartesian-4.1.1.min.js"
    assert f'src="{url}"' in page and "cdn" not in page.lower()
    r = web.get(url)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert "immutable" in r.headers["cache-control"] and len(r.content) > 1_000_000
    # The partial bundle, a third of the full one, of the plotly.js the plotly package was built for.
    full = (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_bytes()
    assert len(r.content) < len(full) / 3 and b"plotly.js (cartesian - minified) v4.1.1" in r.content[:200]
    assert b"plotly.js v4.1.1" in full[:200]
    assert web.get("/static/dashboard/dashboard.js").status_code == 200


def test_run_panels_json_holds_each_series_and_its_non_finite_markers(web):
    data = web.get("/ui/api/runs/r1/panels").json()
    ids = [p["id"] for p in data["panels"]]
    assert ids == ["loss", "grad_modules", "margin", "other-my"]  # "other" series by family
    loss = data["panels"][0]["figure"]
    line = loss["data"][0]
    assert line["y"][40:43] == [None, None, None] and line["x"][40:43] == [40, 41, 42]
    bad = next(t for t in loss["data"] if (t.get("meta") or {}).get("nonfinite"))
    assert bad["x"] == [40, 41, 42]
    # The event is on the step axis, its text escaped.
    assert any(s.get("x0") == 50 for s in loss["layout"]["shapes"])
    ev = next(t for t in loss["data"] if t["name"] == "events")
    assert "<script>" not in ev["text"][0]
    margin = data["panels"][2]["figure"]["layout"]
    assert any(abs(s.get("y0", 0) - 16.6355) < 1e-3 for s in margin["shapes"])
    assert data["run"]["last_step"] == 99


def test_zoom_reads_only_the_range_at_full_detail(web):
    data = web.get("/ui/api/runs/r1/panels", params={"start": 10, "end": 30}).json()
    line = data["panels"][0]["figure"]["data"][0]
    assert line["x"] == list(range(10, 31))
    assert not any((t.get("meta") or {}).get("nonfinite") for t in data["panels"][0]["figure"]["data"])


def test_live_state_and_compare(web):
    st = web.get("/ui/api/runs/r1/state").json()
    assert st["last_step"] == 99 and st["status"] == "running" and st["events"] == 1
    web.post("/api/v1/runs/r1/points", json={"series": [{"name": "loss", "steps": [100], "values": [0.1]}]})
    assert web.get("/ui/api/runs/r1/state").json()["last_step"] == 100
    cmp = web.get("/ui/api/compare", params=[("metric", "loss"), ("run", "r1"), ("run", "missing")]).json()
    assert cmp["colours"] == {"r1": cmp["panels"][0]["figure"]["data"][0]["line"]["color"]}
    names = [t["name"] for t in cmp["panels"][0]["figure"]["data"]]
    assert (
        names[0] == "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; (r1)" and len(names) == 2
    )  # line + NaN/inf markers


def test_unknown_run_is_404(web):
    r = web.get("/runs/nope")
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
    assert "There is no run &#39;nope&#39;." in r.text and "script-src 'self'" in r.headers["content-security-policy"]
    assert web.get("/ui/api/runs/nope/panels").status_code == 404
    assert web.get("/ui/api/runs/nope/panels").headers["content-type"] == "application/json"


def test_overview_filters(web):
    web.put("/api/v1/runs/r2", json={"project": "other", "name": "second"})
    assert "second" in web.get("/").text
    assert "second" not in web.get("/", params={"project": "p<1>"}).text
    assert "second" in web.get("/", params={"q": "SEC"}).text
    assert "second" not in web.get("/", params={"status": "finished"}).text


def test_run_page_nests_consequences_under_their_root_with_first_detections(live_server):
    """The loss goes NaN while the Softmax Collapse fraction is high: the run's alert table
    lists the divergence, then the collapse under it ("consequence of #id"); each row shows its
    first detection beside its peak. The collapse is told once it has held 30 steps (a warning
    at 51), peaks critical at 64, and the NaN at 100 claims it (within the 50-step grace)."""
    import html
    import re

    with httpx.Client(base_url=live_server.url, timeout=30) as c:
        c.put("/api/v1/runs/inc", json={"project": "p"}).raise_for_status()
        steps = list(range(110))
        sc = [0.0 if s < 20 else 0.3 if s < 60 else 0.95 for s in steps]
        loss = [1.0 / (1 + s * 0.01) if s < 100 else "NaN" for s in steps]
        c.post(
            "/api/v1/runs/inc/points",
            json={
                "series": [
                    {"name": "loss", "steps": steps, "values": loss},
                    {"name": "grad/norm", "steps": steps, "values": [1.0] * 110},
                    {"name": "logits/sc_fraction", "steps": steps, "values": sc},
                ]
            },
        ).raise_for_status()
        (incident,) = c.get("/api/v1/runs/inc/incidents").json()
        page = c.get("/runs/inc").text
    (collapse,) = incident["consequences"]
    assert (incident["detector"], collapse["detector"]) == ("divergence", "softmax_collapse")
    assert collapse["first_detection"]["step"] == 51 and collapse["peak_step"] == 64
    rows = re.findall(r'<tr class="alert-row( consequence)?" data-alert-id="(\d+)"', page)
    assert rows == [("", str(incident["id"])), (" consequence", str(collapse["id"]))]
    row = page.split(f'data-alert-id="{collapse["id"]}"')[1].split("</tr>")[0]
    assert f"consequence of #{incident['id']}" in row
    first = collapse["first_detection"]
    assert f"step {first['step']}" in row and html.escape(first["message"]) in row
    assert html.escape(collapse["message"]) in row and f"step {collapse['peak_step']}" in row  # the peak
    assert "What to do" not in row and "logit penalty" in row  # the detector's one-line advice
    root = page.split(f'data-alert-id="{incident["id"]}"')[1].split("</tr>")[0]
    assert "consequence of" not in root and "step 100" in root and "same as the peak" in root
    assert '<details class="evidence">' in root


def test_continual_panel_shows_min_acc_and_wc_acc_computed_from_accuracies(live_server):
    """min-ACC and WC-ACC are not stored (computed on read): the panel still draws them."""
    with httpx.Client(base_url=live_server.url, timeout=30) as c:
        c.put("/api/v1/runs/cl", json={"project": "p"}).raise_for_status()
        steps = list(range(40))
        acc_a = [0.9] * 20 + [0.5, 0.6, 0.7, 0.8] + [0.9] * 16  # task A dips after the switch at 20
        acc_b = [0.0] * 20 + [0.2 + 0.03 * i for i in range(20)]
        c.post(
            "/api/v1/runs/cl/points",
            json={
                "series": [
                    {"name": "eval/acc/A", "steps": steps, "values": acc_a},
                    {"name": "eval/acc/B", "steps": steps[20:], "values": acc_b[20:]},
                ]
            },
        ).raise_for_status()
        c.post(
            "/api/v1/runs/cl/events",
            json={
                "events": [
                    {"key": "a", "step": 0, "kind": "task_switch", "info": {"task": "A"}},
                    {"key": "b", "step": 20, "kind": "task_switch", "info": {"task": "B"}},
                ]
            },
        ).raise_for_status()
        summary = c.get("/api/v1/runs/cl/continual").json()
        panel = next(p for p in c.get("/ui/api/runs/cl/panels").json()["panels"] if p["id"] == "continual")
    traces = {t["name"]: t for t in panel["figure"]["data"] if t.get("name")}
    assert {"task A", "task B", "continual/min_acc", "continual/wc_acc"} <= set(traces)
    want = summary["series"]["continual/min_acc"]
    assert traces["continual/min_acc"]["x"] == want["steps"] and min(want["values"]) == pytest.approx(0.5)


def _many_series_run(c, run_id: str, modules: int, others: int) -> None:
    c.put(f"/api/v1/runs/{run_id}", json={"project": "wide"}).raise_for_status()
    steps = list(range(10))
    series = [{"name": "loss", "steps": steps, "values": [1.0] * 10}]
    series += [{"name": f"grad/norm/layers.{i:04d}", "steps": steps, "values": [0.5] * 10} for i in range(modules)]
    series += [{"name": f"act/rms/layers.{i:04d}", "steps": steps, "values": [0.1] * 10} for i in range(others)]
    c.post(f"/api/v1/runs/{run_id}/points", json={"series": series}).raise_for_status()


def _drawn(panel: dict) -> list[str]:
    """The series a panel draws: heatmap rows, or named line traces (not the marker overlays)."""
    data = panel["figure"]["data"]
    if data and data[0]["type"] == "heatmap":
        return list(data[0]["y"])
    return [
        t["name"]
        for t in data
        if t.get("mode", "lines").startswith("lines") and not (t.get("meta") or {}).get("nonfinite")
    ]


def test_panels_of_a_run_with_thousands_of_series_are_bounded(live_server):
    """Issue 16, finding 7: every series of the run was read (one transaction and several
    statements each) and drawn, so a 9,000-series run took seconds of server CPU per request.
    Now each chart draws at most MAX_SERIES_PER_PANEL series, says how many it left out, and
    the statements per request do not grow with the run's series count."""
    import threading

    from sqlalchemy import event

    from stethoscope_dashboard._panels import MAX_SERIES_PER_PANEL as CAP

    statements = []

    def count(conn, cursor, statement, *args):
        # The request's own statements: not those of the background jobs (outbox, checks).
        if not threading.current_thread().name.startswith("stethoscope-"):
            statements.append(statement)

    engine = live_server.app.state.engine
    with httpx.Client(base_url=live_server.url, timeout=60) as c:
        _many_series_run(c, "wide", modules=3 * CAP, others=3 * CAP)
        _many_series_run(c, "wider", modules=12 * CAP, others=12 * CAP)
        event.listen(engine, "before_cursor_execute", count)
        try:
            per_run = {}
            for run_id in ("wide", "wider"):
                statements.clear()
                data = c.get(f"/ui/api/runs/{run_id}/panels").json()
                per_run[run_id] = (len(statements), data)
            statements.clear()
            picked = c.get("/ui/api/runs/wider/panels", params={"match": "LAYERS.0700"}).json()
        finally:
            event.remove(engine, "before_cursor_execute", count)
    n_wide, wide = per_run["wide"]
    n_wider, wider = per_run["wider"]
    assert n_wider == n_wide <= 40, (n_wide, n_wider)  # a constant, not one read per series
    panels = {p["id"]: p for p in wider["panels"]}
    assert set(panels) == {"loss", "grad_modules", "other-act"}
    assert wider["series"]["total"] == 1 + 24 * CAP and wider["series"]["hidden"] == 2 * (12 * CAP - CAP)
    for pid in ("grad_modules", "other-act"):
        p = panels[pid]
        assert len(_drawn(p)) == CAP and p["hidden"] == 12 * CAP - CAP
        assert p["note"].startswith(f"{12 * CAP - CAP} more series not shown")
        assert all(len(t.get("x") or []) <= 1500 for t in p["figure"]["data"])
    assert panels["loss"]["hidden"] == 0 and panels["loss"]["note"] == ""
    # The filter picks hidden series: they come first in their chart.
    picked_panels = {p["id"]: p for p in picked["panels"]}
    assert _drawn(picked_panels["grad_modules"])[0] == "layers.0700"
    assert _drawn(picked_panels["other-act"])[0] == "rms/layers.0700"  # the family's prefix is the title
    assert "LAYERS.0700" in picked_panels["other-act"]["note"]


@pytest.mark.parametrize(
    "path",
    [
        "/?project=a%00b",
        "/?q=a%00b",
        "/alerts?project=a%00b",
        "/compare?run=a%00b",
        "/compare?project=p&metric=lo%00ss",
        "/runs/a%00b",
        "/projects/a%00b/settings",
        "/ui/api/runs/a%00b/panels",
        "/ui/api/runs/r1/panels?match=a%00",
        "/ui/api/runs/a%00b/state",
        "/ui/api/compare?metric=loss&run=a%00b",
        "/ui/api/compare?metric=lo%00ss&run=r1",
        "/login?next=/a%00b",
    ],
)
def test_nul_in_a_dashboard_parameter_is_a_clear_422(web, path):
    """Issue 16, finding 8: PostgreSQL's text cannot hold NUL, and a NUL in a filter gave a 500
    there (SQLite answered 200). Both now refuse it before any query."""
    r = web.get(path, follow_redirects=False)
    assert r.status_code == 422, (path, r.status_code, r.text[:200])
    assert "NUL" in r.json()["detail"]


def test_nul_in_a_series_name_is_a_422(web):
    r = web.get("/api/v1/runs/r1/series/lo%00ss")
    assert r.status_code == 422, r.text
