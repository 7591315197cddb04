"""``stethoscope server`` refuses a public bind without auth unless ``--insecure``; ``stethoscope
token create|list|revoke`` against a live server with authentication on (both databases)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from _auth_helpers import auth_settings
from live_servers import free_port

CLI = [sys.executable, "-m", "stethoscope_server.cli"]


def cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_public_bind_without_auth_is_refused_unless_insecure(db_url):
    env = {"STETHOSCOPE_AUTH": "off"}
    port = free_port()
    # Refused before anything binds: exit 2 and the reason.
    done = cli("server", "--host", "0.0.0.0", "--port", str(port), "--db", db_url, env=env)
    assert done.returncode == 2, done.stderr
    assert "refusing to serve on 0.0.0.0 without authentication" in done.stderr and "--insecure" in done.stderr
    # Told --insecure: it serves, tokenless (we only ever talk to it over loopback).
    proc = subprocess.Popen(
        [
            *CLI,
            "server",
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            "--db",
            db_url,
            "--insecure",
            "--log-level",
            "warning",
        ],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/runs").status_code == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert "authentication off" in out


def test_token_commands(live_server, db_url):
    made = cli("token", "create", "--project", "P", "--scopes", "ingest,read", "--name", "ci job", "--db", db_url)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("stt_") and "shown this once" in made.stderr.lower()
    auth = {"Authorization": f"Bearer {token}"}
    assert httpx.put(f"{live_server.url}/api/v1/runs/r1", json={"project": "P"}, headers=auth).status_code == 201
    listed = cli("token", "list", "--db", db_url)
    assert listed.returncode == 0 and "ci job" in listed.stdout and "ingest,read" in listed.stdout
    assert token not in listed.stdout
    token_id = next(line.split()[0] for line in listed.stdout.splitlines() if "ci job" in line)
    bad = cli("token", "create", "--scopes", "ingest,sudo", "--db", db_url)
    assert bad.returncode == 2 and "scopes must be" in bad.stderr
    assert cli("token", "revoke", token_id, "--db", db_url).returncode == 0
    r = httpx.get(f"{live_server.url}/api/v1/runs", headers=auth)  # token_cache_s=0: at once
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    assert cli("token", "revoke", "999", "--db", db_url).returncode == 1


@pytest.fixture
def settings(db_url):
    return auth_settings(db_url, token_cache_s=0)
