"""Every route, every kind of token, authentication on, both databases.

The table below is written from the scope definitions, not read from the server's own rules:
ingest = create/resume runs and send points and events in its project; read = GET in its
project; admin = everything. It must name every route the app has (the test fails on a new
route nobody classified) and every path of the OpenAPI schema.
"""

from __future__ import annotations

import httpx
import pytest
from _auth_helpers import ADMIN, auth_settings, make_token  # noqa: F401 - fixture
from starlette.routing import Mount

from stethoscope_server.settings import Settings

#: Routes anyone may call (static files are checked by prefix below).
PUBLIC = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
    ("GET", "/login"),
    ("POST", "/login"),
    ("POST", "/logout"),
}

POINTS = {"series": [{"name": "loss", "steps": [10], "values": [0.5]}]}


def table(ids: dict) -> list[tuple]:
    """(method, route, url, body, scope, bound to project P, page) for the fixture's objects."""
    a, hook, victim_hook, victim_token = ids["alert"], ids["webhook"], ids["victim_webhook"], ids["victim_token"]
    api = "/api/v1"
    return [
        ("GET", f"{api}/projects", f"{api}/projects", None, "read", False, False),
        ("GET", f"{api}/runs", f"{api}/runs?project=P", None, "read", True, False),
        ("PUT", f"{api}/runs/{{run_id}}", f"{api}/runs/rp", {"project": "P"}, "ingest", True, False),
        ("PATCH", f"{api}/runs/{{run_id}}", f"{api}/runs/rp", {"status": "running"}, "ingest", True, False),
        ("GET", f"{api}/runs/{{run_id}}", f"{api}/runs/rp", None, "read", True, False),
        ("POST", f"{api}/runs/{{run_id}}/points", f"{api}/runs/rp/points", POINTS, "ingest", True, False),
        ("GET", f"{api}/runs/{{run_id}}/series", f"{api}/runs/rp/series", None, "read", True, False),
        ("GET", f"{api}/runs/{{run_id}}/series/{{name:path}}", f"{api}/runs/rp/series/loss", None, "read", True, False),
        (
            "POST",
            f"{api}/runs/{{run_id}}/events",
            f"{api}/runs/rp/events",
            {"events": [{"key": "e1", "step": 1, "kind": "note"}]},
            "ingest",
            True,
            False,
        ),
        ("GET", f"{api}/runs/{{run_id}}/events", f"{api}/runs/rp/events", None, "read", True, False),
        ("GET", f"{api}/runs/{{run_id}}/continual", f"{api}/runs/rp/continual", None, "read", True, False),
        ("GET", f"{api}/runs/{{run_id}}/alerts", f"{api}/runs/rp/alerts", None, "read", True, False),
        ("GET", f"{api}/runs/{{run_id}}/incidents", f"{api}/runs/rp/incidents", None, "read", True, False),
        ("GET", f"{api}/projects/{{project}}/alerts", f"{api}/projects/P/alerts", None, "read", True, False),
        ("POST", f"{api}/alerts/{{alert_id}}/ack", f"{api}/alerts/{a}/ack", None, "admin", True, False),
        ("GET", f"{api}/projects/{{project}}/detectors", f"{api}/projects/P/detectors", None, "read", True, False),
        (
            "PUT",
            f"{api}/projects/{{project}}/detectors",
            f"{api}/projects/P/detectors",
            {"loss_spike": {"threshold": 8.0}},
            "admin",
            True,
            False,
        ),
        ("GET", f"{api}/projects/{{project}}/webhooks", f"{api}/projects/P/webhooks", None, "admin", True, False),
        (
            "POST",
            f"{api}/projects/{{project}}/webhooks",
            f"{api}/projects/P/webhooks",
            {"url": "http://127.0.0.1:9/hook"},
            "admin",
            True,
            False,
        ),
        ("DELETE", f"{api}/webhooks/{{webhook_id}}", f"{api}/webhooks/{victim_hook}", None, "admin", True, False),
        ("PATCH", f"{api}/webhooks/{{webhook_id}}", f"{api}/webhooks/{hook}", {"enabled": True}, "admin", True, False),
        ("POST", f"{api}/webhooks/{{webhook_id}}/test", f"{api}/webhooks/{hook}/test", None, "admin", True, False),
        (
            "GET",
            f"{api}/webhooks/{{webhook_id}}/deliveries",
            f"{api}/webhooks/{hook}/deliveries",
            None,
            "admin",
            True,
            False,
        ),
        (
            "POST",
            f"{api}/tokens",
            f"{api}/tokens",
            {"name": "made", "project": "P", "scopes": ["read"]},
            "admin",
            True,
            False,
        ),
        ("GET", f"{api}/tokens", f"{api}/tokens?project=P", None, "admin", True, False),
        ("DELETE", f"{api}/tokens/{{token_id}}", f"{api}/tokens/{victim_token}", None, "admin", True, False),
        ("GET", "/metrics", "/metrics", None, "read", False, False),
        ("GET", "/", "/?project=P", None, "read", True, True),
        ("GET", "/runs/{run_id}", "/runs/rp", None, "read", True, True),
        ("GET", "/alerts", "/alerts?project=P", None, "read", True, True),
        ("GET", "/compare", "/compare?run=rp", None, "read", True, True),
        ("GET", "/projects/{project}/settings", "/projects/P/settings", None, "read", True, True),
        ("GET", "/ui/api/runs/{run_id}/panels", "/ui/api/runs/rp/panels", None, "read", True, False),
        ("GET", "/ui/api/runs/{run_id}/state", "/ui/api/runs/rp/state", None, "read", True, False),
        ("GET", "/ui/api/compare", "/ui/api/compare?metric=loss&run=rp", None, "read", True, False),
        ("GET", "/settings", "/settings?project=P", None, "read", True, True),
        ("GET", "/ui/api/live/runs/{run_id}", "/ui/api/live/runs/rp", None, "read", True, False),
        ("GET", "/ui/api/live/overview", "/ui/api/live/overview?project=P", None, "read", True, False),
        ("GET", "/ui/api/live/alerts", "/ui/api/live/alerts?project=P", None, "read", True, False),
    ]


