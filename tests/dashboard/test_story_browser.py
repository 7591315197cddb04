"""Issue 14 in a real headless Chromium: the dashboard tells a run's story without clicks.

Log axes chosen from the data and the user's choice kept; every table and list updated live
through the page's one poll; alert rows with first detection, peak, evidence and what to do,
click-to-zoom; the runs list for triage (worst alert, config, tags, sorting, select and
compare); compare with several metrics, stable colours and smoothing; sharpness on its own
axis; an HTML 404 and a dark page for a dark-mode browser; settings that explain themselves,
and webhooks disabled and deleted from the page. No timing assertions: every wait is on a
condition.
"""

from __future__ import annotations

import math
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from _dash_browser import screenshot
from test_browser import add_alert, open_run, traces
from webhook_receiver import Receiver

from stethoscope_server.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]

WAIT_MS = 30_000
NAN_AT = 70


def diverging(c: httpx.Client, run_id: str, n: int = 80, project: str = "story", **run) -> None:
    """A loss going from 1 to 1e10 before its NaN (at NAN_AT): a flat line at 0 on a linear axis."""
    c.put(f"/api/v1/runs/{run_id}", json={"project": project, **run}).raise_for_status()
    steps = list(range(n))
    loss = [10 ** (10 * s / NAN_AT) if s < NAN_AT else "NaN" for s in steps]
    c.post(
        f"/api/v1/runs/{run_id}/points",
        json={
            "series": [
                {"name": "loss", "steps": steps, "values": loss},
                {"name": "grad/norm", "steps": steps, "values": [1.0 + (s % 3) / 10 for s in steps]},
            ]
        },
    ).raise_for_status()


def healthy(c: httpx.Client, run_id: str, lo: int, hi: int, project: str = "story", **run) -> None:
    if run or lo == 0:
        c.put(f"/api/v1/runs/{run_id}", json={"project": project, **run}).raise_for_status()
    steps = list(range(lo, hi))
    c.post(
        f"/api/v1/runs/{run_id}/points",
        json={
            "series": [
                {"name": "loss", "steps": steps, "values": [2.0 / (1 + s / 50) for s in steps]},
                {"name": "grad/norm", "steps": steps, "values": [1.0] * len(steps)},
            ]
        },
    ).raise_for_status()


def y_type(page, panel: str) -> str:
    return page.evaluate(f"() => document.getElementById('plot-{panel}')._fullLayout.yaxis.type")


def x_range(page, panel: str) -> list[int]:
    return page.evaluate(f"() => document.getElementById('plot-{panel}')._fullLayout.xaxis.range.map(Math.round)")


def rendered(page, n: int) -> None:
    page.wait_for_function(f"() => Number(document.getElementById('charts').dataset.rendered) >= {n}", timeout=WAIT_MS)


@pytest.fixture
def api(live_server):
    with httpx.Client(base_url=live_server.url, timeout=30) as c:
        yield c


def test_log_scale_is_chosen_from_the_data_and_the_users_choice_is_kept(live_server, api, browser, page):
    diverging(api, "div")
    open_run(page, live_server.url, "div")
    # 1 -> 1e10 before its NaN: a log axis, by itself; the flat gradient norm stays linear.
    assert y_type(page, "loss") == "log" and page.is_checked("#panel-loss input.logy")
    assert y_type(page, "grad") == "linear"
    # The NaN markers are still drawn (on their own overlay axis).
    bad = [t for t in traces(page, "loss") if t["meta"] and t["meta"].get("nonfinite")]
    assert bad and bad[0]["x"][0] == NAN_AT and bad[0]["yaxis"] == "y2"
    assert page.locator("#plot-loss .scatterlayer .trace path.point").count() >= 10
    screenshot(page, "log-scale", full_page=False)
    # The user's choice wins, and is kept: in the URL ...
    page.uncheck("#panel-loss input.logy")
    assert y_type(page, "loss") == "linear"
    assert parse_qs(urlparse(page.url).query)["y"] == ["loss:linear"]
    page.reload()
    page.wait_for_selector("#charts[data-rendered]", timeout=WAIT_MS)
    assert y_type(page, "loss") == "linear"
    # ... and in local storage, for a page opened without it.
    open_run(page, live_server.url, "div")
    assert y_type(page, "loss") == "linear" and not page.is_checked("#panel-loss input.logy")
    # A browser that never chose sees the data's choice; a URL's choice beats it.
    other = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        fresh = other.new_page()
        open_run(fresh, live_server.url, "div")
        assert y_type(fresh, "loss") == "log"
        fresh.goto(f"{live_server.url}/runs/div?y=loss:linear")
        fresh.wait_for_selector("#charts[data-rendered]", timeout=WAIT_MS)
        assert y_type(fresh, "loss") == "linear"
    finally:
        other.close()


