"""Shared fixtures: real databases (SQLite file and PostgreSQL) and a real uvicorn server.

Every store and API test runs on both databases. PostgreSQL comes from
STETHOSCOPE_TEST_PG_URL (default: the CI machine's server, database ``test``); each test gets
a schema of its own, dropped afterwards, so tests never see each other's rows.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_URL = os.environ.get("STETHOSCOPE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
DATABASES = ["sqlite", "postgres"]


def _pg_schema_url(schema: str) -> str:
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options=-csearch_path%3D{schema}"


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    app: object
    settings: object

    @property
    def store(self):
        return self.app.state.store


class _ThreadServer:
    """A real uvicorn serving the app on a free loopback port, in a thread of this process."""

    def __init__(self, app, port: int) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)


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

    with httpx.Client(base_url=live_server.url + "/api/v1", timeout=30) as c:
        yield c


class ServerProcess:
    """``stethoscope server`` in a child process, for tests that kill and restart it."""

    def __init__(self, db_url: str, port: int | None = None, log_path: Path | None = None) -> None:
        self.db_url = db_url
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "ServerProcess":
        import httpx

        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stethoscope_server.cli", "server", "--db", self.db_url, "--port", str(self.port), "--log-level", "warning"],
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become healthy")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


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
