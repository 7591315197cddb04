"""Faults, end to end, with real parts: a real tiny training in its own process streams through
the real hook while the server is SIGKILLed, PostgreSQL restarts, the webhook receiver is down,
the hook's spool disk is full, or two server workers share the database. Afterwards the store
is compared with what the training logged: every point exactly once (or, with a full disk,
every point but the ones the hook says it dropped).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
from live_servers import PG_URL, ServerProcess, _pg_schema_url, free_port
from live_servers import wait_until as _wait_until
from webhook_receiver import Receiver

from stethoscope.core.wire import decode_value
from stethoscope_server.process import server_command, stop_process

pytestmark = pytest.mark.slow

JOB = Path(__file__).with_name("_training_job.py")
#: Seconds the webhook receiver stays down: a minute, as the service promises to outlast
#: (STETHOSCOPE_FAULT_OUTAGE_S shortens it for a quick local run).
WEBHOOK_OUTAGE_S = float(os.environ.get("STETHOSCOPE_FAULT_OUTAGE_S", "60"))


# -- helpers ----------------------------------------------------------------------------
def wait_until(fn, timeout: float = 60.0, what: str = "condition"):
    return _wait_until(fn, timeout, what, interval=0.1)


class Job:
    """``_training_job.py`` in a child process."""

    def __init__(self, tmp_path: Path, server: str, run: str, **opts):
        self.out = tmp_path / f"{run}.json"
        self.log = tmp_path / f"{run}.log"
        args = [
            sys.executable,
            str(JOB),
            "--server",
            server,
            "--run",
            run,
            "--out",
            str(self.out),
            "--spool",
            str(opts.pop("spool", tmp_path / "spool")),
        ]
        for k, v in opts.items():
            flag = "--" + k.replace("_", "-")
            args += [flag] if v is True else [flag, str(v)]
        env = {**os.environ, "STETHOSCOPE_DIR": str(tmp_path / "home")}
        env.pop("STETHOSCOPE_DISABLED", None)
        self.proc = subprocess.Popen(args, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env)

    def running(self) -> bool:
        return self.proc.poll() is None

    def paused(self) -> dict | None:
        p = Path(str(self.out) + ".paused")
        return json.loads(p.read_text()) if p.exists() else None

    def go(self) -> None:
        Path(str(self.out) + ".go").write_text("go")

    def wait(self, timeout: float = 180.0) -> dict:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the training job did not finish; its log:\n{self.log.read_text()[-3000:]}") from None
        text = self.log.read_text()
        assert rc == 0, f"the training job failed ({rc}):\n{text[-3000:]}"
        assert "Traceback" not in text, f"something raised inside the training job:\n{text[-3000:]}"
        result = json.loads(self.out.read_text())
        result["losses"] = [float(v) for v in result["losses"]]
        return result


def series(url: str, run: str, name: str):
    r = httpx.get(f"{url}/api/v1/runs/{run}/series/{name}", params={"max_points": 1_000_000}, timeout=30)
    if r.status_code == 404:
        return [], []
    r.raise_for_status()
    body = r.json()
    assert not body["downsampled"]
    return body["steps"], [decode_value(v) for v in body["values"]]


def stored_steps(url: str, run: str, name: str = "loss") -> int:
    try:
        return len(series(url, run, name)[0])
    except httpx.HTTPError:
        return 0


def same(a: float, b: float) -> bool:
    return (a != a and b != b) or a == b


def assert_every_point_exactly_once(url: str, result: dict) -> None:
    run, losses = result["run"], result["losses"]
    steps, values = series(url, run, "loss")
    assert steps == list(range(len(losses))), "each step's loss stored once, none missing"
    bad = [(s, a, b) for s, a, b in zip(steps, values, losses) if not same(a, b)]
    assert not bad, f"stored losses differ from what the training logged: {bad[:5]}"
    for name in ("grad/norm", "logits/entropy", "lr"):
        assert series(url, run, name)[0] == list(range(len(losses))), name
    assert result["dropped"] == 0
    assert series(url, run, "stethoscope/dropped") == ([], [])
    assert httpx.get(f"{url}/api/v1/runs/{run}", timeout=30).json()["status"] == "finished"


def no_spool_left(tmp_path: Path) -> bool:
    return not any((tmp_path / "spool").rglob("*.jsonl"))


# -- (1) the server SIGKILLed mid-run and restarted -------------------------------------
def test_server_sigkilled_mid_run_and_restarted(server_process, tmp_path):
    server = server_process().start()
    job = Job(tmp_path, server.url, "killed", steps=300, sleep=0.02)
    wait_until(lambda: stored_steps(server.url, "killed") >= 40, what="the first points stored")
    assert job.running()
    server.kill()  # SIGKILL: no shutdown, requests in flight are cut
    time.sleep(2.0)  # a real outage while the job logs; nothing is asserted about its length
    again = server_process(port=server.port).start()
    result = job.wait()
    assert_every_point_exactly_once(again.url, result)
    assert no_spool_left(tmp_path), "everything was sent, the spool is gone"


# -- (2) PostgreSQL restarted mid-run ---------------------------------------------------
def _restart_postgres() -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    import psycopg

    def accepts():
        try:
            psycopg.connect(PG_URL, connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    wait_until(accepts, timeout=60, what="PostgreSQL accepting connections again")


@pytest.fixture
def restartable_pg_url():
    """A PostgreSQL schema of this test's own, made and dropped over connections of their own
    (the shared ``db_url`` fixture keeps one open across the test, which a restart kills)."""
    import psycopg

    schema = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield _pg_schema_url(schema)
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.isdir("/etc/postgresql"), reason="restarts the local PostgreSQL cluster (root)"
)
def test_postgres_restarted_mid_run(restartable_pg_url, tmp_path):
    server = ServerProcess(restartable_pg_url, log_path=tmp_path / "server.log").start()
    try:
        job = Job(tmp_path, server.url, "pg-restart", steps=400, sleep=0.02)
        wait_until(lambda: stored_steps(server.url, "pg-restart") >= 40, what="the first points stored")
        assert job.running()
        _restart_postgres()  # every pooled connection dies; pool_pre_ping replaces them
        result = job.wait()
        assert server.proc.poll() is None, "the server lived through it"
        assert_every_point_exactly_once(server.url, result)
        assert httpx.get(server.url + "/readyz", timeout=30).status_code == 200
    finally:
        server.stop()


# -- (3) the webhook receiver down for a while ------------------------------------------
@pytest.fixture
def settings(db_url):
    # Retries every 0.5 s doubling to at most 4 s (production: 2 s to 30 min), and attempts
    # enough to outlast the outage; the outbox looks for due deliveries every 0.2 s.
    from stethoscope_server.settings import Settings

    return Settings(
        database_url=db_url,
        outbox_poll_s=0.2,
        webhook_backoff_s=0.5,
        webhook_backoff_max_s=4.0,
        webhook_max_attempts=1000,
        webhook_timeout_s=5,
        webhook_allow_private=True,
    )  # receiver on loopback


@pytest.mark.parametrize("outage_s", [WEBHOOK_OUTAGE_S])
def test_webhook_receiver_down_then_back_gets_each_alert_once(live_server, outage_s):
    api = live_server.url + "/api/v1"
    port = free_port()
    r = httpx.post(f"{api}/projects/faults/webhooks", json={"url": f"http://127.0.0.1:{port}/hook"}, timeout=30)
    assert r.status_code == 201, r.text
    hook = r.json()["id"]
    assert httpx.put(f"{api}/runs/wh", json={"project": "faults"}, timeout=30).status_code == 201
    loss = [2.0 - 0.01 * s for s in range(40)] + ["NaN"]  # a NaN loss: a critical alert
    r = httpx.post(
        f"{api}/runs/wh/points",
        json={"series": [{"name": "loss", "steps": list(range(41)), "values": loss}]},
        timeout=30,
    )
    (alert,) = r.json()["alerts"]
    started = time.monotonic()

    def deliveries():
        return httpx.get(f"{api}/webhooks/{hook}/deliveries", timeout=30).json()

    # Down: nothing listens on the port. The outbox keeps trying and does not give up.
    wait_until(lambda: any(d["attempts"] >= 3 for d in deliveries()), what="retries while the receiver is down")
    time.sleep(max(0.0, outage_s - (time.monotonic() - started)))
    (pending,) = deliveries()
    assert pending["status"] == "pending" and pending["attempts"] >= 3, pending
    receiver = Receiver(port=port)
    try:
        wait_until(lambda: receiver.requests, timeout=30, what="the delivery after the receiver came back")
        wait_until(lambda: all(d["status"] == "delivered" for d in deliveries()), what="delivered")
        # The run recovers (the alert may resolve: another delivery); wait until every
        # delivery is done and each one reached the receiver.
        finite = [1.5 - 0.01 * s for s in range(40)]
        httpx.post(
            f"{api}/runs/wh/points",
            json={"series": [{"name": "loss", "steps": list(range(41, 81)), "values": finite}]},
            timeout=30,
        )
        wait_until(
            lambda: (
                all(d["status"] == "delivered" for d in deliveries()) and len(receiver.requests) == len(deliveries())
            ),
            what="every delivery received",
        )
    finally:
        receiver.close()
    events = [(r.json["event"], r.json["alert"]["id"]) for r in receiver.requests]
    assert events[0] == ("alert.opened", alert["id"]), events
    assert len(events) == len(set(events)), f"a delivery arrived twice: {events}"
    assert pending["id"] in [d["id"] for d in deliveries()]


# -- (4) the hook's spool disk is full --------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs for the spool, or None where mounting is not allowed."""
    path = tmp_path / "spool"
    path.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    yield path if mounted else None
    if mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_full_spool_disk_drops_are_counted_and_the_job_is_unharmed(server_process, tmp_path, tiny_disk):
    port = free_port()  # the server is down while the disk fills: nothing listens here yet
    full = {"spool": tiny_disk} if tiny_disk else {"spool": tmp_path / "spool", "fsize_limit": 1 << 20}
    # One spool entry a step (each ~3 KB): 1 MiB of disk, then the spool's 1,000 entries in
    # memory, then the oldest are dropped.
    steps, pause = 1700, 1650
    job = Job(
        tmp_path,
        f"http://127.0.0.1:{port}",
        "full",
        steps=steps,
        sleep=0,
        extra=40,
        flush_every_step=True,
        pause_at=pause,
        close_timeout=120,
        **full,
    )
    paused = wait_until(job.paused, timeout=300, what="the job past the full disk")
    assert paused["dropped"] > 0, "a full disk and a full memory fallback drop records, and count them"
    server = server_process(port=port).start()
    job.go()
    result = job.wait(timeout=300)
    stored, values = series(server.url, "full", "loss")
    dropped_steps, dropped_values = series(server.url, "full", "stethoscope/dropped")
    assert result["dropped"] >= paused["dropped"] > 0
    assert dropped_values and dropped_values[-1] == result["dropped"], "the count reached the server"
    assert set(stored) <= set(range(steps)) and stored == sorted(set(stored))
    assert steps - len(stored) == result["dropped"], "every record lost is counted, and only those"
    assert all(same(v, result["losses"][s]) for s, v in zip(stored, values))
    assert stored[-1] == steps - 1, "the newest records survive; the oldest in memory were dropped"