def test_every_table_and_list_updates_live_through_one_poll(live_server, api, page):
    healthy(api, "live", 0, 30, name="healthy so far")
    open_run(page, live_server.url, "live")
    page.evaluate("() => { window.__sameDocument = true; }")
    assert page.inner_text("[data-region=alerts]").strip() == "No alerts for this run."
    calls: list[str] = []
    page.on("request", lambda r: calls.append(r.url) if "/api/" in r.url else None)
    # The run diverges while the page is open, and an event arrives.
    api.post(
        "/api/v1/runs/live/points",
        json={"series": [{"name": "loss", "steps": [30, 31, 32], "values": [1e3, 1e8, "NaN"]}]},
    ).raise_for_status()
    api.post(
        "/api/v1/runs/live/events", json={"events": [{"key": "ckpt", "step": 31, "kind": "note", "message": "saved"}]}
    ).raise_for_status()
    page.wait_for_selector("[data-region=alerts] tr.alert-row[data-detector=divergence]", timeout=WAIT_MS)
    page.wait_for_selector("[data-region=events] tr[data-step='31']", timeout=WAIT_MS)
    page.wait_for_function("() => document.getElementById('charts').dataset.lastStep === '32'", timeout=WAIT_MS)
    assert page.evaluate("() => window.__sameDocument") is True  # no reload
    # One poll for the page: the tables, the header and the charts' state come in one reply
    # (the charts then fetch their panels once); no request per table or panel.
    polls = [u for u in calls if "/panels" not in u]
    assert polls and all(urlparse(u).path == "/ui/api/live/runs/live" for u in polls), polls
    assert not any("/api/v1/" in u for u in calls)

    # The runs list: a new run and its worst alert appear without a reload.
    page.goto(live_server.url + "/")
    page.evaluate("() => { window.__sameDocument = true; }")
    calls.clear()
    diverging(api, "late", name="arrives later")
    page.wait_for_selector("tr[data-run-id=late] .worst-detector", timeout=WAIT_MS)
    assert page.inner_text("tr[data-run-id=late] .worst-detector") == "divergence"
    assert page.evaluate("() => window.__sameDocument") is True
    assert calls and all(urlparse(u).path == "/ui/api/live/overview" for u in calls), calls

    # The alerts page: a new alert appears in place.
    page.goto(live_server.url + "/alerts")
    page.evaluate("() => { window.__sameDocument = true; }")
    before = page.locator("tr.alert-row").count()
    diverging(api, "third")
    page.wait_for_selector("tr.alert-row a[href='/runs/third']", timeout=WAIT_MS)
    assert page.locator("tr.alert-row").count() > before
    assert page.evaluate("() => window.__sameDocument") is True


