"""The gate and the routes read a request the same way (issue 16), both databases.

Ids have one spelling, read by one function in the gate and the routes, so a project's admin
cannot reach another project's alert, webhook or token by writing its id as ``+1``; a JSON
body has one reader, so a byte order mark cannot make the gate see the default project; the
token is checked before a byte of the body is read and a slow body is cut; with
authentication off, a state change must be JSON and the Host a loopback name; failed tokens
are throttled per address; another project's run is answered like a missing one.
"""

from __future__ import annotations

import socket
from urllib.parse import quote

import httpx
import pytest
from _auth_helpers import ADMIN, make_token
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from stethoscope_server.settings import Settings


@pytest.fixture
def extra() -> dict:
    """Settings of a test's own: ``@pytest.mark.parametrize("extra", [{...}], ids=[...])``."""
    return {}


@pytest.fixture
def settings(db_url, extra):
    return Settings(
        database_url=db_url,
        **{"auth": "on", "admin_token": ADMIN, "rate_limit_per_s": 0, "webhook_allow_private": True, **extra},
    )


def client_for(live_server, token: str | None = None, headers: dict | None = None) -> httpx.Client:
    headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    return httpx.Client(base_url=live_server.url, headers=headers, timeout=30, follow_redirects=False)


@pytest.fixture
def world(live_server):
    """Project Q's alert, webhook and read token (the victims), and clients for P's admin and
    the global admin."""
    admin = client_for(live_server, ADMIN)
    admin.put("/api/v1/runs/rq", json={"project": "Q"}).raise_for_status()
    admin.post(
        "/api/v1/runs/rq/points", json={"series": [{"name": "loss", "steps": [0, 1], "values": [1.0, "NaN"]}]}
    ).raise_for_status()
    alert = admin.get("/api/v1/runs/rq/alerts").raise_for_status().json()[0]["id"]
    hook = (
        admin.post("/api/v1/projects/Q/webhooks", json={"url": "http://127.0.0.1:9/hook"})
        .raise_for_status()
        .json()["id"]
    )
    victim = (
        admin.post("/api/v1/tokens", json={"name": "victim", "project": "Q", "scopes": ["read"]})
        .raise_for_status()
        .json()
    )
    padmin = client_for(live_server, make_token(admin, "P", ["admin"]))
    yield {
        "alert": alert,
        "webhook": hook,
        "token": victim["id"],
        "victim": victim["token"],
        "admin": admin,
        "padmin": padmin,
    }
    admin.close()
    padmin.close()


def assert_untouched(live_server, w) -> None:
    admin = w["admin"]
    assert admin.get("/api/v1/runs/rq/alerts").json()[0]["acknowledged_at"] is None
    assert admin.get(f"/api/v1/webhooks/{w['webhook']}/deliveries").status_code == 200
    with client_for(live_server, w["victim"]) as c:
        assert c.get("/api/v1/runs/rq").status_code == 200, "the victim token was revoked"


#: (method, path with {id}, the id's kind): every route that names a thing by a numeric id.
ID_ROUTES = [
    ("POST", "/api/v1/alerts/{id}/ack", "alert"),
    ("GET", "/api/v1/webhooks/{id}/deliveries", "webhook"),
    ("POST", "/api/v1/webhooks/{id}/test", "webhook"),
    ("DELETE", "/api/v1/webhooks/{id}", "webhook"),
    ("DELETE", "/api/v1/tokens/{id}", "token"),
]


