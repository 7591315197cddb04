"""Runs and projects through the real HTTP API, on both databases."""

from __future__ import annotations

import pytest


def test_create_is_idempotent_and_resumes(client):
    r = client.put("/runs/run-1", json={"project": "vision", "name": "resnet", "config": {"lr": 0.1}, "tags": ["a"]})
    assert r.status_code == 201, r.text
    run = r.json()
    assert run["id"] == "run-1" and run["project"] == "vision" and run["status"] == "running"
    assert run["config"] == {"lr": 0.1} and run["tags"] == ["a"]
    assert run["created_at"].endswith(("+00:00", "Z")), run["created_at"]  # UTC on both databases
    assert client.patch("/runs/run-1", json={"status": "failed"}).json()["status"] == "failed"
    again = client.put("/runs/run-1", json={"project": "vision"})
    assert again.status_code == 200
    assert again.json()["status"] == "running"  # a restarted job resumes its run
    assert again.json()["name"] == "resnet" and again.json()["config"] == {"lr": 0.1}
    assert len(client.get("/runs", params={"project": "vision"}).json()) == 1


def test_run_in_another_project_conflicts(client):
    assert client.put("/runs/x", json={"project": "a"}).status_code == 201
    r = client.put("/runs/x", json={"project": "b"})
    assert r.status_code == 409 and "belongs to project 'a'" in r.json()["detail"]


def test_list_filters(client):
    client.put("/runs/r1", json={"project": "p1", "name": "alpha", "tags": ["big"]})
    client.put("/runs/r2", json={"project": "p1", "name": "beta"})
    client.put("/runs/r3", json={"project": "p2", "name": "alphabet"})
    client.patch("/runs/r2", json={"status": "finished"})
    ids = lambda **p: sorted(r["id"] for r in client.get("/runs", params=p).json())  # noqa: E731
    assert ids(project="p1") == ["r1", "r2"]
    assert ids(status="finished") == ["r2"]
    assert ids(q="ALPHA") == ["r1", "r3"]
    assert ids(tag="big") == ["r1"]
    assert ids(project="p1", limit=1, offset=1) != ids(project="p1", limit=1)
    projects = {p["name"]: p["runs"] for p in client.get("/projects").json()}
    assert projects == {"p1": 2, "p2": 1}


def test_run_errors_are_clear_4xx(client):
    assert client.get("/runs/missing").status_code == 404
    assert client.patch("/runs/missing", json={"status": "finished"}).status_code == 404
    client.put("/runs/r", json={})
    bad = [
        client.patch("/runs/r", json={"status": "exploded"}),
        client.put("/runs/r", json={"project": ""}),
        client.put("/runs/r", json={"project": "x" * 201}),
        client.put("/runs/r", json={"config": [1, 2]}),
        client.put("/runs/r", json={"unknown": 1}),
        client.put("/runs/r", content=b"{not json", headers={"content-type": "application/json"}),
        client.get("/runs", params={"limit": 0}),
    ]
    for r in bad:
        assert r.status_code == 422, (r.request.url, r.text)
        assert r.json()["detail"]


def test_openapi_schema_is_served(live_server):
    import httpx

    schema = httpx.get(live_server.url + "/openapi.json").json()
    for path in [
        "/api/v1/runs/{run_id}",
        "/api/v1/runs/{run_id}/points",
        "/api/v1/runs/{run_id}/series/{name}",
        "/api/v1/runs/{run_id}/events",
    ]:
        assert path in schema["paths"], path
    body = schema["paths"]["/api/v1/runs/{run_id}/points"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert "series" in body["properties"]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_pages_load_everything_from_the_server_itself(live_server, page):
    """Issue 16, finding 8: /docs loaded its scripts from a CDN, so it was blank offline."""
    import re

    import httpx

    html = httpx.get(live_server.url + page).text
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html) + re.findall(
        r"""url:\s*["']([^"']+)["']""", html
    )
    assert re.search(r"https?://|//[a-z0-9.-]+\.[a-z]", html, re.I) is None, html  # no other host named anywhere
    scripts = [u for u in refs if u.endswith(".js")]
    assert scripts, html
    for url in refs:
        assert url.startswith("/"), url
        r = httpx.get(live_server.url + url)
        assert r.status_code == 200, url
        if url.endswith(".js"):
            assert len(r.content) > 100_000 and "javascript" in r.headers["content-type"], url


def test_q_matches_percent_underscore_and_backslash_literally(client):
    """Issue 16, finding 8: ``q`` went into LIKE unescaped, so ``%`` and ``_`` were wildcards."""
    for rid, name in (
        ("w1", "100% done"),
        ("w2", "1000 steps"),
        ("w3", "a_b"),
        ("w4", "axb"),
        ("w5", "back\\slash"),
        ("w6", "plain"),
    ):
        assert client.put(f"/runs/{rid}", json={"project": "w", "name": name}).status_code == 201
    ids = lambda q: sorted(r["id"] for r in client.get("/runs", params={"q": q}).json())  # noqa: E731
    assert ids("%") == ["w1"]
    assert ids("0%") == ["w1"]
    assert ids("_") == ["w3"]
    assert ids("a_B") == ["w3"]
    assert ids("\\") == ["w5"]
    assert ids("K\\S") == ["w5"]
    assert ids("W") == ["w1", "w2", "w3", "w4", "w5", "w6"]  # ids match too, in any case


def test_list_pages_in_sql_and_filters_tags_before_paging(client, live_server):
    """Issue 16, finding 8: every run was read and the page cut in Python, whatever the limit."""
    from sqlalchemy import event

    for i in range(12):
        tags = ["even"] if i % 2 == 0 else ["odd", "x"]
        client.put(f"/runs/t{i:02d}", json={"project": "tp", "tags": tags}).raise_for_status()
    everything = [r["id"] for r in client.get("/runs", params={"project": "tp", "limit": 1000}).json()]
    even = [r for r in everything if int(r[1:]) % 2 == 0]
    statements = []

    def seen(conn, cursor, statement, *args):
        if "FROM runs" in statement:
            statements.append(statement)

    engine = live_server.app.state.engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        page = [
            r["id"]
            for r in client.get("/runs", params={"project": "tp", "tag": "even", "limit": 2, "offset": 2}).json()
        ]
        odd_x = [r["id"] for r in client.get("/runs", params={"tag": "x", "limit": 100}).json()]
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert page == even[2:4]
    assert sorted(odd_x) == [f"t{i:02d}" for i in range(1, 12, 2)]
    assert client.get("/runs", params={"tag": "ev"}).json() == []  # a whole tag, not a substring
    assert statements and all("LIMIT" in s.upper() and "OFFSET" in s.upper() for s in statements), statements