def test_alert_rows_explain_themselves_and_zoom_the_charts(live_server, api, page):
    diverging(api, "div")
    (alert,) = [a for a in api.get("/api/v1/runs/div/alerts").json() if a["detector"] == "divergence"]
    first = alert["first_detection"]["step"]
    open_run(page, live_server.url, "div")
    row = page.locator(f"tr[data-alert-id='{alert['id']}']")
    assert row.locator(".first-step").inner_text() == f"step {first}"
    assert row.locator(".peak-step").inner_text() == f"step {alert['peak_step']}"
    assert row.locator(".alert-msg").inner_text() == alert["message"]
    assert "learning rate" in row.locator(".todo").inner_text()  # what to do, per detector
    row.locator("details.evidence summary").click()
    keys = row.locator("dl.evidence dt").all_inner_texts()
    assert keys and set(keys) <= {str(k) for k in {**alert["evidence"], **alert["first_detection"]["evidence"]}}
    # The flag stands at the first detection; only the detected range is shaded.
    flags = [t for t in traces(page, "loss") if t["meta"] and t["meta"].get("alerts")][0]
    assert first in flags["x"] and alert["peak_step"] not in flags["x"]
    rects = page.evaluate(
        "() => document.getElementById('plot-loss').layout.shapes.filter(s => s.type === 'rect').map(s => [s.x0, s.x1])"
    )
    assert [alert["start_step"], max(alert["end_step"], alert["peak_step"])] in rects
    # The row's zoom button zooms every chart to the alert.
    lo, hi = (int(v) for v in row.get_attribute("data-zoom").split(","))
    row.locator("button.zoom").click()
    rendered(page, 2)
    assert x_range(page, "loss") == [lo, hi] and x_range(page, "grad") == [lo, hi]
    assert parse_qs(urlparse(page.url).query)["start"] == [str(lo)]
    # Reset, then a real click on the flag zooms too.
    page.evaluate("() => Plotly.relayout('plot-loss', {'xaxis.autorange': true})")
    rendered(page, 3)
    box, (start, end, _) = page.evaluate(
        """() => { const gd = document.getElementById('plot-loss');
                   const i = gd.data.findIndex(t => t.meta && t.meta.alerts);
                   const pt = gd.querySelectorAll('.scatterlayer .trace')[i].querySelector('path.point');
                   const r = pt.getBoundingClientRect();
                   return [[r.left + r.width / 2, r.top + r.height / 2], gd.data[i].customdata[0]]; }"""
    )
    page.mouse.click(*box)
    rendered(page, 4)
    pad = max(5, math.ceil((end - start) * 0.25))
    assert x_range(page, "loss") == [max(0, start - pad), end + pad]
    # From the alerts page, "show on chart" opens the run zoomed to the alert.
    page.goto(live_server.url + "/alerts")
    page.click(f"tr[data-alert-id='{alert['id']}'] a.zoom")
    page.wait_for_selector("#charts[data-rendered]", timeout=WAIT_MS)
    assert x_range(page, "loss") == [lo, hi]


def test_alerts_page_nests_consequences_under_their_root(live_server, api, page):
    healthy(api, "inc", 0, 50)
    root = add_alert(live_server.store, "inc", detector="divergence", status="open", start_step=40, peak_step=45)
    other = add_alert(live_server.store, "inc", detector="stalled", status="open", start_step=10, peak_step=10)
    child = add_alert(
        live_server.store, "inc", detector="loss_spike", status="open", start_step=38, peak_step=39, cause_alert_id=root
    )
    page.goto(live_server.url + "/alerts")
    ids = page.eval_on_selector_all("tr.alert-row", "rs => rs.map(r => Number(r.dataset.alertId))")
    # Newest first, and the consequence right under its root (though it is newer than both).
    assert ids == [other, root, child]
    assert page.get_attribute(f"tr[data-alert-id='{child}']", "class").split() == ["alert-row", "consequence"]
    assert f"consequence of #{root}" in page.inner_text(f"tr[data-alert-id='{child}']")
    screenshot(page, "alerts-incidents")