def test_non_canonical_ids_are_refused_by_gate_and_route_alike(live_server, world):
    # Issue 16, finding 1: "+1", "1.0" and "%201" were no id to the gate (no project checked)
    # and id 1 to the route: P's admin revoked Q's tokens and read Q's webhooks.
    w = world
    spellings = ["+{}", "{}.0", "%20{}", "0{}", "{}e0", "{}%0A", "{}_", "%2B{}"]
    for method, path, kind in ID_ROUTES:
        for spelled in spellings:
            url = path.replace("{id}", spelled.format(w[kind]))
            r = w["padmin"].request(method, url)
            assert r.status_code == 422, (method, url, r.status_code, r.text)
            assert "is not an id" in r.text
        full_width = "".join(chr(0xFF10 + int(c)) for c in str(w[kind]))
        r = w["padmin"].request(method, path.replace("{id}", quote(full_width)))
        assert r.status_code == 422, (method, full_width, r.text)
        # The global admin's request reaches the route, which reads the id the same way.
        if method == "GET":
            assert w["admin"].get(path.replace("{id}", f"+{w[kind]}")).status_code == 422
            assert w["admin"].get(path.replace("{id}", str(w[kind]))).status_code == 200
    assert_untouched(live_server, w)


@st.composite
def id_spellings(draw, n: int) -> tuple[str, str]:
    """(what the route sees, what goes on the wire) for some way of writing the id ``n``."""
    s = str(n)
    if draw(st.booleans()):
        s = draw(st.sampled_from(["+", "-", "0", "00", "+0"])) + s
    if draw(st.booleans()):
        s += draw(st.sampled_from([".0", ".", ".00", "e0", "E0", "e+0", "_0"]))
    if draw(st.booleans()):  # other scripts' digits: full-width, Arabic-Indic, Devanagari, math bold
        base = draw(st.sampled_from([0xFF10, 0x0660, 0x06F0, 0x0966, 0x1D7CE]))
        swap = draw(st.lists(st.booleans(), min_size=len(s), max_size=len(s)))
        s = "".join(chr(base + int(c)) if c.isdigit() and flip else c for c, flip in zip(s, swap))
    if draw(st.booleans()):
        space = st.sampled_from([" ", "\t", "\n", "\r", "\u00a0", "\u2003", "\x0b"])
        s = draw(space) + s if draw(st.booleans()) else s + draw(space)
    # On the wire, any character may be percent-encoded (digits too); unsafe ones must be.
    wire = "".join(
        quote(c, safe="") if c not in "0123456789+-._eE" or draw(st.booleans()) and c.isascii() else c for c in s
    )
    if draw(st.booleans()):
        wire = "".join(f"%{ord(c):02X}" if c.isdigit() and c.isascii() else c for c in wire)
    return s, wire


