"""Helpers for the benchmarks: a real server process on a fresh database, and timing stats."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import tarfile
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

PG_URL = os.environ.get("STETHOSCOPE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def fresh_database(kind: str):
    """A URL for an empty database: an SQLite file, or a PostgreSQL schema dropped afterwards."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as d:
            yield f"sqlite:///{d}/bench.db"
        return
    import psycopg

    schema = "bench_" + uuid.uuid4().hex[:10]
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            sep = "&" if "?" in PG_URL else "?"
            yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its reaped children (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in parts[11:15]) / os.sysconf("SC_CLK_TCK")


class Server:
    def __init__(self, url: str, proc: subprocess.Popen) -> None:
        self.url = url
        self.proc = proc

    def cpu(self) -> float:
        """CPU seconds of the server and its worker processes so far."""
        total = cpu_seconds(self.proc.pid)
        try:
            children = open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read().split()
        except OSError:
            children = []
        return total + sum(cpu_seconds(int(c)) for c in children)


@contextmanager
def server(db_url: str, workers: int = 1, code: str | None = None):
    """A server process on ``db_url``; ``code`` (from ``baseline_code``) runs another
    version of the packages than the installed one."""
    from stethoscope_server.process import start_server_process, stop_process

    env = None
    if code is not None:
        env = {**os.environ, "PYTHONPATH": code + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc, url = start_server_process(db_url, free_port(), workers=workers, stdout=subprocess.DEVNULL, env=env)
    try:
        yield Server(url, proc)
    finally:
        stop_process(proc)


REPO = Path(__file__).resolve().parents[1]


@contextmanager
def baseline_code(ref: str):
    """The packages as they were at git ``ref``, importable from the yielded folder (put it on
    PYTHONPATH: it comes before the editable install's finder). The A/B benchmarks run the old
    implementation from here, so it is never a second code path of the server itself."""
    with tempfile.TemporaryDirectory(prefix="stethoscope-baseline-") as d:
        tar_path = Path(d) / "tree.tar"
        with open(tar_path, "wb") as f:
            subprocess.run(
                ["git", "-C", str(REPO), "archive", ref, "server", "client", "dashboard", "migrations"],
                stdout=f,
                check=True,
            )
        tree = Path(d) / "tree"
        with tarfile.open(tar_path) as t:
            t.extractall(tree, filter="data")
        pkgs = Path(d) / "pkgs"
        pkgs.mkdir()
        # The layout pyproject.toml's package-dir mapping gives the installed packages.
        (tree / "migrations").rename(tree / "server" / "migrations")
        (tree / "server").rename(pkgs / "stethoscope_server")
        (tree / "client").rename(pkgs / "stethoscope")
        (tree / "dashboard").rename(pkgs / "stethoscope_dashboard")
        yield str(pkgs)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine_load() -> dict:
    """How busy the shared machine was: the load averages against its cores."""
    return {"cores": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)}
