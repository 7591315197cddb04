"""The dashboard in a real headless Chromium against a real server holding a real tiny
training's data: pages load without console errors, plots render, alert markers sit at the
alerts' steps, live updates arrive, user text is shown as text, a million points render."""

from __future__ import annotations

import json
import time

import _dash_training as T
import httpx
import pytest
from _dash_browser import ARTIFACTS, screenshot
from sqlalchemy import insert, select
from webhook_receiver import Receiver

from stethoscope_server.settings import Settings
from stethoscope_server.store import SeriesBatch
from stethoscope_server.store.models import Alert, Run

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]

EVIL = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned=2"><b>bold</b>'
RENDER_TIMEOUT_MS = 30_000


def add_alert(store, run_id: str, **kw) -> int:
    """An alert row as the detector runner writes it."""
    with store.writing() as conn:
        pid = conn.execute(select(Run.__table__.c.project_id).where(Run.__table__.c.id == run_id)).scalar_one()
        row = {
            "run_id": run_id,
            "project_id": pid,
            "detector": "loss_spike",
            "key": "loss",
            "severity": "warning",
            "status": "resolved",
            "message": "loss spike",
            "evidence": {},
            **kw,
        }
        return conn.execute(insert(Alert.__table__).values(**row).returning(Alert.__table__.c.id)).scalar_one()


def seed(live_server, training, training_b=None) -> dict:
    """Three runs: a finished one (the detectors find its task switch, its sharpness and its
    NaN), a running one, and one with HTML in its name and in an alert message."""
    T.post(
        live_server.url,
        "tiny-1",
        training,
        name="tiny MLP, two tasks",
        config={"lr": T.LR, "note": "<i>not italic</i>"},
    )
    T.post(live_server.url, "tiny-2", training_b or training, name="tiny MLP, still running", upto=200)
    T.post(live_server.url, "evil", training, name=EVIL, upto=120, config={"x": EVIL})
    return {
        "evil": add_alert(
            live_server.store,
            "evil",
            severity="info",
            status="open",
            start_step=50,
            peak_step=60,
            end_step=60,
            message=EVIL,
        )
    }


def run_alerts(live_server, run_id: str) -> list[dict]:
    return httpx.get(f"{live_server.url}/api/v1/runs/{run_id}/alerts").raise_for_status().json()


def open_run(page, url: str, run_id: str) -> None:
    page.goto(f"{url}/runs/{run_id}")
    page.wait_for_selector("#charts[data-rendered]", timeout=RENDER_TIMEOUT_MS)


def traces(page, panel: str) -> list[dict]:
    return page.evaluate(
        """id => document.getElementById('plot-' + id).data.map(t => ({name: t.name, type: t.type || 'scatter',
             x: Array.from(t.x || []), meta: t.meta || null, yaxis: t.yaxis || 'y'}))""",
        panel,
    )


