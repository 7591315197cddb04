"""The hook against a real server: what is logged arrives, once, in order."""

from __future__ import annotations

import math
import time

import httpx
import torch

import stethoscope
from helpers import TinyNet, read_series, series_names, train


def test_metrics_reach_the_server(live_server, tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = stethoscope.attach(model, opt, project="hooktest", server=live_server.url, config={"lr": 0.1},
                             spool_dir=tmp_path / "spool")
    assert mon.url == f"{live_server.url}/runs/{mon.run_id}"
    losses = train(mon, model, opt, 25)
    mon.log(step=25, loss=float("nan"), custom=float("inf"))
    mon.event("checkpoint", step=25, message="saved", path="/tmp/x")  # about the step just logged
    mon.close()
    steps, values = read_series(live_server.url, mon.run_id, "loss")
    assert steps == list(range(26))
    assert values[:25] == [torch.tensor(v).item() for v in losses]
    assert math.isnan(values[25])
    assert read_series(live_server.url, mon.run_id, "custom") == ([25], [math.inf])
    names = series_names(live_server.url, mon.run_id)
    for expected in ("lr", "grad/norm", "grad/norm/body.0", "grad/norm/head", "grad/nonfinite",
                     "weight/norm/head", "update_ratio/head", "logits/max_abs", "logits/mean_logz",
                     "logits/sc_fraction", "logits/zero_loss_fraction", "logits/median_margin", "logits/entropy"):
        assert expected in names
    run = httpx.get(f"{live_server.url}/api/v1/runs/{mon.run_id}").json()
    assert run["status"] == "finished"
    assert run["project"] == "hooktest"
    events = httpx.get(f"{live_server.url}/api/v1/runs/{mon.run_id}/events").json()
    events = events.get("events", events) if isinstance(events, dict) else events
    assert [(e["kind"], e["step"], e["message"]) for e in events] == [("checkpoint", 25, "saved")]
    # Sent segments are deleted: an online run leaves nothing behind.
    assert not any((tmp_path / "spool").rglob("*.jsonl"))


def test_an_event_lands_at_the_step_the_user_means(live_server, tmp_path):
    """Without ``step=`` an event belongs to the step in progress (the next one logged): a bad
    batch seen before ``log(step=3)`` is listed at 3, not at 2; ``step=`` says it outright."""
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stethoscope.attach(model, opt, server=live_server.url, spool_dir=tmp_path) as mon:
        mon.event("start")  # before the first log: step 0
        train(mon, model, opt, 3)  # steps 0, 1, 2
        mon.event("corrupted_batch", message="corrupted batch at step 3")
        train(mon, model, opt, 1, start=3)
        mon.event("checkpoint", step=3)
        mon.event("note", step=1, message="late note about step 1")
    events = httpx.get(f"{live_server.url}/api/v1/runs/{mon.run_id}/events").json()
    events = events.get("events", events) if isinstance(events, dict) else events
    assert sorted((e["step"], e["kind"]) for e in events) == [
        (0, "start"), (1, "note"), (3, "checkpoint"), (3, "corrupted_batch")]


def test_alerts_in_the_ingest_reply_reach_on_alert(live_server, tmp_path):
    # A NaN loss: the server's divergence detector opens a critical alert on ingest, and the
    # reply carries it back to the job.
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    got = []
    with stethoscope.attach(model, opt, server=live_server.url, spool_dir=tmp_path) as mon:
        mon.on_alert(got.append)
        train(mon, model, opt, 3)
        mon.log(step=3, loss=float("nan"))
        assert mon.flush(10)
    alerts = [a for batch in got for a in batch]
    assert [(a["detector"], a["severity"], a["run_id"]) for a in alerts] == [("divergence", "critical", mon.run_id)]
    assert alerts[0]["peak_step"] == 3


def test_jobs_started_together_do_not_send_in_step(live_server, tmp_path):
    """Jobs launched together (a sweep, the ranks of one job) must not hit the server in the
    same instant every second: each sender's first batch leaves at its own random moment
    (0.5 to 1.5 intervals), and later ones an interval apart, give or take 10%."""
    from stethoscope import _sender

    mons, shipped = [], []
    for i in range(6):
        model = TinyNet()
        mon = stethoscope.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), project="herd",
                                 server=live_server.url, spool_dir=tmp_path / f"s{i}")
        times: list[float] = []
        inner = mon._sender.transport.request

        def request(method, path, payload=None, compress=False, inner=inner, times=times):
            if method == "POST" and path.endswith("/points"):
                times.append(time.monotonic())
            return inner(method, path, payload, compress)

        mon._sender.transport.request = request
        mons.append(mon)
        shipped.append(times)
    start = time.monotonic()
    for step in range(40):  # every job logs at the same moments, 4 s in all
        for mon in mons:
            mon.log(step=step, loss=1.0 / (step + 1))
        time.sleep(max(0.0, start + (step + 1) * 0.1 - time.monotonic()))
    interval = _sender.FLUSH_INTERVAL_S
    firsts = [t[0] - start for t in shipped]
    for times in shipped:
        assert len(times) >= 2, shipped
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert min(gaps) >= interval * (1 - _sender.FLUSH_JITTER) - 0.02, gaps
    # Thread start-up may add a little; nothing leaves before half an interval.
    assert all(interval * (1 - _sender.FIRST_FLUSH_SPREAD) - 0.02 <= f <= interval * (1 + _sender.FIRST_FLUSH_SPREAD) + 0.5 for f in firsts), firsts
    # Six uniform draws over one interval lie within 0.1 of each other with odds of about 1e-4.
    assert max(firsts) - min(firsts) > 0.1 * interval, firsts
    for mon in mons:
        mon.close()
    for mon in mons:
        steps, _ = read_series(live_server.url, mon.run_id, "loss")
        assert steps == list(range(40))
