"""The dashboard with authentication on, in a real headless Chromium: a page sends the browser to
the login page, a bad token is refused, a good one lands on the page asked for, the cookie is
HttpOnly and SameSite=Strict, the dashboard's own buttons work through it, a form on another
site cannot use it, and logging out ends it."""

from __future__ import annotations

import httpx
import pytest

from stethoscope_server.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]

ADMIN = "stt_browser-test-admin-token-0123456789"
TIMEOUT_MS = 30_000


@pytest.fixture
def settings(db_url):
    return Settings(database_url=db_url, auth="on", admin_token=ADMIN, rate_limit_per_s=0)


@pytest.fixture
def seeded(live_server):
    """Run rp of project P with a NaN loss (so an open alert), and tokens of project P."""
    with httpx.Client(base_url=live_server.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as c:
        c.put("/api/v1/runs/rp", json={"project": "P", "name": "login test"}).raise_for_status()
        c.post(
            "/api/v1/runs/rp/points",
            json={"series": [{"name": "loss", "steps": [0, 1, 2, 3], "values": [2.0, 1.5, "NaN", 1.2]}]},
        ).raise_for_status()
        alert = c.get("/api/v1/runs/rp/alerts").raise_for_status().json()[0]["id"]

        def token(scopes):
            return (
                c.post("/api/v1/tokens", json={"name": "+".join(scopes), "project": "P", "scopes": scopes})
                .raise_for_status()
                .json()["token"]
            )

        yield {"alert": alert, "admin": token(["admin"]), "read": token(["read"]), "client": c}


def refusals_only(errors: list[str]) -> list[str]:
    # The browser logs a 401/403 reply to a form it sent as a console error; those are the
    # refusals this test provokes on purpose. Anything else fails the test.
    return [e for e in errors if "status of 401" not in e and "status of 403" not in e]


def log_in(page, token: str) -> None:
    page.fill("#login-form input[name=token]", token)
    page.click("#login-form button[type=submit]")


def test_login_cookie_and_cross_site_forms(live_server, seeded, browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    page = ctx.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    try:
        page.goto(f"{live_server.url}/alerts")
        assert page.url == f"{live_server.url}/login?next=%2Falerts"
        log_in(page, "stt_not-a-real-token")
        page.wait_for_selector("#login-error")
        assert "not valid" in page.text_content("#login-error")

        log_in(page, seeded["admin"])
        page.wait_for_selector(f"button[data-ack='{seeded['alert']}']", timeout=TIMEOUT_MS)
        assert page.url == f"{live_server.url}/alerts"
        cookie = next(c for c in ctx.cookies() if c["name"] == "stethoscope_token")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] == seeded["admin"]
        assert "stethoscope_token" not in page.evaluate("document.cookie"), "page scripts must not read the token"

        # A page of another site posts a form at the dashboard: the Strict cookie stays home,
        # so the forged acknowledgement is refused. (The page is served by the browser itself.)
        page.route(
            "http://attacker.test/",
            lambda route: route.fulfill(body="<html><body>hi</body></html>", content_type="text/html"),
        )
        page.goto("http://attacker.test/")
        with page.expect_navigation(url=f"{live_server.url}/api/v1/alerts/{seeded['alert']}/ack"):
            page.evaluate(
                """url => { const f = document.createElement('form'); f.method = 'POST'; f.action = url;
                            document.body.append(f); f.submit(); }""",
                f"{live_server.url}/api/v1/alerts/{seeded['alert']}/ack",
            )
        assert "authentication required" in page.text_content("body")
        alert = seeded["client"].get("/api/v1/runs/rp/alerts").json()[0]
        assert alert["acknowledged_at"] is None

        # The dashboard's own button goes through (same site, its own Origin).
        page.goto(f"{live_server.url}/alerts")
        page.click(f"button[data-ack='{seeded['alert']}']")
        page.wait_for_selector(
            f"tr[data-alert-id='{seeded['alert']}'] span.muted:text('acknowledged')", timeout=TIMEOUT_MS
        )
        assert seeded["client"].get("/api/v1/runs/rp/alerts").json()[0]["acknowledged_at"] is not None

        # A run page draws its charts with the JSON its scripts fetch through the cookie.
        page.goto(f"{live_server.url}/runs/rp")
        page.wait_for_selector("#charts[data-rendered]", timeout=TIMEOUT_MS)

        page.click("#logout")
        page.wait_for_url(f"{live_server.url}/login")
        assert not [c for c in ctx.cookies() if c["name"] == "stethoscope_token"]
        page.goto(f"{live_server.url}/runs/rp")
        assert page.url.startswith(f"{live_server.url}/login?next=")

        # A read token logs in too, and sees the page; acknowledging needs admin.
        log_in(page, seeded["read"])
        page.wait_for_selector("#charts[data-rendered]", timeout=TIMEOUT_MS)
        assert page.url == f"{live_server.url}/runs/rp"
    finally:
        ctx.close()
    assert refusals_only(errors) == [], errors