def test_run_page_plots_alerts_and_nonfinite_markers(live_server, training, page):
    seed(live_server, training)
    alerts = run_alerts(live_server, "tiny-1")
    # The real detectors saw the real training: at least its NaN loss is an alert.
    assert any(a["detector"] == "divergence" and a["peak_step"] == T.NAN_STEP for a in alerts), alerts
    open_run(page, live_server.url, "tiny-1")
    panels = page.eval_on_selector_all(".panel", "els => els.map(e => e.dataset.panel)")
    assert panels == ["loss", "grad", "grad_modules", "logits", "collapse", "margin", "hessian", "continual", "lr"]
    # Every line panel drew its traces as SVG; the heatmap drew its image.
    for p in panels:
        n_svg = page.locator(f"#plot-{p} .scatterlayer .trace").count()
        if p == "grad_modules":
            assert page.locator(f"#plot-{p} .heatmaplayer image, #plot-{p} .hm image").count() >= 1
        else:
            assert n_svg >= 1, p
    # Loss panel: the alert flags sit at the alerts' peak steps, on screen where those steps are.
    loss = traces(page, "loss")
    flags = [t for t in loss if t["meta"] and t["meta"].get("alerts")]
    # Flags sit at each alert's first detection (issue 14), not at its latest peak.
    first = [(a["first_detection"] or {}).get("step", a["start_step"]) for a in alerts]
    assert len(flags) == 1 and sorted(flags[0]["x"]) == sorted(first)
    pixel = page.evaluate(
        """() => {
          const gd = document.getElementById('plot-loss');
          const xa = gd._fullLayout.xaxis, idx = gd.data.findIndex(t => t.meta && t.meta.alerts);
          const trace = gd.querySelectorAll('.scatterlayer .trace')[idx];
          const plotBox = gd.querySelector('.nsewdrag').getBoundingClientRect();
          return Array.from(trace.querySelectorAll('path.point')).map((pt, i) => {
            const r = pt.getBoundingClientRect();
            return {want: plotBox.left + xa.l2p(gd.data[idx].x[i]), got: r.left + r.width / 2};
          });
        }"""
    )
    assert len(pixel) == len(alerts)
    for p in pixel:
        assert abs(p["want"] - p["got"]) < 2, pixel
    # Shaded ranges: one rectangle per alert, spanning its detected steps only.
    rects = page.evaluate(
        "() => document.getElementById('plot-loss').layout.shapes.filter(s => s.type === 'rect').map(s => [s.x0, s.x1])"
    )
    assert sorted(rects) == sorted([a["start_step"], max(a["end_step"], a["peak_step"])] for a in alerts)
    # The NaN of step NAN_STEP is an explicit marker, in the loss and the gradient panels.
    for p in ("loss", "grad"):
        bad = [t for t in traces(page, p) if t["meta"] and t["meta"].get("nonfinite")]
        assert bad and T.NAN_STEP in bad[0]["x"], p
    assert page.locator("#plot-loss .scatterlayer .trace path.point").count() >= 3  # flags + NaN marker
    # Task switches are on the step axis of the continual panel; the 16.6-nat bound is drawn.
    cont = page.evaluate(
        "() => document.getElementById('plot-continual').layout.shapes.filter(s => s.type === 'line').map(s => s.x0)"
    )
    assert T.SWITCH_STEP in cont
    assert "16.6" in page.inner_text("#plot-margin")
    # Alerts listed under the charts.
    assert page.locator("tr.alert-row").count() == len(alerts)
    for a in alerts:
        assert page.locator(f"tr[data-alert-id='{a['id']}'] .alert-msg").inner_text() == a["message"]
    screenshot(page, "run")


def test_linked_zoom_refetches_detail_and_log_toggle(live_server, training, page):
    T.post(live_server.url, "tiny-1", training)
    open_run(page, live_server.url, "tiny-1")
    with page.expect_response(lambda r: "/panels?start=" in r.url) as resp:
        page.evaluate("() => Plotly.relayout('plot-loss', {'xaxis.range': [100, 180]})")
    assert "start=100" in resp.value.url and "end=180" in resp.value.url
    page.wait_for_function(
        "() => document.getElementById('charts').dataset.rendered === '2'", timeout=RENDER_TIMEOUT_MS
    )
    ranges = page.evaluate(
        "() => Array.from(document.querySelectorAll('.plot')).map(p => p._fullLayout.xaxis.range.map(Math.round))"
    )
    assert all(r == [100, 180] for r in ranges), ranges
    xs = traces(page, "loss")[0]["x"]
    assert min(xs) == 100 and max(xs) == 180
    page.check("#panel-loss input.logy")
    assert page.evaluate("() => document.getElementById('plot-loss')._fullLayout.yaxis.type") == "log"
    # Double-click resets every panel and fetches the whole run again.
    with page.expect_response(lambda r: r.url.endswith("/panels")):
        page.evaluate("() => Plotly.relayout('plot-grad', {'xaxis.autorange': true})")
    page.wait_for_function(
        "() => document.getElementById('charts').dataset.rendered === '3'", timeout=RENDER_TIMEOUT_MS
    )
    assert max(traces(page, "loss")[0]["x"]) == T.STEPS - 1
    # The log choice survives the re-fetch.
    assert page.evaluate("() => document.getElementById('plot-loss')._fullLayout.yaxis.type") == "log"