def test_unknown_run_is_an_html_page_and_a_dark_browser_gets_a_dark_page(live_server, api, browser):
    diverging(api, "div")
    ctx = browser.new_context(viewport={"width": 1400, "height": 900}, color_scheme="dark")
    try:
        pg = ctx.new_page()
        resp = pg.goto(live_server.url + "/runs/no-such-run")
        assert resp.status == 404 and resp.headers["content-type"].startswith("text/html")
        assert pg.inner_text("#not-found") == "Not found" and "no-such-run" in pg.inner_text("main")
        pg.goto(live_server.url + "/runs/div")
        pg.wait_for_selector("#charts[data-rendered]", timeout=WAIT_MS)
        bg = pg.evaluate("() => getComputedStyle(document.body).backgroundColor")
        assert bg == "rgb(17, 19, 24)", bg
        assert pg.evaluate("() => document.getElementById('plot-loss')._fullLayout.paper_bgcolor") == "#171a21"
        screenshot(pg, "run-dark", full_page=False)
    finally:
        ctx.close()
    light = browser.new_context(color_scheme="light")
    try:
        pg = light.new_page()
        pg.goto(live_server.url + "/")
        assert pg.evaluate("() => getComputedStyle(document.body).backgroundColor") == "rgb(246, 247, 249)"
    finally:
        light.close()


def test_runs_list_is_ready_for_triage_and_selected_runs_compare(live_server, api, page):
    diverging(api, "div", name="lr 3.0", tags=["sweep", "bad"], config={"lr": 3.0, "opt": "sgd"})
    healthy(api, "ok", 0, 80, name="lr 0.1", tags=["sweep"], config={"lr": 0.1, "opt": "sgd"})
    healthy(api, "base", 0, 40, name="baseline", tags=["baseline"], config={"lr": 0.01})
    worst = [a for a in api.get("/api/v1/runs/div/alerts").json() if a["status"] == "open"]
    page.goto(live_server.url + "/")
    div = page.locator("tr[data-run-id=div]")
    # The worst open alert's detector and message, beside the severity.
    assert div.locator(".worst-detector").inner_text() == "divergence"
    assert div.locator(".worst-msg").inner_text() in {a["message"] for a in worst}
    # Config columns (the keys most runs have) and tags.
    heads = page.eval_on_selector_all("#runs-table th.cfg", "ths => ths.map(t => t.textContent)")
    assert heads[:2] == ["lr", "opt"]
    assert div.locator("td.cfg").first.inner_text() == "3.0" and div.locator("a.tag").all_inner_texts() == [
        "sweep",
        "bad",
    ]
    # Sorting: by last step (largest first), then by name.
    order = lambda: page.eval_on_selector_all("#runs-table tbody tr", "rs => rs.map(r => r.dataset.runId)")  # noqa: E731
    page.click("#runs-table th:has-text('Last step')")
    assert order()[-1] == "base" and set(order()[:2]) == {"div", "ok"}  # 80 steps each, then 40
    page.click("#runs-table th:has-text('Run')")
    assert order() == ["base", "ok", "div"]  # by name: "baseline" < "lr 0.1" < "lr 3.0"
    page.click("#runs-table th:has-text('Run')")
    assert order() == ["div", "ok", "base"]
    screenshot(page, "runs-triage")
    # The tag filter.
    page.select_option("#tag-filter", "baseline")
    page.click("form.filters button[type=submit]")
    page.wait_for_load_state("load")
    assert order() == ["base"]
    # Select two runs, compare them: each keeps its colour from the runs list.
    page.goto(live_server.url + "/")
    swatch = {
        r: page.evaluate(
            f"() => getComputedStyle(document.querySelector('tr[data-run-id={r}] .swatch')).backgroundColor"
        )
        for r in ("div", "ok")
    }
    page.check("tr[data-run-id=div] input.pick-run")
    page.check("tr[data-run-id=ok] input.pick-run")
    page.click("#compare-selected")
    page.wait_for_selector("#charts[data-rendered]", timeout=WAIT_MS)
    assert parse_qs(urlparse(page.url).query)["run"] == ["div", "ok"]
    colours = page.evaluate(
        """() => { const gd = document.getElementById('plot-compare');
                   return gd._fullData.filter(t => !t.meta && t.mode === 'lines').map(t => t.line.color); }"""
    )
    want = [swatch["div"], swatch["ok"]]
    got = page.evaluate(
        "cs => cs.map(c => { const d = document.createElement('div'); d.style.color = c; document.body.append(d);"
        " const v = getComputedStyle(d).color; d.remove(); return v; })",
        colours,
    )
    assert got == want and len(set(got)) == 2


