"""Operations endpoints on a real server, both databases: /readyz (migrated, un-migrated,
unreachable, after `stethoscope db downgrade`) and /metrics (strict Prometheus text; counters
move by exactly what was sent; webhook failures against a real loopback receiver; the outbox
depth equals the pending deliveries)."""

from __future__ import annotations

import contextlib
import socket
import threading

import httpx
import pytest
from _alert_helpers import loss_curve, make_run, post, post_batches, wait_until
from _prom_text import ParseError, parse
from live_servers import _ThreadServer, free_port
from webhook_receiver import Receiver

from stethoscope_server import cli
from stethoscope_server.api.errors import DATABASE_RETRY_AFTER_S, DATABASE_UNAVAILABLE
from stethoscope_server.settings import Settings
from stethoscope_server.store import migrate

SECRET = "s3cret-for-tests"


@pytest.fixture
def settings(db_url, request):
    """Quick webhook retries by default; a test changes more with indirect parametrisation."""
    base = {
        "outbox_poll_s": 0.2,
        "webhook_backoff_s": 0.2,
        "webhook_backoff_max_s": 1.0,
        "webhook_max_attempts": 2,
        "webhook_timeout_s": 5,
        "webhook_allow_private": True,
    }  # the receiver is on loopback
    over = dict(getattr(request, "param", {}))
    url = over.pop("database_url", db_url)
    return Settings(database_url=url(db_url) if callable(url) else url, **{**base, **over})


@pytest.fixture
def receiver():
    r = Receiver(default_status=500)
    yield r
    r.close()