# -- (5) two server workers behind one database -----------------------------------------
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_two_workers_no_duplicate_alert_no_lost_point(db_url, tmp_path):
    port = free_port()
    log = open(tmp_path / "server.log", "ab")
    server = subprocess.Popen(server_command(db_url, port, workers=2), stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:

        def workers():
            return psutil.Process(server.pid).children(recursive=False)

        wait_until(lambda: len(workers()) >= 2 and stored_ok(url), what="two workers serving")
        jobs = [
            Job(tmp_path, url, f"w{i}", steps=300, sleep=0.02, nan_at=150 + i, spool=tmp_path / f"spool{i}")
            for i in range(2)
        ]
        wait_until(lambda: all(stored_steps(url, f"w{i}") >= 60 for i in range(2)), what="both jobs streaming")
        # SIGKILL one worker: its connections break mid-request, the hooks resend to the other
        # (the batch in flight may have been committed already), and uvicorn starts a new one.
        victim = workers()[0]
        victim.kill()
        results = [j.wait() for j in jobs]
        for result in results:
            assert_every_point_exactly_once(url, result)
            alerts = httpx.get(f"{url}/api/v1/runs/{result['run']}/alerts", timeout=30).json()
            keys = [(a["detector"], a["key"], a["start_step"]) for a in alerts]
            assert len(keys) == len(set(keys)), f"an alert was opened twice: {keys}"
            nonfinite = [a for a in alerts if (a["detector"], a["key"]) == ("divergence", "nonfinite")]
            nan_step = next(s for s, v in enumerate(result["losses"]) if v != v)
            assert [a["start_step"] for a in nonfinite] == [nan_step], alerts
    finally:
        stop_process(server)


def stored_ok(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
