"""A full spool disk while the server is down: every lost record is counted, no line is torn,
the final status survives, and the hook says at close what was lost."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from stethoscope._spool import Spool
from stethoscope._sync import sync
from stethoscope.core.wire import decode_value

JOB = Path(__file__).parents[1] / "e2e" / "_training_job.py"
#: Largest spool file: about 40 entries of ~3 KB, then the disk "is full" (EFBIG).
FSIZE_LIMIT = 128 * 1024
#: Steps, one spool entry each: past the 1,000 entries the memory fallback keeps, so records
#: are lost both while the job runs (the oldest in memory) and at close (the rest of memory).
STEPS = 1300


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def series(url, run, name):
    r = httpx.get(f"{url}/api/v1/runs/{run}/series/{name}", params={"max_points": 1_000_000}, timeout=30)
    if r.status_code == 404:
        return [], []
    r.raise_for_status()
    return r.json()["steps"], [decode_value(v) for v in r.json()["values"]]


def limit_file_size():
    # Python ignores SIGXFSZ itself, so a write past the limit fails with EFBIG (as on a full
    # disk) instead of killing the job: the job sets nothing.
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


def test_full_disk_with_the_server_down_counts_every_loss_and_keeps_the_status(live_server, tmp_path):
    spool, out = tmp_path / "spool", tmp_path / "job.json"
    args = [
        sys.executable,
        str(JOB),
        "--server",
        f"http://127.0.0.1:{closed_port()}",
        "--run",
        "full",
        "--out",
        str(out),
        "--spool",
        str(spool),
        "--steps",
        str(STEPS),
        "--sleep",
        "0",
        "--extra",
        "40",
        "--flush-every-step",
        "--close-timeout",
        "1",
    ]
    env = {**os.environ, "STETHOSCOPE_DIR": str(tmp_path / "home")}
    env.pop("STETHOSCOPE_DISABLED", None)
    job = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, preexec_fn=limit_file_size)
    assert job.returncode == 0 and "Traceback" not in job.stderr, job.stderr[-3000:]
    result = json.loads(out.read_text())
    segments = list(spool.rglob("*.jsonl"))
    assert segments and all(p.read_bytes().endswith(b"\n") for p in segments), "segments hold whole lines only"
    assert result["dropped"] > 0
    assert f"{result['dropped']} records (steps or events) were lost" in job.stderr, job.stderr
    assert "spool disk was full" in job.stderr and "is saved" not in job.stderr, job.stderr

    sync(spool, live_server.url)
    stored, values = series(live_server.url, "full", "loss")
    assert STEPS - len(stored) == result["dropped"], "every record lost is counted, and only those"
    logged = [float(v) for v in result["losses"]]
    assert all(v == logged[s] for s, v in zip(stored, values))
    assert series(live_server.url, "full", "stethoscope/dropped")[1][-1] == result["dropped"]
    run = httpx.get(f"{live_server.url}/api/v1/runs/full", timeout=30).json()
    assert run["status"] == "finished", "the final status survives a full disk"


def spool_with(path: Path, losses: list[float]) -> Spool:
    spool = Spool(path, {"run_id": "torn", "project": "default"})
    for step, loss in enumerate(losses):
        spool.append("points", {"series": [{"name": "loss", "steps": [step], "values": [loss], "walls": [0.0]}]})
    return spool


def test_sync_skips_and_reports_entries_cut_short(live_server, tmp_path, capsys):
    # A job killed mid-write leaves its last line without a newline; a segment that could not
    # be cut back to its last whole line ends torn, and the writer goes on in the next one.
    path = tmp_path / "spool" / "torn" / "w1"
    spool = spool_with(path, [0.5, 1.5, 2.5, 3.5, 4.5])
    spool.close(remove_if_empty=False)
    lines = (path / "000001.jsonl").read_bytes().splitlines(keepends=True)
    (path / "000001.jsonl").write_bytes(lines[0] + lines[1][:20])
    (path / "000002.jsonl").write_bytes(lines[2] + b'{"t":"points","b":{"ser\n' + lines[3] + lines[4][:30])
    assert sync(tmp_path / "spool", live_server.url) == (1, 3)
    assert series(live_server.url, "torn", "loss") == ([0, 2, 3], [0.5, 2.5, 3.5])
    err = capsys.readouterr().err
    assert "3 entries of run torn" in err and "cut short" in err, err
    assert not path.exists(), "the spool is done with, torn ends and all"


class _Closed:
    """What a sender knows after close, for the close message."""

    def __init__(self, dropped=0, spool_dropped=0, status_lost=False, unsent=True):
        self.dropped, self.spool_dropped, self.status_lost, self.unsent = dropped, spool_dropped, status_lost, unsent
        self.spool_path = Path("/spool/r/w")
        self.transport = None


def test_the_close_message_says_what_was_lost_and_never_that_it_is_saved():
    from stethoscope._monitor import _close_message

    assert _close_message("r", "finished", _Closed(unsent=False)) is None
    assert (
        _close_message("r", "finished", _Closed())
        == "stethoscope: run r is saved in /spool/r/w; upload it with `stethoscope sync /spool/r/w`"
    )
    text = _close_message("r", "finished", _Closed(dropped=2, spool_dropped=5, status_lost=True))
    assert "is saved" not in text
    assert "7 records (steps or events) were lost: 2 because the queue was full" in text
    assert "5 because the spool disk was full" in text
    assert "final status ('finished') could not be saved" in text
    assert "what was kept is in /spool/r/w" in text