def scrape(live_server) -> dict:
    r = httpx.get(live_server.url + "/metrics", timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(r.text)


def readyz(live_server) -> httpx.Response:
    return httpx.get(live_server.url + "/readyz", timeout=30)


# -- /readyz -----------------------------------------------------------------------------
def test_readyz_follows_the_schema_through_downgrade_and_upgrade(live_server, db_url, capsys):
    assert httpx.get(live_server.url + "/healthz").status_code == 200
    r = readyz(live_server)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ready", "revision": migrate.head()}

    assert cli.main(["db", "downgrade", "--db", db_url]) == 0
    r = readyz(live_server)
    assert r.status_code == 503
    assert "base (empty)" in r.json()["reason"] and "stethoscope db upgrade" in r.json()["reason"]
    assert httpx.get(live_server.url + "/healthz").status_code == 200  # alive, not ready

    assert cli.main(["db", "upgrade", "--db", db_url]) == 0
    assert readyz(live_server).status_code == 200
    capsys.readouterr()


@pytest.mark.parametrize(
    "settings", [{"migrate_on_start": False, "detectors_enabled": False, "outbox_poll_s": 3600}], indirect=True
)
def test_readyz_503_on_a_database_never_migrated(live_server):
    r = readyz(live_server)
    assert r.status_code == 503
    body = r.json()
    assert body["revision"] is None and body["head"] == migrate.head()
    # /metrics still answers; the outbox depth, which needs the schema, is left out.
    families = scrape(live_server)
    assert "stethoscope_webhook_outbox_pending" not in families and "stethoscope_ingest_requests_total" in families


def _unreachable(db_url: str) -> str:
    if db_url.startswith("sqlite"):
        return db_url.rsplit("/", 1)[0]  # the test's directory: SQLite cannot open it as a database
    return "postgresql://postgres@127.0.0.1:1/test"  # nothing listens on port 1


@pytest.mark.parametrize(
    "settings",
    [{"database_url": _unreachable, "migrate_on_start": False, "detectors_enabled": False, "outbox_poll_s": 3600}],
    indirect=True,
)
def test_readyz_503_when_the_database_does_not_answer(live_server):
    r = readyz(live_server)
    assert r.status_code == 503
    # Public: it says what, not the driver's message (host, port, user, file path).
    assert r.json() == {"status": "unavailable", "reason": "database unavailable"}
    assert r.headers["retry-after"] == str(DATABASE_RETRY_AFTER_S)
    # The API says the same: 503 with Retry-After, not a bare 500.
    for method, path, body in (
        ("GET", "/api/v1/runs", None),
        ("PUT", "/api/v1/runs/r", {"project": "p"}),
        ("POST", "/api/v1/runs/r/points", {"series": [{"name": "loss", "steps": [1], "values": [1.0]}]}),
        ("GET", "/", None),
    ):
        r = httpx.request(method, live_server.url + path, json=body, timeout=30)
        assert r.status_code == 503, (path, r.status_code, r.text)
        assert r.headers["retry-after"] == str(DATABASE_RETRY_AFTER_S)
        assert r.json() == {"detail": DATABASE_UNAVAILABLE}


class _TcpProxy:
    """A loopback TCP forwarder to PostgreSQL that the test can cut and restore: an outage of
    this server's database without touching the PostgreSQL the other tests share."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.conns: list[socket.socket] = []
        self.listener: socket.socket | None = None

    def open(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close alone does not
        self.listener.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self.conns.clear()


def _outage(db_url: str, tmp_path):
    """(database URL, cut, restore, close) for an outage that begins while the server runs."""
    if db_url.startswith("sqlite"):
        live, gone = tmp_path / "db", tmp_path / "db-gone"
        live.mkdir()

        def cut(app):
            live.rename(gone)
            app.state.engine.dispose()  # the pool's open files would keep working

        return f"sqlite:///{live}/stethoscope.db", cut, lambda app: gone.rename(live), lambda: None
    proxy = _TcpProxy(("127.0.0.1", 5432))
    proxy.open()

    def restore(app):
        proxy.open()

    return db_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"), lambda app: proxy.cut(), restore, proxy.cut


@contextlib.contextmanager
def _closing(close):
    try:
        yield
    finally:
        close()


def test_a_database_outage_mid_run_is_503_with_retry_after_and_heals(db_url, tmp_path, caplog):
    """Issue 16, finding 8: a database outage gave bare 500s (the hook could not tell it from
    a bug) and /readyz showed the connection error. Now 503, Retry-After, the cause in the log."""
    from stethoscope_server.app import create_app

    url, cut, restore, close = _outage(db_url, tmp_path)
    port = free_port()
    app = create_app(Settings(database_url=url, port=port, detectors_enabled=False, outbox_poll_s=3600))
    with _ThreadServer(app, port), httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c, _closing(close):
        assert c.put("/api/v1/runs/r", json={"project": "p"}).status_code == 201
        batch = {"series": [{"name": "loss", "steps": [1, 2], "values": [1.0, 0.5]}]}
        assert c.post("/api/v1/runs/r/points", json=batch).status_code == 200
        cut(app)
        for method, path, body in (
            ("GET", "/api/v1/runs/r", None),
            ("POST", "/api/v1/runs/r/points", batch),
            ("GET", "/ui/api/runs/r/panels", None),
        ):
            r = c.request(method, path, json=body)
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert r.headers["retry-after"] == str(DATABASE_RETRY_AFTER_S) and r.json() == {
                "detail": DATABASE_UNAVAILABLE
            }
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json() == {"status": "unavailable", "reason": "database unavailable"}
        assert "database unavailable" in caplog.text  # the detail is logged for the operator
        restore(app)
        r = wait_until(lambda: (r := c.get("/api/v1/runs/r")).status_code == 200 and r, what="recovery")
        assert r.json()["last_step"] == 2
        assert c.get("/readyz").status_code == 200


# -- /metrics ----------------------------------------------------------------------------
def _counts(f) -> dict:
    return {
        "req": {c: f["stethoscope_ingest_requests_total"].value(status=c) for c in ("2xx", "4xx", "5xx")},
        "pts": {c: f["stethoscope_ingest_points_total"].value(status=c) for c in ("2xx", "4xx", "5xx")},
        "inserted": f["stethoscope_points_inserted_total"].value(),
        "latency_n": f["stethoscope_ingest_request_duration_seconds"].value("_count"),
        "detector_n": f["stethoscope_detector_duration_seconds"].value("_count"),
    }


def test_metrics_counters_move_by_exactly_what_was_sent(live_server, client):
    before = _counts(scrape(live_server))
    make_run(client, "m")
    values = loss_curve(100)
    for a in range(0, 100, 25):  # 4 batches x (25 loss + 25 other) points, all new
        steps = list(range(a, a + 25))
        r = client.post(
            "/runs/m/points",
            json={
                "series": [
                    {"name": "loss", "steps": steps, "values": values[a : a + 25]},
                    {"name": "lr", "steps": steps, "values": [0.1] * 25},
                ]
            },
        )
        assert r.status_code == 200 and r.json()["inserted"] == 50
    assert post(client, "m", 75, values[75:100])["inserted"] == 0  # a resend: counted as sent, stores nothing
    assert (
        client.post(
            "/runs/nope/points", json={"series": [{"name": "loss", "steps": [1, 2, 3], "values": [1, 2, 3]}]}
        ).status_code
        == 404
    )
    assert (
        client.post("/runs/m/points", content=b"{not json", headers={"content-type": "application/json"}).status_code
        == 422
    )
    assert client.get("/runs/m/series").status_code == 200  # not an ingest: not counted

    after = _counts(scrape(live_server))
    assert after["req"]["2xx"] - before["req"]["2xx"] == 5
    assert after["req"]["4xx"] - before["req"]["4xx"] == 2
    assert after["req"]["5xx"] == before["req"]["5xx"]
    assert after["pts"]["2xx"] - before["pts"]["2xx"] == 4 * 50 + 25
    assert after["pts"]["4xx"] - before["pts"]["4xx"] == 3  # the 404 batch parsed; the 422 one did not
    assert after["inserted"] - before["inserted"] == 200
    assert after["latency_n"] - before["latency_n"] == 7
    assert after["detector_n"] - before["detector_n"] == 4  # the resend brought nothing new to detect


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_client_that_hangs_up_mid_body_is_counted_as_client_closed_not_5xx(live_server, client, chunked):
    """Issue 16, finding 8: a client disconnect was counted as a 5xx (a server error)."""
    make_run(client, "h")
    requests = lambda f, c: f["stethoscope_ingest_requests_total"].value(status=c)  # noqa: E731
    before = scrape(live_server)
    port = int(live_server.url.rsplit(":", 1)[1])
    body = b'{"series": [{"name": "loss", "steps": [1, 2, 3], "values": [1.0, 2.0'  # cut halfway
    length = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: 100000\r\n"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /api/v1/runs/h/points HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + length
            + b"\r\n"
        )
        sock.sendall(b"%x\r\n%s\r\n" % (len(body), body) if chunked else body)
    after = wait_until(
        lambda: (f := scrape(live_server)) and requests(f, "client_closed") > requests(before, "client_closed") and f,
        what="the hang-up counted",
    )
    assert requests(after, "client_closed") - requests(before, "client_closed") == 1
    assert requests(after, "5xx") == requests(before, "5xx")
    assert client.get("/runs/h/series").json() == []  # nothing of the cut batch was stored


def test_metrics_exposition_is_strict_prometheus_text(live_server, client):
    make_run(client, "x")
    post(client, "x", 0, [1.0, 2.0])
    families = scrape(live_server)
    kinds = {n: f.type for n, f in families.items()}
    assert kinds == {
        "stethoscope_ingest_requests_total": "counter",
        "stethoscope_ingest_points_total": "counter",
        "stethoscope_ingest_request_duration_seconds": "histogram",
        "stethoscope_points_inserted_total": "counter",
        "stethoscope_detector_duration_seconds": "histogram",
        "stethoscope_webhook_deliveries_total": "counter",
        "stethoscope_webhook_outbox_pending": "gauge",
        "stethoscope_detector_errors_total": "counter",
        "stethoscope_background_errors_total": "counter",
    }
    assert families["stethoscope_detector_errors_total"].value() == 0
    assert families["stethoscope_background_errors_total"].value(job="webhook-outbox") == 0
    # The parser is strict: a repeated sample and a non-cumulative histogram are refused.
    text = httpx.get(live_server.url + "/metrics").text
    line = next(ln for ln in text.splitlines() if ln.startswith("stethoscope_points_inserted_total "))
    with pytest.raises(ParseError):
        parse(text + line + "\n")
    with pytest.raises(ParseError):
        parse('# HELP h x\n# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n')


def _hook(client, url):
    r = client.post("/projects/p/webhooks", json={"url": url, "secret": SECRET})
    assert r.status_code == 201, r.text
    return r.json()


def _webhook_counts(live_server) -> dict:
    f = scrape(live_server)["stethoscope_webhook_deliveries_total"]
    return {o: f.value(outcome=o) for o in ("delivered", "retrying", "failed")}


def test_webhook_failures_move_the_failure_counters(live_server, client, receiver):
    before = _webhook_counts(live_server)
    _hook(client, receiver.url)
    make_run(client, "r")
    post_batches(client, "r", loss_curve(160, spikes=(139,)))  # opens and resolves: two deliveries
    receiver.wait_for(lambda rs: len(rs) >= 4)  # two attempts each (webhook_max_attempts=2), all answered 500
    want = {"delivered": 0, "retrying": 2, "failed": 2}
    wait_until(
        lambda: {k: v - before[k] for k, v in _webhook_counts(live_server).items()} == want, what="failure counters"
    )
    assert scrape(live_server)["stethoscope_webhook_outbox_pending"].value() == 0  # given up: no longer pending


@pytest.mark.parametrize(
    "settings", [{"webhook_backoff_s": 3600, "webhook_backoff_max_s": 3600, "webhook_max_attempts": 5}], indirect=True
)
def test_outbox_depth_is_the_number_of_pending_deliveries(live_server, client, receiver):
    assert scrape(live_server)["stethoscope_webhook_outbox_pending"].value() == 0
    before = _webhook_counts(live_server)
    hook = _hook(client, receiver.url)
    make_run(client, "r")
    post_batches(client, "r", loss_curve(160, spikes=(139,)))
    # "opened" fails once, then waits an hour for its retry; "resolved" waits behind it (one
    # alert's deliveries go in order): both stay pending.
    wait_until(lambda: _webhook_counts(live_server)["retrying"] - before["retrying"] == 1, what="first attempt")
    pending = client.get(f"/webhooks/{hook['id']}/deliveries", params={"status": "pending"}).json()
    assert len(pending) == 2
    assert scrape(live_server)["stethoscope_webhook_outbox_pending"].value() == 2
