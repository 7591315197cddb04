"""Real servers for the tests: a uvicorn thread in this process, or a ``stethoscope server``
child process that a test can kill and start again; and the PostgreSQL URL they use.

A module of its own (not conftest.py, which pytest loads once per folder under one name),
so test files import these with ``from live_servers import ...`` wherever they are.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from stethoscope_server.process import server_command, stop_process, wait_healthy

PG_URL = os.environ.get("STETHOSCOPE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_schema_url(schema: str) -> str:
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options=-csearch_path%3D{schema}"


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

        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        )
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


class ServerProcess:
    """``stethoscope server`` in a child process, for tests that kill and restart it."""

    def __init__(self, db_url: str, port: int | None = None, log_path: Path | None = None) -> None:
        self.db_url = db_url
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "ServerProcess":
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(server_command(self.db_url, self.port), stdout=log, stderr=log)
        wait_healthy(self.proc, self.url, timeout)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc, timeout=10)


def wait_until(fn, timeout: float = 20.0, what: str = "condition", interval: float = 0.05):
    """Poll ``fn()`` until it returns something truthy; that value is returned."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s (last: {v!r})")
        time.sleep(interval)
