"""Authentication on, both databases: tokens stored hashed, the admin bootstrap, revocation,
projects kept apart, 401/403 messages, the login cookie and cross-site requests, and the
limits (body size on every JSON route, series per run, requests per token)."""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest
import uvicorn
from _auth_helpers import ADMIN, auth_settings, make_token
from sqlalchemy import MetaData, create_engine, select

from stethoscope_server.auth import gate as security
from stethoscope_server.auth import tokens
from stethoscope_server.settings import Settings


@pytest.fixture
def extra() -> dict:
    """Settings of a test's own: ``@pytest.mark.parametrize("extra", [{...}], ids=[...])``."""
    return {}


@pytest.fixture
def settings(db_url, extra):
    return auth_settings(db_url, **{"rate_limit_per_s": 0, **extra})


@pytest.fixture
def admin(live_server):
    with httpx.Client(base_url=live_server.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as c:
        yield c


def client_for(live_server, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=live_server.url, headers=headers, timeout=30, follow_redirects=False)


def every_stored_value(db_url: str) -> list[str]:
    engine = create_engine(Settings(database_url=db_url).database_url)
    try:
        meta = MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            return [str(v) for t in meta.sorted_tables for row in conn.execute(select(t)) for v in row]
    finally:
        engine.dispose()


def test_tokens_are_stored_hashed(live_server, admin, db_url):
    made = admin.post("/api/v1/tokens", json={"name": "ci", "project": "P", "scopes": ["ingest", "read"]})
    assert made.status_code == 201, made.text
    token = made.json()["token"]
    assert token.startswith("stt_") and len(token) > 40
    with client_for(live_server, token) as c:
        assert c.put("/api/v1/runs/r1", json={"project": "P"}).status_code == 201
    stored = every_stored_value(db_url)
    assert not [v for v in stored if token in v or ADMIN in v], "a plaintext token is in the database"
    assert tokens.hash_token(token) in stored and tokens.hash_token(ADMIN) in stored
    listed = admin.get("/api/v1/tokens").json()
    assert {t["name"] for t in listed} == {"ci", tokens.ENV_ADMIN_NAME}
    assert token not in str(listed) and tokens.hash_token(token) not in str(listed)


def test_admin_bootstrap_prints_a_token_once(db_url, capfd):
    # No STETHOSCOPE_ADMIN_TOKEN: the first start makes an admin token and prints it; the
    # second start, on the same database, makes none.
    from stethoscope_server.app import create_app

    settings = Settings(database_url=db_url, auth="on", rate_limit_per_s=0)
    printed = []
    for _ in range(2):
        server = Started(create_app(settings))
        try:
            err = capfd.readouterr().err
            printed += re.findall(r"stt_[A-Za-z0-9_-]{43}", err)
            url = server.url
            if len(printed) == 1:
                assert httpx.get(url + "/api/v1/runs").status_code == 401
                with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {printed[0]}"}) as c:
                    reader = make_token(c, "P", ["read"])
                    assert c.get("/api/v1/tokens").status_code == 200
                assert httpx.get(url + "/api/v1/runs", headers={"Authorization": f"Bearer {reader}"}).status_code == 200
        finally:
            server.stop()
    assert len(printed) == 1, "the second start prints no token"


class Started:
    """A real uvicorn on a free loopback port, started and stopped by the test itself."""

    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def test_revoked_token_fails(live_server, admin):
    made = admin.post("/api/v1/tokens", json={"name": "leaked", "project": "P", "scopes": ["read"]}).json()
    with client_for(live_server, made["token"]) as c:
        assert c.get("/api/v1/runs").status_code == 200  # now cached by the worker
        assert admin.delete(f"/api/v1/tokens/{made['id']}").status_code == 204
        r = c.get("/api/v1/runs")
        assert r.status_code == 401 and "revoked" in r.json()["detail"]
    row = next(t for t in admin.get("/api/v1/tokens").json() if t["id"] == made["id"])
    assert row["revoked_at"] is not None
    assert admin.delete(f"/api/v1/tokens/{made['id']}").status_code == 204  # safe to repeat


def test_projects_are_kept_apart(live_server, admin):
    for run, project in (("rp", "P"), ("rq", "Q")):
        admin.put(f"/api/v1/runs/{run}", json={"project": project}).raise_for_status()
    reader = make_token(admin, "P", ["read"])
    writer = make_token(admin, "P", ["ingest"])
    with client_for(live_server, reader) as c:
        assert [r["id"] for r in c.get("/api/v1/runs").json()] == ["rp"]
        assert [p["name"] for p in c.get("/api/v1/projects").json()] == ["P"]
        r = c.get("/api/v1/runs/rq")  # another project's run is one that does not exist
        assert r.status_code == 404 and r.json()["detail"] == "run 'rq' does not exist"
        assert c.get("/api/v1/runs?project=Q").status_code == 403
        page = c.get("/")
        assert page.status_code == 200 and "/runs/rp" in page.text and "/runs/rq" not in page.text
        r = c.put("/api/v1/runs/rp2", json={"project": "P"})
        assert r.status_code == 403 and "needs 'ingest'" in r.json()["detail"]
    with client_for(live_server, writer) as c:
        # A run of another project can be neither made nor written to, nor moved.
        assert c.put("/api/v1/runs/new", json={"project": "Q"}).status_code == 403
        r = c.put("/api/v1/runs/rq", json={"project": "P"})
        assert r.status_code == 409 and "another project" in r.json()["detail"] and "'Q'" not in r.json()["detail"]
        assert c.post("/api/v1/runs/rq/points", json={"series": []}).status_code == 404
        assert c.put("/api/v1/runs/new", json={"project": "P"}).status_code == 201
        assert c.get("/api/v1/runs/new").status_code == 403  # ingest cannot read
    # A project's admin makes tokens for its project only.
    padmin = make_token(admin, "P", ["admin"])
    with client_for(live_server, padmin) as c:
        assert c.post("/api/v1/tokens", json={"name": "x", "project": "P", "scopes": ["read"]}).status_code == 201
        r = c.post("/api/v1/tokens", json={"name": "x", "project": "Q", "scopes": ["read"]})
        assert r.status_code == 403
        assert (
            r.json()["detail"]
            == "token 'P:admin' is limited to project 'P', so it makes tokens for that project only, "
            "not for project 'Q'"
        )
        r = c.post("/api/v1/tokens", json={"name": "x", "scopes": ["admin"]})
        assert r.status_code == 403
        assert r.json()["detail"] == (
            "token 'P:admin' is limited to project 'P', so the tokens it makes are for that project too: "
            "send \"project\": 'P' (a token for every project needs an admin token for every project)"
        )
        assert {t["project"] for t in c.get("/api/v1/tokens").json()} == {"P"}


def test_unauthenticated_requests_get_clear_401s(live_server):
    url = live_server.url + "/api/v1/runs"
    r = httpx.get(url)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in r.json()["detail"] and "STETHOSCOPE_TOKEN" in r.json()["detail"]
    r = httpx.get(url, headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert r.status_code == 401 and "Bearer <token>" in r.json()["detail"]
    r = httpx.get(url, headers={"Authorization": "Bearer stt_not-a-token"})
    assert r.status_code == 401 and "unknown or revoked" in r.json()["detail"]
    r = httpx.get(live_server.url + "/runs/x?a=1", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Fruns%2Fx%3Fa%3D1"


def test_login_cookie_and_cross_site_requests(live_server, admin):
    admin.put("/api/v1/runs/rp", json={"project": "P"}).raise_for_status()
    padmin = make_token(admin, "P", ["admin"])
    ingest_only = make_token(admin, "P", ["ingest"])
    origin = live_server.url
    with client_for(live_server, None) as c:
        r = c.post("/login", data={"token": "stt_wrong", "next": "/runs/rp"}, headers={"Origin": origin})
        assert r.status_code == 401 and "not valid" in r.text and "set-cookie" not in r.headers
        r = c.post("/login", data={"token": ingest_only}, headers={"Origin": origin})
        assert r.status_code == 403 and "read" in r.text
        r = c.post("/login", data={"token": padmin, "next": "/runs/rp"}, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403 and "set-cookie" not in r.headers  # login CSRF
        r = c.post("/login", data={"token": padmin, "next": "//evil.example/x"}, headers={"Origin": origin})
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"]
        assert (
            cookie.startswith(f"{security.COOKIE}=")
            and "HttpOnly" in cookie
            and "SameSite=strict" in cookie.replace("Strict", "strict")
        )
        assert c.cookies.get(security.COOKIE) == padmin
        assert c.get("/api/v1/runs").status_code == 200
        assert c.get("/runs/rp").status_code == 200
        body = {"loss_spike": {"threshold": 8.0}}
        # A state change riding on the cookie needs the dashboard's own Origin.
        r = c.put("/api/v1/projects/P/detectors", json=body)
        assert r.status_code == 403 and "cross-site" in r.json()["detail"]
        r = c.put("/api/v1/projects/P/detectors", json=body, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403
        assert c.put("/api/v1/projects/P/detectors", json=body, headers={"Origin": origin}).status_code == 200
        r = c.post("/logout", headers={"Origin": origin})
        assert r.status_code == 303 and security.COOKIE not in c.cookies
        assert c.get("/api/v1/runs").status_code == 401


@pytest.mark.parametrize("extra", [{"max_body_bytes": 4096}], ids=["4k"])
def test_every_json_route_has_a_body_limit(live_server, admin):
    big = {"project": "P", "config": {"x": "a" * 5000}}
    r = admin.put("/api/v1/runs/r1", json=big)
    assert r.status_code == 413 and "limit of 4096 bytes" in r.json()["detail"]
    r = admin.put("/api/v1/projects/P/detectors", json={"loss_spike": {"note": "a" * 5000}})
    assert r.status_code == 413

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"project": "P", "config": {"x": "'
        for _ in range(10):
            yield b"a" * 1000
        yield b'"}}'

    r = admin.put("/api/v1/runs/r1", content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert admin.put("/api/v1/runs/r1", json={"project": "P", "config": {"x": "small"}}).status_code == 201


@pytest.mark.parametrize("extra", [{"max_series_per_run": 5}], ids=["5"])
def test_series_per_run_limit(live_server, admin):
    admin.put("/api/v1/runs/r1", json={"project": "P"}).raise_for_status()

    def batch(names, step=0):
        return {"series": [{"name": n, "steps": [step], "values": [1.0]} for n in names]}

    r = admin.post("/api/v1/runs/r1/points", json=batch([f"s{i}" for i in range(6)]))
    assert r.status_code == 422
    assert "limit of 5 series per run" in r.json()["detail"] and "nothing of the batch was stored" in r.json()["detail"]
    assert admin.get("/api/v1/runs/r1/series").json() == []
    assert admin.post("/api/v1/runs/r1/points", json=batch([f"s{i}" for i in range(5)])).status_code == 200
    assert admin.post("/api/v1/runs/r1/points", json=batch(["s0", "s9"], step=1)).status_code == 422
    assert admin.post("/api/v1/runs/r1/points", json=batch(["s0", "s4"], step=1)).status_code == 200
    assert len(admin.get("/api/v1/runs/r1/series").json()) == 5


def test_webhook_secrets_are_shown_only_at_creation(live_server, admin):
    secret = "whsec-only-once-0123456789"
    made = admin.post("/api/v1/projects/P/webhooks", json={"url": "http://127.0.0.1:9/hook", "secret": secret})
    assert made.status_code == 201 and made.json()["secret"] == secret
    hook = made.json()["id"]
    admin.post(f"/api/v1/webhooks/{hook}/test").raise_for_status()
    for path in ("/api/v1/projects/P/webhooks", f"/api/v1/webhooks/{hook}/deliveries", "/projects/P/settings"):
        r = admin.get(path)
        assert r.status_code == 200 and secret not in r.text, path
    assert all("secret" not in h for h in admin.get("/api/v1/projects/P/webhooks").json())
    r = admin.post("/api/v1/projects/P/webhooks", json={"url": "file:///etc/passwd"})
    assert r.status_code == 422


@pytest.mark.parametrize("extra", [{"rate_limit_per_s": 0.2, "rate_limit_burst": 3}], ids=["slow"])
def test_rate_limit_per_token(live_server, admin):
    other = make_token(admin, None, ["read"])  # the admin's 1st request of its bucket of 3
    statuses = [admin.get("/api/v1/runs") for _ in range(6)]
    refused = [r for r in statuses if r.status_code == 429]
    assert refused, [r.status_code for r in statuses]
    r = refused[0]
    assert int(r.headers["retry-after"]) >= 1 and "rate limit of 0.2 requests/s (burst 3)" in r.json()["detail"]
    with client_for(live_server, other) as c:
        assert c.get("/api/v1/runs").status_code == 200  # a bucket per token
    assert live_server.app.state.gate.buckets.refused == len(refused)