def test_compare_draws_several_metrics_with_smoothing_and_sharpness_has_its_own_axis(live_server, api, training, page):
    import _dash_training as T

    T.post(live_server.url, "tiny-1", training)
    healthy(api, "ok", 0, 80)
    page.goto(f"{live_server.url}/compare?metric=loss&metric=grad/norm&run=tiny-1&run=ok")
    page.wait_for_selector("#charts[data-rendered]", timeout=WAIT_MS)
    assert page.eval_on_selector_all(".panel", "els => els.map(e => e.dataset.panel)") == ["compare", "compare-1"]
    assert "grad/norm" in page.inner_text("#panel-compare-1")
    raw = traces(page, "compare")
    # Smoothing: an EMA line over each run's faint raw line, and kept for the next page.
    page.evaluate(
        "() => { const s = document.getElementById('smoothing'); s.value = '0.9';"
        " s.dispatchEvent(new Event('input')); }"
    )
    page.wait_for_function("() => document.getElementById('plot-compare').data.some(t => /\\(raw\\)$/.test(t.name))")
    ys = page.evaluate(
        """() => { const d = document.getElementById('plot-compare').data;
                   const raw = d.find(t => t.name.endsWith('(raw)')), sm = d[d.indexOf(raw) + 1];
                   return [Array.from(raw.y), Array.from(sm.y)]; }"""
    )
    finite = [(a, b) for a, b in zip(*ys) if a is not None and b is not None]
    assert finite[0][0] == pytest.approx(finite[0][1])  # debiased: starts at the first value
    assert any(abs(a - b) > 1e-6 for a, b in finite[1:])
    assert parse_qs(urlparse(page.url).query)["smooth"] == ["0.9"]
    assert len(page.evaluate("() => document.getElementById('plot-compare').data")) > len(raw)
    # Sharpness: lambda_max against 2/lr on the left axis, tr(H) on its own on the right.
    open_run(page, live_server.url, "tiny-1")
    by_name = {t["name"]: t["yaxis"] for t in traces(page, "hessian") if not t["meta"]}
    assert by_name["hessian/lambda_max"] == by_name["hessian/two_over_lr"] == "y"
    assert by_name["hessian/trace (right axis)"] == "y3"
    assert page.evaluate("() => document.getElementById('plot-hessian')._fullLayout.yaxis3.side") == "right"


@pytest.fixture
def settings(db_url):
    # The webhook added here points at a receiver on loopback: private targets allowed.
    return Settings(database_url=db_url, webhook_allow_private=True)


def test_settings_are_in_the_navigation_explain_each_parameter_and_manage_webhooks(live_server, api, page):
    healthy(api, "ok", 0, 10)
    receiver = Receiver()
    try:
        hook = api.post("/api/v1/projects/story/webhooks", json={"url": receiver.url}).raise_for_status().json()
        page.goto(live_server.url + "/")
        page.click("header nav a:has-text('Settings')")
        page.wait_for_url("**/projects/story/settings")
        row = page.locator(".detector[data-detector=loss_spike] .param-row[data-param=window]")
        assert "rolling window, in points" in row.inner_text() and "Default: 128." in row.inner_text()
        assert row.locator(".unit").inner_text() == " (points)"
        assert page.locator(".detector[data-detector=softmax_collapse] .todo").inner_text() != ""
        screenshot(page, "settings-explained")
        cells = page.locator(f"#webhooks tr[data-webhook-id='{hook['id']}']")
        assert cells.locator("td.enabled").inner_text() == "yes"
        cells.locator("button.toggle").click()
        page.wait_for_selector(f"#webhooks tr[data-webhook-id='{hook['id']}'] td.enabled:text('no')")
        assert api.get("/api/v1/projects/story/webhooks").json()[0]["enabled"] is False
        page.on("dialog", lambda d: d.accept())
        page.locator(f"#webhooks tr[data-webhook-id='{hook['id']}'] button.delete").click()
        page.wait_for_selector("#webhooks td:text('No webhooks yet.')")
        assert api.get("/api/v1/projects/story/webhooks").json() == []
    finally:
        receiver.close()