def test_any_spelling_of_an_id_gets_the_canonical_answer(live_server, world):
    """Property: for every way of writing the id of another project's alert, webhook or token,
    a project's admin gets no 2xx, and the answer the canonical spelling gets (a 404: to it
    that thing does not exist) or, for any other spelling, the same 422 the route gives."""
    w = world
    canonical = {}
    for method, path, kind in ID_ROUTES:
        r = w["padmin"].request(method, path.replace("{id}", str(w[kind])))
        assert r.status_code == 404, (method, path, r.text)
        canonical[(method, path)] = r.status_code

    @hypothesis_settings(
        max_examples=60,
        deadline=None,
        derandomize=False,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(route=st.sampled_from(ID_ROUTES), data=st.data())
    def check(route, data):
        method, path, kind = route
        seen, wire = data.draw(id_spellings(w[kind]))
        r = w["padmin"].request(method, path.replace("{id}", wire))
        assert not r.is_success, (method, path, seen, wire, r.text)
        expected = canonical[(method, path)] if seen == str(w[kind]) else 422
        assert r.status_code == expected, (method, path, seen, wire, r.status_code, r.text)

    check()
    assert_untouched(live_server, w)


BOM_BODIES = [
    ("bom", b'\xef\xbb\xbf{"project": "Q"}'),
    ("utf-16", '{"project": "Q"}'.encode("utf-16")),
    ("utf-16-le", '{"project": "Q"}'.encode("utf-16-le")),
    ("utf-32", '{"project": "Q"}'.encode("utf-32")),
]


def test_a_body_the_gate_cannot_read_is_refused_not_taken_for_the_default_project(live_server):
    # Issue 16, finding 3: a BOM or UTF-16 body was no JSON to the gate (so: project
    # "default") and a run in project Q to the route.
    admin = client_for(live_server, ADMIN)
    ingest = make_token(admin, "default", ["ingest"])
    padmin = make_token(admin, "P", ["admin"])
    json_type = {"Content-Type": "application/json"}
    with client_for(live_server, ingest) as c:
        for name, body in BOM_BODIES:
            r = c.put(f"/api/v1/runs/r-{name}", content=body, headers=json_type)
            assert r.status_code == 422, (name, r.text)
            assert r.json()["detail"][0]["type"] == "json_invalid"
        for body in (
            b'{"project": ["Q"]}',
            b'{"project": {"name": "Q"}}',
            b'{"project": 7}',
            b'{"project": null}',
            b'["Q"]',
            b'"Q"',
            b"",
            b'{"project": "Q"',
        ):
            r = c.put("/api/v1/runs/r-odd", content=body, headers=json_type)
            assert r.status_code == 422, (body, r.text)
        r = c.put("/api/v1/runs/r-plain", content=b'{"project": "Q"}', headers={"Content-Type": "text/plain"})
        assert r.status_code == 415, r.text
        assert c.put("/api/v1/runs/r-ok", json={}).status_code == 201  # no project: the default
    with client_for(live_server, padmin) as c:
        for name, body in BOM_BODIES:
            r = c.post("/api/v1/tokens", content=body.replace(b"project", b"project"), headers=json_type)
            assert r.status_code == 422, (name, r.text)
        r = c.post("/api/v1/tokens", json={"name": "x", "project": ["Q"], "scopes": ["read"]})
        assert r.status_code == 422, r.text
    assert [r["id"] for r in admin.get("/api/v1/runs").json()] == ["r-ok"]
    admin.close()


def _raw(live_server, head: str, body: bytes, token: str | None = None) -> tuple[int, bytes]:
    """Send the head and part of a body on a raw socket, send nothing more, and read the
    reply and then until the server closes the connection: (status, reply)."""
    port = int(live_server.url.rsplit(":", 1)[1])
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    request = f"{head}\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n{auth}\r\n".encode() + body
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        reply = b""
        while True:  # a server that waits for the rest of the body times this out: a failure
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    return int(reply.split(b" ", 2)[1]), reply


@pytest.mark.parametrize("extra", [{"body_timeout_s": 0.5}], ids=["short-deadline"])
def test_token_before_body_and_slow_bodies_cut(live_server):
    # Issue 16, finding 5: a chunked body without a token was read (16 MB, no time limit)
    # before the token was checked.
    admin = client_for(live_server, ADMIN)
    admin.put("/api/v1/runs/r", json={"project": "P"}).raise_for_status()
    part = b'{"series": ['
    first_chunk = b"%x\r\n%s\r\n" % (len(part), part)  # the first chunk of a body that never ends
    status, reply = _raw(live_server, "POST /api/v1/runs/r/points HTTP/1.1\r\nTransfer-Encoding: chunked", first_chunk)
    assert status == 401 and b"authentication required" in reply
    status, _ = _raw(
        live_server,
        "POST /api/v1/runs/r/points HTTP/1.1\r\nContent-Length: 1000",
        b'{"series": [',
        token="stt_not-a-token",
    )
    assert status == 401
    # Authenticated, but the body trickles: cut at the deadline, and the connection closed.
    for head, part in (
        ("POST /api/v1/runs/r/points HTTP/1.1\r\nContent-Length: 1000", b'{"series": ['),
        ("POST /api/v1/runs/r/points HTTP/1.1\r\nTransfer-Encoding: chunked", first_chunk),
        ("PUT /api/v1/runs/r2 HTTP/1.1\r\nContent-Length: 100", b'{"project"'),
    ):
        status, reply = _raw(live_server, head, part, token=ADMIN)
        assert status == 408 and b"STETHOSCOPE_BODY_TIMEOUT_S" in reply, reply
    assert admin.get("/api/v1/runs/r2").status_code == 404
    assert (
        admin.post(
            "/api/v1/runs/r/points", json={"series": [{"name": "loss", "steps": [1], "values": [1.0]}]}
        ).status_code
        == 200
    )
    admin.close()


@pytest.mark.parametrize("extra", [{"auth": "off"}], ids=["auth-off"])
def test_auth_off_takes_state_changes_only_as_json(live_server):
    # Issue 16, finding 6: with auth off any web page could write points (text/plain) and
    # acknowledge alerts: requests a browser sends cross-site without asking.
    with client_for(live_server) as c:
        c.put("/api/v1/runs/r", json={"project": "p"}).raise_for_status()
        c.post(
            "/api/v1/runs/r/points", json={"series": [{"name": "loss", "steps": [0, 1], "values": [1.0, "NaN"]}]}
        ).raise_for_status()
        alert = c.get("/api/v1/runs/r/alerts").json()[0]["id"]
        points = b'{"series": [{"name": "x", "steps": [5], "values": [1.0]}]}'
        for content_type in (
            "text/plain",
            "text/plain;charset=UTF-8",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            None,
        ):
            headers = {"Content-Type": content_type} if content_type else {}
            r = c.post("/api/v1/runs/r/points", content=points, headers=headers)
            assert r.status_code == 415 and "Content-Type: application/json" in r.json()["detail"], (
                content_type,
                r.text,
            )
            assert c.post(f"/api/v1/alerts/{alert}/ack", headers=headers).status_code == 415
            assert (
                c.request("PATCH", "/api/v1/runs/r", content=b'{"status": "failed"}', headers=headers).status_code
                == 415
            )
        assert c.get("/api/v1/runs/r/series").json()[0]["name"] == "loss"  # nothing of it stored
        assert c.get("/api/v1/runs/r/alerts").json()[0]["acknowledged_at"] is None
        assert c.get("/api/v1/runs/r").json()["status"] == "running"
        # What the hook and the dashboard send goes through.
        json_type = {"Content-Type": "application/json"}
        assert c.post(f"/api/v1/alerts/{alert}/ack", headers=json_type).status_code == 200
        assert (
            c.post(
                "/api/v1/runs/r/points", content=points, headers={"Content-Type": "application/json; charset=utf-8"}
            ).status_code
            == 200
        )
        # The body has one reader whatever the mode: a BOM is no JSON to the routes either.
        r = c.put("/api/v1/runs/r-bom", content=BOM_BODIES[0][1], headers=json_type)
        assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
        assert c.post("/api/v1/alerts/+1/ack", headers=json_type).status_code == 422


@pytest.mark.parametrize("extra", [{"auth": "off", "allowed_hosts": ["stethoscope.lab"]}], ids=["auth-off"])
def test_auth_off_answers_only_its_own_host_names(live_server):
    # Issue 16, finding 6: with auth off any Host was served, so a page whose name was
    # re-pointed at 127.0.0.1 (DNS rebinding) could read and write everything.
    port = live_server.url.rsplit(":", 1)[1]
    with client_for(live_server) as c:
        for host in (
            "evil.example",
            f"evil.example:{port}",
            "127.0.0.1.evil.example",
            "localhost.evil.example",
            f"evil.example@127.0.0.1:{port}",
            "",
            "10.0.0.1",
        ):
            r = c.get("/api/v1/runs", headers={"Host": host})
            assert r.status_code == 403 and "STETHOSCOPE_ALLOWED_HOSTS" in r.json()["detail"], (host, r.text)
            assert c.get("/", headers={"Host": host}).status_code == 403
        for host in (
            f"127.0.0.1:{port}",
            f"localhost:{port}",
            "LOCALHOST",
            f"[::1]:{port}",
            "127.0.0.2",
            "stethoscope.lab",
            f"Stethoscope.Lab:{port}",
        ):
            assert c.get("/api/v1/runs", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_setting(monkeypatch, db_url):
    from stethoscope_server.auth.gate_io import allowed_hosts

    monkeypatch.setenv("STETHOSCOPE_ALLOWED_HOSTS", "a.example, B.example:8765")
    s = Settings(database_url=db_url, host="0.0.0.0", insecure=True, public_url="https://mon.example/")
    assert allowed_hosts(s) == {"a.example", "b.example", "mon.example"}  # names: any port
    assert allowed_hosts(Settings(database_url=db_url, host="10.1.2.3", insecure=True, allowed_hosts="")) == {
        "10.1.2.3"
    }


@pytest.mark.parametrize("extra", [{"auth_failures_per_s": 0.5, "auth_failure_burst": 3}], ids=["burst-3"])
def test_failed_authentications_are_throttled_per_address(live_server):
    # Issue 16, item 8: failed authentications were never throttled.
    admin = client_for(live_server, ADMIN)
    assert admin.get("/api/v1/runs").status_code == 200
    gate = live_server.app.state.gate
    now = [1000.0]
    gate.failures.clock = lambda: now[0]  # a clock of the test's own: no waiting, no timing
    with client_for(live_server, "stt_wrong-guess") as bad:
        assert [bad.get("/api/v1/runs").status_code for _ in range(3)] == [401, 401, 401]
        r = bad.get("/api/v1/runs")
        assert (
            r.status_code == 429 and r.headers["retry-after"] == "2" and "failed authentications" in r.json()["detail"]
        )
        # While throttled, even the right token is not looked at, unless this worker has seen
        # it valid lately (a busy client at the same address keeps working).
        unseen = make_token(admin, None, ["read"])
        with client_for(live_server, unseen) as c:
            assert c.get("/api/v1/runs").status_code == 429
        assert admin.get("/api/v1/runs").status_code == 200
        r = httpx.post(live_server.url + "/login", data={"token": "stt_wrong"}, headers={"Origin": live_server.url})
        assert r.status_code == 429 and "Too many failed logins" in r.text and r.headers["retry-after"] == "2"
        now[0] += 2.0  # one failure's worth refilled
        assert bad.get("/api/v1/runs").status_code == 401
        assert bad.get("/api/v1/runs").status_code == 429
        now[0] += 2.0
        with client_for(live_server, unseen) as c:
            assert c.get("/api/v1/runs").status_code == 200
    admin.close()


@pytest.mark.parametrize("extra", [{}, {"auth": "off"}], ids=["auth-on", "auth-off"])
def test_nul_in_a_path_parameter_is_a_clean_422(live_server):
    # Issue 16, item 8: GET /api/v1/runs/a%00b gave 500 on PostgreSQL with auth on (the gate
    # looked the run up). No path parameter may hold NUL, on either database.
    with client_for(live_server, ADMIN, headers={"Content-Type": "application/json"}) as c:
        c.put("/api/v1/runs/r", json={"project": "P"}).raise_for_status()
        for method, url in (
            ("GET", "/api/v1/runs/a%00b"),
            ("GET", "/api/v1/runs/%00"),
            ("PATCH", "/api/v1/runs/a%00b"),
            ("POST", "/api/v1/runs/a%00b/points"),
            ("GET", "/api/v1/runs/r/series/lo%00ss"),
            ("GET", "/api/v1/projects/P%00/alerts"),
            ("GET", "/runs/a%00b"),
            ("GET", "/ui/api/runs/a%00b/panels"),
            ("GET", "/projects/P%00/settings"),
            ("DELETE", "/api/v1/tokens/1%00"),
        ):
            r = c.request(method, url, json={"series": []} if method != "GET" else None)
            assert r.status_code == 422 and "NUL" in r.text, (method, url, r.status_code, r.text)
        if live_server.settings.auth_enabled:  # the gate looks up the runs of /compare
            r = c.get("/ui/api/compare", params={"metric": "loss", "run": "a\x00b"})
            assert r.status_code == 422, r.text


#: Every route that names a run in its path, with a body where it takes one.
RUN_ROUTES = [
    ("GET", "/api/v1/runs/{r}", None),
    ("GET", "/api/v1/runs/{r}/series", None),
    ("GET", "/api/v1/runs/{r}/series/loss", None),
    ("GET", "/api/v1/runs/{r}/events", None),
    ("GET", "/api/v1/runs/{r}/continual", None),
    ("GET", "/api/v1/runs/{r}/alerts", None),
    ("GET", "/api/v1/runs/{r}/incidents", None),
    ("GET", "/runs/{r}", None),
    ("GET", "/ui/api/runs/{r}/panels", None),
    ("GET", "/ui/api/runs/{r}/state", None),
    ("PATCH", "/api/v1/runs/{r}", {"status": "finished"}),
    ("POST", "/api/v1/runs/{r}/points", {"series": [{"name": "loss", "steps": [9], "values": [1.0]}]}),
    ("POST", "/api/v1/runs/{r}/events", {"events": [{"key": "e", "step": 1, "kind": "note"}]}),
]


def test_another_projects_run_is_answered_like_a_missing_one(live_server, world):
    # Issue 16, item 8: run ids are global, and a 403 told that another project's run exists
    # and named its project.
    w = world
    w["admin"].put("/api/v1/runs/rp", json={"project": "P"}).raise_for_status()
    admin_p = w["padmin"]
    for method, path, body in RUN_ROUTES:
        foreign = admin_p.request(method, path.format(r="rq"), json=body)
        missing = admin_p.request(method, path.format(r="nope"), json=body)
        assert missing.status_code == 404, (method, path, missing.text)
        assert (foreign.status_code, foreign.text) == (missing.status_code, missing.text.replace("nope", "rq")), (
            method,
            path,
        )
        assert "'Q'" not in foreign.text
    for kind, path in (
        ("alert", "/api/v1/alerts/{}/ack"),
        ("webhook", "/api/v1/webhooks/{}/deliveries"),
        ("token", "/api/v1/tokens/{}"),
    ):
        method = {"alert": "POST", "webhook": "GET", "token": "DELETE"}[kind]
        foreign = admin_p.request(method, path.format(w[kind]))
        missing = admin_p.request(method, path.format(987654))
        assert missing.status_code == 404
        assert (foreign.status_code, foreign.text) == (404, missing.text.replace("987654", str(w[kind])))
    # Creating a run whose id another project holds: the id is taken, the project not named.
    r = admin_p.put("/api/v1/runs/rq", json={"project": "P"})
    assert r.status_code == 409 and "another project" in r.json()["detail"] and "Q" not in r.json()["detail"]
    assert_untouched(live_server, w)
    assert w["admin"].get("/api/v1/runs/rq").json()["status"] == "running"


def test_a_comparison_leaves_another_projects_run_out_like_a_missing_one(live_server, world):
    """Issue 16, finding 8 (left open by the first fix): ``/compare?run=`` with another
    project's run answered 403, telling that the run exists, while a missing run was skipped.
    Now both are skipped and the answers are the same bytes; the token's own runs still show."""
    p, Q_RUN = world["padmin"], "rq"
    p.put("/api/v1/runs/mine", json={"project": "P"}).raise_for_status()
    p.post(
        "/api/v1/runs/mine/points", json={"series": [{"name": "loss", "steps": [0, 1], "values": [1.0, 0.5]}]}
    ).raise_for_status()
    for path in ("/ui/api/compare?metric=loss&run=mine&run={other}", "/compare?metric=loss&run=mine&run={other}"):
        foreign = p.get(path.format(other=Q_RUN))
        missing = p.get(path.format(other="no-such-run"))
        assert foreign.status_code == missing.status_code == 200, (foreign.status_code, foreign.text[:200])
        assert foreign.text.replace(Q_RUN, "no-such-run") == missing.text, path
        assert Q_RUN not in foreign.text.replace(f"run={Q_RUN}", "")
    assert '"mine"' in p.get("/ui/api/compare?metric=loss&run=mine&run=" + Q_RUN).text