def test_live_update_arrives_without_reload(live_server, training, page):
    T.post(live_server.url, "live", training, upto=150)
    open_run(page, live_server.url, "live")
    page.evaluate("() => { window.__sameDocument = true; }")
    assert max(traces(page, "loss")[0]["x"]) == 149
    assert page.is_visible("[data-live-indicator]")
    with httpx.Client(base_url=live_server.url + "/api/v1") as c:
        T.send_points(c, "live", training, 150, 200)
        sent = time.monotonic()
        c.post("/runs/live/events", json={"events": [e for e in training.events if e["step"] == T.SWITCH_STEP]})
    page.wait_for_function("() => document.getElementById('charts').dataset.lastStep === '199'", timeout=10_000)
    latency = time.monotonic() - sent
    assert max(traces(page, "loss")[0]["x"]) == 199
    assert page.inner_text("[data-live-step]") == "199"
    assert page.evaluate("() => window.__sameDocument") is True  # no reload happened
    print(f"live update latency: {latency:.2f} s")
    assert latency < 10


def test_html_in_user_text_is_shown_as_text(live_server, training, page):
    seed(live_server, training)
    for path in ("/", "/runs/evil", "/alerts", "/compare?run=evil&run=tiny-1"):
        page.goto(live_server.url + path)
        page.wait_for_load_state("load")
        assert page.evaluate("() => window.__pwned") is None, path
        assert page.locator("main b, main img[src=x]").count() == 0, path
    page.goto(live_server.url + "/runs/evil")
    assert page.inner_text("#run-title") == EVIL
    assert json.dumps(EVIL) in page.inner_text("table.config")  # config values are shown as JSON
    assert page.locator("tr.alert-row .alert-msg").inner_text() == EVIL
    page.goto(live_server.url + "/")
    assert page.locator("tr[data-run-id='evil'] .run-name a").inner_text() == EVIL


def test_main_pages_render_without_console_errors(live_server, training, training_b, page):
    seed(live_server, training, training_b)
    page.goto(live_server.url + "/")
    assert page.locator("#runs-table tbody tr").count() == 3
    assert page.locator("svg.spark polyline").count() >= 3
    assert page.locator("tr[data-run-id='evil'] .sev-info").count() == 1  # worst open alert
    assert page.locator("tr[data-run-id='tiny-1'] .sev-ok").count() == 1  # its alerts are all resolved
    assert page.locator("tr[data-run-id='tiny-1'] .nonfinite").count() == 0
    screenshot(page, "runs")
    page.fill("#run-search", "still")
    page.click("form.filters button[type=submit]")
    page.wait_for_load_state("load")
    assert page.locator("#runs-table tbody tr").count() == 1
    alerts = httpx.get(f"{live_server.url}/api/v1/projects/tiny/alerts").json()
    page.goto(live_server.url + "/alerts?status=open")
    assert page.locator("tr.alert-row").count() == sum(a["status"] == "open" for a in alerts) >= 1
    page.goto(live_server.url + "/alerts")
    assert page.locator("tr.alert-row").count() == len(alerts) >= 4
    screenshot(page, "alerts")
    page.goto(live_server.url + "/compare?project=tiny&metric=loss&run=tiny-1&run=tiny-2")
    page.wait_for_selector("#charts[data-rendered]", timeout=RENDER_TIMEOUT_MS)
    names = [t["name"] for t in traces(page, "compare") if not t["meta"]]
    assert names == ["tiny MLP, two tasks (tiny-1)", "tiny MLP, still running (tiny-2)"]
    screenshot(page, "compare")


