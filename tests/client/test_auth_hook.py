"""The hook against a real server with authentication and limits on: it streams with
STETHOSCOPE_TOKEN; without one it keeps spooling, warns once and never raises, and ``stethoscope
sync`` uploads the spool later; a rate-limited server (429 + Retry-After) and one that finds a
batch too large (413) lose no point."""

from __future__ import annotations

import logging
import time

import httpx
import pytest
import torch
from helpers import TinyNet, train

import stethoscope
from stethoscope._sync import sync
from stethoscope_server.settings import Settings

ADMIN = "stt_hook-test-admin-token-0123456789"


@pytest.fixture
def extra() -> dict:
    return {}


@pytest.fixture
def settings(db_url, extra):
    return Settings(database_url=db_url, auth="on", admin_token=ADMIN, **{"rate_limit_per_s": 0, **extra})


@pytest.fixture
def admin(live_server):
    with httpx.Client(base_url=live_server.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as c:
        yield c


def ingest_token(admin, project: str = "hook") -> str:
    r = admin.post("/api/v1/tokens", json={"name": "job", "project": project, "scopes": ["ingest"]})
    r.raise_for_status()
    return r.json()["token"]


def get(admin, path: str, **kw) -> httpx.Response:
    """A GET as admin; on a rate-limited server it waits as told (the admin has a bucket too)."""
    for _ in range(20):
        r = admin.get(path, **kw)
        if r.status_code != 429:
            return r
        time.sleep(float(r.headers["retry-after"]))
    raise AssertionError("still rate-limited")


def steps_of(admin, run_id: str, name: str = "loss") -> list[int]:
    return (
        get(admin, f"/api/v1/runs/{run_id}/series/{name}", params={"max_points": 100000})
        .raise_for_status()
        .json()["steps"]
    )


def run_training(live_server, tmp_path, steps: int, flush_every: int | None = None):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = stethoscope.attach(model, opt, project="hook", server=live_server.url, spool_dir=tmp_path / "spool")
    chunk = flush_every or steps
    for start in range(0, steps, chunk):
        train(mon, model, opt, min(chunk, steps - start), start=start)
        mon.flush(10)
    mon.close(timeout=60)
    return mon


def test_hook_streams_with_its_token(live_server, admin, tmp_path, monkeypatch):
    monkeypatch.setenv("STETHOSCOPE_TOKEN", ingest_token(admin))
    mon = run_training(live_server, tmp_path, 20)
    assert steps_of(admin, mon.run_id) == list(range(20))
    assert get(admin, f"/api/v1/runs/{mon.run_id}").json()["status"] == "finished"
    assert not any((tmp_path / "spool").rglob("*.jsonl"))


def test_hook_without_a_token_spools_and_sync_uploads_later(live_server, admin, tmp_path, monkeypatch, caplog, capsys):
    caplog.set_level(logging.WARNING, logger="stethoscope")
    mon = run_training(live_server, tmp_path, 12, flush_every=4)  # never raises into the loop
    refusals = [r for r in caplog.records if "refused run" in r.getMessage()]
    assert len(refusals) == 1 and "STETHOSCOPE_TOKEN" in refusals[0].getMessage()
    assert "stethoscope sync" in capsys.readouterr().err
    assert admin.get(f"/api/v1/runs/{mon.run_id}").status_code == 404
    with pytest.raises(RuntimeError, match="refused the token"):
        sync(tmp_path / "spool", live_server.url)  # still no token: stops, keeps its place
    monkeypatch.setenv("STETHOSCOPE_TOKEN", ingest_token(admin))
    runs, _ = sync(tmp_path / "spool", live_server.url)
    assert runs == 1
    assert steps_of(admin, mon.run_id) == list(range(12))
    assert get(admin, f"/api/v1/runs/{mon.run_id}").json()["status"] == "finished"


@pytest.mark.parametrize("extra", [{"rate_limit_per_s": 2.0, "rate_limit_burst": 1}], ids=["2/s"])
def test_rate_limited_hook_waits_and_loses_no_point(live_server, admin, tmp_path, monkeypatch):
    monkeypatch.setenv("STETHOSCOPE_TOKEN", ingest_token(admin))
    mon = run_training(live_server, tmp_path, 24, flush_every=3)
    gate = live_server.app.state.gate
    assert gate.buckets.refused > 0, "the server never said 429: the test did not test the backoff"
    assert steps_of(admin, mon.run_id) == list(range(24))
    assert steps_of(admin, mon.run_id, "grad/norm") == list(range(24))
    assert get(admin, f"/api/v1/runs/{mon.run_id}").json()["status"] == "finished"


@pytest.mark.parametrize("extra", [{"max_points_per_batch": 40}], ids=["40-points"])
def test_too_large_batches_are_split(live_server, admin, tmp_path, monkeypatch):
    # ~15 series x 30 steps in one batch is ~450 points: the server says 413 and the hook
    # halves the batch (by series, then by steps) until each half fits.
    from stethoscope_server.ops.observability import METRICS

    monkeypatch.setenv("STETHOSCOPE_TOKEN", ingest_token(admin))
    refused_before = METRICS.ingest_requests.get("4xx")
    mon = run_training(live_server, tmp_path, 30)
    assert METRICS.ingest_requests.get("4xx") > refused_before, "no batch was too large: the test tested nothing"
    for name in ("loss", "grad/norm", "logits/max_abs"):
        assert steps_of(admin, mon.run_id, name) == list(range(30)), name
    r = httpx.post(
        f"{live_server.url}/api/v1/runs/{mon.run_id}/points",
        headers={"Authorization": f"Bearer {ADMIN}"},
        json={"series": [{"name": "x", "steps": list(range(41)), "values": [0.0] * 41}]},
    )
    assert r.status_code == 413, "the limit the hook had to work around"
