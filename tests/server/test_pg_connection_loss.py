"""PostgreSQL backends that end between two requests: the next requests still succeed and an
ingest loses no point.

The pool no longer asks the database ``SELECT 1`` before every transaction: it asks only
when a pooled connection's socket has something to say (``store.db._ping_when_spoken_to``),
which a backend that ended always leaves there (its FATAL error, then the closed socket).
A backend that ends after that check fails the batch's first statement; ``Store.ingest``
then runs the batch once more on another connection (nothing was committed).

Each test terminates the server's own backends with ``pg_terminate_backend`` (found by an
``application_name`` of the test's own) and waits until PostgreSQL lists them no more.
"""

from __future__ import annotations

import uuid

import httpx
import psycopg
import pytest
from live_servers import PG_URL, _pg_schema_url, _ThreadServer, free_port, wait_until

from stethoscope_server.app import create_app
from stethoscope_server.settings import Settings
from stethoscope_server.store import db as store_db


@pytest.fixture
def pg():
    """(database URL of a schema of this test's own, a function that terminates every
    backend that URL's connections opened and returns how many there were)."""
    schema = "t_" + uuid.uuid4().hex[:12]
    app_name = "stethoscope-" + schema
    admin = psycopg.connect(PG_URL, autocommit=True)
    admin.execute(f"CREATE SCHEMA {schema}")

    def backends() -> list[int]:
        return [
            r[0] for r in admin.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app_name,))
        ]

    def terminate() -> int:
        pids = backends()
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        wait_until(lambda: not set(pids) & set(backends()), what="the terminated backends gone")
        return len(pids)

    try:
        yield f"{_pg_schema_url(schema)}&application_name={app_name}", terminate
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


def _batch(names: list[str], first: int, n: int) -> dict:
    steps = list(range(first, first + n))
    return {"series": [{"name": name, "steps": steps, "values": [1.0 / (1 + s) for s in steps]} for name in names]}


def _server(url: str):
    port = free_port()
    app = create_app(Settings(database_url=url, port=port, outbox_poll_s=3600))
    return _ThreadServer(app, port), httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1", timeout=30)


def _first_batch(c: httpx.Client, names: list[str]) -> None:
    """Run ``r`` made and its first 50 steps of ``names`` stored (the pool's connections open)."""
    assert c.put("/runs/r", json={"project": "p"}).status_code == 201
    r = c.post("/runs/r/points", json=_batch(names, 0, 50))
    assert r.status_code == 200 and r.json()["inserted"] == 50 * len(names)


def _assert_stored(c: httpx.Client, names: list[str], steps: int) -> None:
    for name in names:
        got = c.get(f"/runs/r/series/{name}", params={"max_points": 10_000}).json()
        assert got["steps"] == list(range(steps)), name
        assert got["values"] == [1.0 / (1 + s) for s in range(steps)], name


def test_requests_after_the_pools_backends_were_terminated_succeed(pg):
    url, terminate = pg
    names = ["loss", "lr", "metric/0"]
    server, c = _server(url)
    with server, c:
        _first_batch(c, names)
        assert terminate() >= 1
        # A read and a run update: no retry behind them, only the pool's check.
        assert c.get("/runs/r").status_code == 200
        assert terminate() >= 1
        assert c.put("/runs/r", json={"project": "p"}).status_code == 200
        assert terminate() >= 1
        r = c.post("/runs/r/points", json=_batch(names, 50, 50))
        assert r.status_code == 200, r.text
        assert r.json()["inserted"] == 150
        _assert_stored(c, names, 100)


@pytest.mark.parametrize("series", ["known", "new"])
def test_an_ingest_whose_connection_died_unnoticed_goes_again_on_another(pg, monkeypatch, series):
    """As if each backend had ended just after the pool's check: the check finds every
    connection quiet, the batch's first statement fails, and the batch goes once more.
    ``known``: every series cached (one statement); ``new``: a series the run lacks too."""
    url, terminate = pg
    names = ["loss", "lr", "metric/0"]
    server, c = _server(url)
    with server, c:
        _first_batch(c, names)
        monkeypatch.setattr(store_db, "_quiet", lambda dbapi_connection: True)
        assert terminate() >= 1
        later = names + ["metric/1"] if series == "new" else names
        r = c.post("/runs/r/points", json=_batch(later, 50, 50))
        assert r.status_code == 200, r.text
        assert r.json()["inserted"] == 50 * len(later)
        monkeypatch.undo()
        _assert_stored(c, names, 100)