def test_a_million_points_render_fast(live_server, page):
    """1,000,000 points in one series: the page draws a downsampled view (timing printed, not asserted)."""
    n = 1_000_000
    store = live_server.store
    store.upsert_run("big", project="big", name="one million points")
    # The detectors are not what this test measures: switch them off for the project.
    off = {name: {"enabled": False} for name in httpx.get(f"{live_server.url}/api/v1/projects/big/detectors").json()}
    httpx.put(f"{live_server.url}/api/v1/projects/big/detectors", json=off).raise_for_status()
    chunk = 50_000
    t0 = time.monotonic()
    for lo in range(0, n, chunk):
        steps = list(range(lo, lo + chunk))
        values = [2.0 / (1 + s / 1e5) + (0.5 if s % 99_991 == 0 else 0.0) for s in steps]
        if lo == 500_000:
            values[7] = float("nan")
        store.ingest("big", [SeriesBatch("loss", steps, values, [0.0] * chunk)])
    ingest_s = time.monotonic() - t0
    timings = {}
    for attempt in ("cold", "warm"):  # cold: plotly.js not yet in the browser's cache
        t = time.monotonic()
        open_run(page, live_server.url, "big")
        timings[attempt] = time.monotonic() - t
        # In the browser's own clock: navigation start to the charts drawn, and plotly.js's share.
        timings[f"{attempt}_in_page"] = page.evaluate(
            """() => performance.getEntriesByName('stethoscope-charts-rendered')[0].startTime / 1000"""
        )
        timings[f"{attempt}_plotly_js"] = page.evaluate(
            """() => { const e = performance.getEntriesByType('resource').find(r => r.name.includes('/static/plotly-'));
                       return e ? e.responseEnd / 1000 : null; }"""
        )
    xs = traces(page, "loss")
    line = xs[0]["x"]
    assert 100 < len(line) <= 1500 and line[-1] == n - 1
    assert [t for t in xs if t["meta"] and t["meta"].get("nonfinite")][0]["x"] == [500_007]
    screenshot(page, "million", full_page=False)
    t = time.monotonic()
    with page.expect_response(lambda r: "/panels?start=" in r.url):
        page.evaluate("() => Plotly.relayout('plot-loss', {'xaxis.range': [500000, 501000]})")
    page.wait_for_function(
        "() => document.getElementById('charts').dataset.rendered === '2'", timeout=RENDER_TIMEOUT_MS
    )
    timings["zoom"] = time.monotonic() - t
    zoomed = traces(page, "loss")[0]["x"]
    assert len(zoomed) == 1001  # full detail: every step of 500000..501000 (the NaN is a gap plus its marker)
    result = {
        "points": n,
        "ingest_s": round(ingest_s, 2),
        **{f"render_{k}_s": v if v is None else round(v, 3) for k, v in timings.items()},
    }
    print("1M points:", json.dumps(result))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "million_points.json").write_text(json.dumps(result))


def test_acknowledge_from_the_alerts_page(live_server, training, page):
    if "/api/v1/alerts/{alert_id}/ack" not in live_server.app.openapi()["paths"]:
        pytest.skip("the alerts API (POST /api/v1/alerts/{id}/ack) is not in this server yet")
    alert_id = seed(live_server, training)["evil"]
    page.goto(live_server.url + "/alerts?status=open")
    page.click(f"button[data-ack='{alert_id}']")
    page.wait_for_selector(f"tr[data-alert-id='{alert_id}'] span.muted:text('acknowledged')")
    with live_server.store.reading() as conn:
        acked = conn.execute(select(Alert.__table__.c.acknowledged_at).where(Alert.__table__.c.id == alert_id)).scalar()
    assert acked is not None


@pytest.fixture
def settings(db_url):
    # The settings page's webhook test-sends to a receiver on loopback: private targets allowed.
    return Settings(database_url=db_url, webhook_allow_private=True)


