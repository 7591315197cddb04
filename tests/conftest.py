"""Shared fixtures: real databases (SQLite file and PostgreSQL) and a real uvicorn server.

Every store and API test runs on both databases. PostgreSQL comes from
STETHOSCOPE_TEST_PG_URL (default: the CI machine's server, database ``test``); each test gets
a schema of its own, dropped afterwards, so tests never see each other's rows.
"""

from __future__ import annotations

import uuid

import pytest
from live_servers import PG_URL, LiveServer, ServerProcess, _pg_schema_url, _ThreadServer, free_port  # noqa: F401

DATABASES = ["sqlite", "postgres"]


@pytest.fixture(params=DATABASES)
def db_url(request, tmp_path) -> str:
    """A fresh, empty database URL: an SQLite file, or a PostgreSQL schema of this test's own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'stethoscope.db'}"
        return
    import psycopg

    schema = "t_" + uuid.uuid4().hex[:12]
    try:
        admin = psycopg.connect(PG_URL.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    except psycopg.OperationalError as e:
        pytest.fail(f"PostgreSQL is required for the store tests and is not reachable at {PG_URL}: {e}")
    with admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield _pg_schema_url(schema)
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def settings(db_url):
    from stethoscope_server.settings import Settings

    return Settings(database_url=db_url)


@pytest.fixture
def live_server(settings):
    """A real uvicorn with the app on a free port, on this test's database (both kinds)."""
    from stethoscope_server.app import create_app

    port = free_port()
    settings = settings.model_copy(update={"port": port})
    app = create_app(settings)
    with _ThreadServer(app, port):
        yield LiveServer(f"http://127.0.0.1:{port}", app, settings)


@pytest.fixture
def client(live_server):
    import httpx

    # JSON on every request, as the hook and the dashboard send it: with authentication off
    # the server takes a state change (even one without a body) only as JSON.
    with httpx.Client(
        base_url=live_server.url + "/api/v1", timeout=30, headers={"Content-Type": "application/json"}
    ) as c:
        yield c


@pytest.fixture
def server_process(db_url, tmp_path):
    """Factory for real server processes on this test's database; all are stopped afterwards."""
    started: list[ServerProcess] = []

    def make(port: int | None = None) -> ServerProcess:
        sp = ServerProcess(db_url, port, tmp_path / "server.log")
        started.append(sp)
        return sp

    yield make
    for sp in started:
        sp.stop()