def app_routes(app) -> set[tuple[str, str]]:
    """(method, path) of every route, static files aside."""
    flat = []
    for r in app.routes:
        if hasattr(r, "effective_route_contexts"):  # FastAPI >= 0.16x keeps included routers whole
            flat += [(c.path, c.original_route) for c in r.effective_route_contexts()]
        else:
            flat.append((r.path, r))
    out = set()
    for path, r in flat:
        if isinstance(r, Mount):
            assert path.startswith("/static/"), f"a mount outside /static/: {path}"
            continue
        if path.startswith("/static/"):
            continue
        out |= {(m, path) for m in getattr(r, "methods", None) or () if m != "HEAD"}
    return out


@pytest.fixture
def settings(db_url):
    return auth_settings(db_url, rate_limit_per_s=0)


@pytest.fixture
def world(live_server):
    """Projects P and Q, a run in each, an alert and webhooks in P, and a token per role."""
    admin = httpx.Client(base_url=live_server.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    for run, project in (("rp", "P"), ("rq", "Q")):
        admin.put(f"/api/v1/runs/{run}", json={"project": project}).raise_for_status()
        admin.post(
            f"/api/v1/runs/{run}/points",
            json={"series": [{"name": "loss", "steps": [0, 1, 2], "values": [1.0, "NaN", 0.9]}]},
        ).raise_for_status()
    alerts = admin.get("/api/v1/runs/rp/alerts").raise_for_status().json()
    assert alerts, "the NaN opens a divergence alert"
    hook = (
        admin.post("/api/v1/projects/P/webhooks", json={"url": "http://127.0.0.1:9/hook"})
        .raise_for_status()
        .json()["id"]
    )
    victim_hook = (
        admin.post("/api/v1/projects/P/webhooks", json={"url": "http://127.0.0.1:9/other"})
        .raise_for_status()
        .json()["id"]
    )
    tokens = {None: None, "global-admin": ADMIN}
    for project in ("P", "Q"):
        for scope in ("ingest", "read", "admin"):
            tokens[f"{scope}-{project}"] = make_token(admin, project, [scope])
    victim = (
        admin.post("/api/v1/tokens", json={"name": "victim", "project": "P", "scopes": ["read"]})
        .raise_for_status()
        .json()["id"]
    )
    yield {"alert": alerts[0]["id"], "webhook": hook, "victim_webhook": victim_hook, "victim_token": victim}, tokens
    admin.close()


def test_every_route_is_public_or_in_the_table(live_server, world):
    ids, _ = world
    routes = app_routes(live_server.app)
    listed = {(m, path) for m, path, *_ in table(ids)}
    assert routes - PUBLIC - listed == set(), "routes nobody classified: add them to the table (and to access.RULES)"
    assert listed - routes == set(), "the table names routes the app does not have"
    schema = httpx.get(live_server.url + "/openapi.json").raise_for_status().json()
    for path, ops in schema["paths"].items():
        path = path.replace("{name}", "{name:path}")  # the schema drops the converter
        for method in ops:
            assert (method.upper(), path) in listed | PUBLIC, f"{method.upper()} {path}"


def test_each_scope_allows_exactly_its_routes(live_server, world):
    ids, tokens = world
    # Denied callers first: the allowed ones delete the victim webhook and token.
    order = [None, "ingest-P", "read-P", "ingest-Q", "read-Q", "admin-Q", "admin-P", "global-admin"]
    failures = []
    with httpx.Client(base_url=live_server.url, timeout=30, follow_redirects=False) as c:
        for method, route, url, body, scope, bound, page in table(ids):
            for who in order:
                headers = {"Authorization": f"Bearer {tokens[who]}"} if who else {}
                r = c.request(method, url, json=body, headers=headers)
                if who is None:
                    expected = "login" if page else 401
                else:
                    role, project = who.split("-")
                    has_scope = role in ("admin", "global") or role == scope
                    in_project = project in ("P", "admin") or not bound
                    expected = "allowed" if has_scope and in_project else 403
                    if has_scope and not in_project and "_id}" in route and method != "PUT":
                        # Named by its id, another project's thing is one that does not exist
                        # (ids are global). (The PUT's body names project P outright: 403.)
                        expected = 404
                    if has_scope and not in_project and route in ("/compare", "/ui/api/compare"):
                        # A comparison leaves another project's run out, as it leaves out a
                        # run that does not exist (test_auth_gate pins the two answers equal).
                        expected = "allowed"
                got = r.status_code
                ok = (
                    (expected == "allowed" and got not in (401, 403))
                    or got == expected
                    or (expected == "login" and got == 303 and r.headers["location"].startswith("/login?next="))
                )
                if not ok:
                    failures.append(f"{method} {url} as {who}: {got} (expected {expected}) {r.text[:160]}")
                elif got in (401, 403):
                    assert r.json()["detail"], "a refusal says why"
    assert failures == []


def test_public_routes_need_no_token(live_server):
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs", "/login", "/static/dashboard/dashboard.js"):
        r = httpx.get(live_server.url + path)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])


def test_loopback_default_is_off_and_elsewhere_on(db_url):
    # The tests, the demo and the benchmarks run on loopback without tokens; a server other
    # machines can reach asks for them unless told otherwise.
    assert not Settings(database_url=db_url).auth_enabled
    assert not Settings(database_url=db_url, host="::1").auth_enabled
    assert Settings(database_url=db_url, host="0.0.0.0").auth_enabled
    assert Settings(database_url=db_url, host="10.1.2.3").auth_enabled
    assert Settings(database_url=db_url, host="127.0.0.1", auth="on").auth_enabled
    assert not Settings(database_url=db_url, host="0.0.0.0", insecure=True).auth_enabled
    with pytest.raises(ValueError, match="without authentication"):
        Settings(database_url=db_url, host="0.0.0.0", auth="off").check_exposure()
    Settings(database_url=db_url, host="0.0.0.0", auth="off", insecure=True).check_exposure()
