"""Real servers for the tests: a uvicorn thread in this process, or a ``stethoscope server``
child process that a test can kill and start again; and the PostgreSQL URL they use.

A module of its own (not conftest.py, which pytest loads once per folder under one name),
so test files import these with ``from live_servers import ...`` wherever they are.
"""

from __future__ import annotations

import os
import random
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


#: Where ``free_port`` looks: the 12,000 ports below the kernel's ephemeral range.
_PORTS_BELOW_EPHEMERAL = 12_000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A loopback port nothing listens on, for a server a test starts. Not one the kernel picks
    (binding port 0): it comes from the ephemeral range, where any outgoing connection's local
    end may take it before the server binds it ("address already in use", seen in CI). A port
    below that range is taken only by a listener, which the bind here finds."""
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(max(1024, low - _PORTS_BELOW_EPHEMERAL), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # all of them busy: the kernel's pick, as before
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
