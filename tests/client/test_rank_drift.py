"""Ranks drifting apart: real DDP over gloo, two CPU processes, one rank perturbed (slow)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import read_series, series_names
from live_servers import free_port

import stethoscope
from stethoscope import _ranks
from stethoscope.core.detectors import DetectorSet

HERE = Path(__file__).parent
EVERY, AT = 10, 33  # rank_drift_worker's check spacing and the step rank 1 goes wrong


def run_ranks(scenario, url, tmp_path, errors=((), ())):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "rank_drift_worker.py"), scenario, str(r), "2", str(port), url]
            + [str(tmp_path / f"spool{r}"), str(tmp_path / f"rank{r}.json")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [[e.split(":")[0] for e in r["internal_errors"]] for r in ranks] == [list(e) for e in errors]
    assert ranks[0]["checks"] == ranks[1]["checks"] == 6  # steps 0, 10, ..., 50 on both ranks
    return ranks


@pytest.mark.slow
def test_a_healthy_ddp_run_has_equal_replicas_and_no_alert(live_server, tmp_path):
    ranks = run_ranks("healthy", live_server.url, tmp_path)
    assert ranks[0]["alerts"] == []
    run_id = ranks[0]["run_id"]
    assert read_series(live_server.url, run_id, "ddp/ranks_disagreeing") == ([0, 10, 20, 30, 40, 50], [0.0] * 6)
    assert read_series(live_server.url, run_id, "ddp/param_checksum_spread")[1] == [0.0] * 6  # exactly equal
    assert not any(n.startswith("ddp/rank_drift/") for n in series_names(live_server.url, run_id))
    alerts = live_server_alerts(live_server.url, run_id)
    assert [a for a in alerts if a["detector"] == "rank_drift"] == []


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["nudge", "skip"])
def test_a_rank_that_drifts_is_named_within_one_check(scenario, live_server, tmp_path):
    ranks = run_ranks(scenario, live_server.url, tmp_path)
    first_check = (AT // EVERY + 1) * EVERY  # the first check after the fault: step 40
    (alert,) = [a for a in ranks[0]["alerts"] if a["detector"] == "rank_drift"]
    assert alert["severity"] == "critical" and alert["start_step"] == first_check
    assert alert["evidence"]["ranks"] == [1]
    assert f"at step {first_check}: rank 1 no longer holds" in alert["message"]
    run_id = ranks[0]["run_id"]
    steps, count = read_series(live_server.url, run_id, "ddp/ranks_disagreeing")
    assert steps == [0, 10, 20, 30, 40, 50] and count == [0, 0, 0, 0, 1, 1]
    _, spread = read_series(live_server.url, run_id, "ddp/param_checksum_spread")
    assert spread[:4] == [0.0] * 4 and all(s > 0 for s in spread[4:])
    assert read_series(live_server.url, run_id, "ddp/rank_drift/1")[0] == [40, 50]
    server = [a for a in live_server_alerts(live_server.url, run_id) if a["detector"] == "rank_drift"]
    assert [(a["start_step"], a["severity"]) for a in server] == [(first_check, "critical")]


@pytest.mark.slow
def test_a_failing_check_never_reaches_the_training_loop_nor_hangs_the_others(live_server, tmp_path):
    # rank 1's checksums raise at the checks of steps 40 and 50: swallowed and counted there,
    # and its failed row still joins the gather; rank 0 leaves it out of the comparison
    ranks = run_ranks("broken", live_server.url, tmp_path, errors=((), ("rank check", "rank check")))
    assert ranks[0]["alerts"] == []
    count = read_series(live_server.url, ranks[0]["run_id"], "ddp/ranks_disagreeing")
    assert count == ([0, 10, 20, 30, 40, 50], [0.0] * 6)


def live_server_alerts(url, run_id):
    import httpx

    r = httpx.get(f"{url}/api/v1/runs/{run_id}/alerts", timeout=30)
    r.raise_for_status()
    body = r.json()
    return body["alerts"] if isinstance(body, dict) else body


def test_misuse_raises_at_once():
    model = torch.nn.Linear(2, 2)
    for bad in (0, -5, True, 2.5, "50"):
        with pytest.raises(ValueError, match="rank_check_every"):
            stethoscope.attach(model, server="offline", rank_check_every=bad)


def test_summary_names_the_rank_off_the_majority_and_ignores_equal_ranks():
    ok = [1.0, 10.0, 12345.0, 7.0, 4.0]  # computed, elements, weights' checksum, state's, squared norm
    off = [1.0, 10.0, 12346.0, 7.0, 4.0 * 1.001**2]
    rows = torch.tensor([ok, ok, off, ok], dtype=torch.float64)
    spread, count, *drift = _ranks.summarise(rows)
    assert count == 1.0 and drift[0] is drift[1] is drift[3] is None
    assert drift[2] == pytest.approx(1e-3) and spread == drift[2]
    # two ranks, each its own group: the one holding rank 0 is the reference
    spread, count, d0, d1 = _ranks.summarise(torch.tensor([ok, off], dtype=torch.float64))
    assert count == 1.0 and d0 is None and d1 == pytest.approx(1e-3)
    # equal norms but different bits, or a different optimizer state: disagreeing, at distance 0
    for other in ([1.0, 10.0, 99.0, 7.0, 4.0], [1.0, 10.0, 12345.0, 8.0, 4.0]):
        assert _ranks.summarise(torch.tensor([ok, other], dtype=torch.float64)) == [0.0, 1.0, None, 0.0]
    # norms that differ by reduction order alone, with equal checksums: agreeing
    assert _ranks.summarise(torch.tensor([ok, ok[:4] + [4.0 + 1e-12]], dtype=torch.float64))[:2] == [0.0, 0.0]
    # a rank whose check failed (column 0 is 0) is left out; ranks of different sizes are not compared
    failed = [0.0] * 5
    assert _ranks.summarise(torch.tensor([ok, failed], dtype=torch.float64))[:2] == [0.0, 0.0]
    other = [1.0, 11.0] + ok[2:]
    assert _ranks.summarise(torch.tensor([ok, other], dtype=torch.float64)) == [None] * 4


def test_the_bit_checksum_sees_one_changed_weight_and_not_the_order():
    w = torch.randn(1000)
    base = _ranks._bits(w)
    assert _ranks._bits(w.flip(0)) == base  # order-free
    nudged = w.clone()
    nudged[500] = torch.nextafter(nudged[500], torch.tensor(math.inf))  # one ulp
    assert _ranks._bits(nudged) != base
    assert _ranks._bits(w.half()) is not None and _ranks._bits(torch.randn(3).half()) is not None


def test_the_detector_honours_its_tolerance():
    def check(s, spread, drift):
        pts = [("ddp/param_checksum_spread", s, spread), ("ddp/ranks_disagreeing", s, float(bool(drift)))]
        return pts + ([("ddp/rank_drift/3", s, drift)] if drift else [])

    pts = check(0, 0.0, 0.0) + check(50, 1e-8, 1e-8) + check(100, 1e-4, 1e-4)
    strict = DetectorSet().update({}, pts)
    assert [(c.action, c.start_step, c.evidence["ranks"]) for c in strict] == [("open", 50, [3])]
    loose = DetectorSet({"rank_drift": {"tolerance": 1e-6}}).update({}, pts)
    assert [(c.action, c.start_step) for c in loose] == [("open", 100)]
    # replicas made equal again (a reload from a checkpoint): the episode resolves
    state: dict = {}
    ds = DetectorSet()
    ds.update(state, check(0, 1e-4, 1e-4))
    (c,) = ds.update(state, check(50, 0.0, 0.0))
    assert c.action == "resolve"
    with pytest.raises(ValueError, match="tolerance"):
        DetectorSet({"rank_drift": {"tolerance": -1.0}})
