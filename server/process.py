"""``stethoscope server`` as a child process: start it, wait until it answers, stop it.

Used by ``make demo`` and the benchmarks (and the tests' own server fixture stops with
``stop_process``), so there is one way to wait for a fresh server and one way to end it.

    proc, url = start_server_process("sqlite:///x.db", port=8765)
    ...
    stop_process(proc)
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

#: Seconds a fresh server may take to migrate and answer /healthz.
START_TIMEOUT_S = 60.0


def server_command(db_url: str, port: int, *, workers: int = 1, log_level: str = "warning") -> list[str]:
    return [
        sys.executable,
        "-m",
        "stethoscope_server.cli",
        "server",
        "--db",
        db_url,
        "--port",
        str(port),
        "--log-level",
        log_level,
        "--workers",
        str(workers),
    ]


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = START_TIMEOUT_S) -> None:
    """Return once ``url``/healthz answers; ``RuntimeError`` if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {url} (exit code {proc.poll()})") from None
            time.sleep(0.1)


def start_server_process(
    db_url: str, port: int, *, workers: int = 1, log_level: str = "warning", **popen
) -> tuple[subprocess.Popen, str]:
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(server_command(db_url, port, workers=workers, log_level=log_level), **popen)
    try:
        wait_healthy(proc, url)
    except BaseException:
        stop_process(proc)
        raise
    return proc, url


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM (uvicorn finishes its requests and lifespan), then SIGKILL after ``timeout``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