def test_settings_page_saves_thresholds_and_test_sends_a_webhook(live_server, training, page):
    T.post(live_server.url, "tiny-1", training)
    receiver = Receiver()
    try:
        page.goto(live_server.url + "/projects/tiny/settings")
        page.wait_for_selector(".detector[data-detector='loss_spike'] input[name='threshold']")
        page.fill(".detector[data-detector='loss_spike'] input[name='threshold']", "8.5")
        page.click("#detectors-form button[type=submit]")
        page.wait_for_selector("#detectors-msg.ok")
        got = httpx.get(f"{live_server.url}/api/v1/projects/tiny/detectors").json()
        assert got["loss_spike"]["threshold"] == 8.5
        page.fill("#webhook-form input[name=url]", receiver.url)
        page.click("#webhook-form button[type=submit]")
        page.wait_for_selector("#webhooks button[data-webhook]")
        assert "Signing secret" in page.inner_text("#webhook-msg")
        page.click("#webhooks button[data-webhook]")
        page.wait_for_selector("#webhooks .msg.ok", timeout=15_000)
        assert page.inner_text("#webhooks .msg.ok").startswith("delivered (HTTP 200)")
        assert len(receiver.requests) == 1
        screenshot(page, "settings")
    finally:
        receiver.close()


def test_settings_page_shows_a_failed_test_send_as_a_status_class_only(live_server, page):
    """The receiver's reply (here a secret banner with a 500) never reaches the page."""
    receiver = Receiver(default_status=500, reply_body=b"SECRET-BANNER internal admin page")
    try:
        httpx.post(
            f"{live_server.url}/api/v1/projects/tiny/webhooks", json={"url": receiver.url}, timeout=30
        ).raise_for_status()
        page.goto(live_server.url + "/projects/tiny/settings")
        page.click("#webhooks button[data-webhook]")
        page.wait_for_selector("#webhooks .msg.err", timeout=15_000)
        assert page.inner_text("#webhooks .msg.err") == "failed (HTTP 500): HTTP 5xx"
        assert len(receiver.requests) == 1 and "SECRET-BANNER" not in page.content()
    finally:
        receiver.close()


def test_a_run_with_more_series_than_a_chart_draws_says_so_and_the_filter_picks_them(live_server, page):
    """Issue 16, finding 7: a chart draws at most MAX_SERIES_PER_PANEL series, says how many
    it left out, and the page's series filter brings the ones asked for to the front."""
    from stethoscope_dashboard._panels import MAX_SERIES_PER_PANEL as CAP

    n = CAP + 36
    steps = list(range(20))
    with httpx.Client(base_url=live_server.url + "/api/v1", timeout=30) as c:
        c.put("/runs/wide", json={"project": "p"}).raise_for_status()
        c.post(
            "/runs/wide/points",
            json={
                "series": [{"name": "loss", "steps": steps, "values": [1.0] * 20}]
                + [{"name": f"grad/norm/layers.{i:03d}", "steps": steps, "values": [0.5 + i] * 20} for i in range(n)]
            },
        ).raise_for_status()
    open_run(page, live_server.url, "wide")
    note = page.text_content("#panel-grad_modules .note")
    assert note.startswith("36 more series not shown"), note
    assert page.text_content("#panel-loss .note") == ""
    rows = lambda: page.evaluate("() => Array.from(document.getElementById('plot-grad_modules').data[0].y)")  # noqa: E731
    assert len(rows()) == CAP and f"layers.{n - 1:03d}" not in rows()
    page.fill("#series-filter input[name=match]", f"layers.{n - 1:03d}")
    with page.expect_response(lambda r: "/panels?match=" in r.url):
        page.click("#series-filter button")
    page.wait_for_function(
        "() => document.getElementById('charts').dataset.rendered === '2'", timeout=RENDER_TIMEOUT_MS
    )
    assert rows()[0] == f"layers.{n - 1:03d}" and len(rows()) == CAP
    assert "first" in page.text_content("#panel-grad_modules .note")
