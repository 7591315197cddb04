"""Steps going backwards: a resume in a new monitor (said, a restart event, both sets of points
kept) against a mistake inside one process (a warning, once); misuse is a ValueError at once."""

from __future__ import annotations

import logging

import httpx
import pytest
import torch
from helpers import TinyNet, read_series, series_names, train

import stethoscope


def _said(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "stethoscope" and r.levelno >= logging.WARNING]


def _events(url, run_id):
    events = httpx.get(f"{url}/api/v1/runs/{run_id}/events").json()
    return events.get("events", events) if isinstance(events, dict) else events


def test_steps_going_back_inside_one_process_warn_once_naming_the_steps(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="stethoscope")
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with stethoscope.attach(model, opt, server="offline", spool_dir=tmp_path) as mon:
        train(mon, model, opt, 10)  # steps 0-9
        assert _said(caplog) == []
        train(mon, model, opt, 3, start=4)  # a bug in the loop: 4, 5, 6 again
        (said,) = _said(caplog)
        assert "step 4 is lower than step 9" in said and mon.run_id in said
        mon.log(step=2, loss=1.0)
        train(mon, model, opt, 5, start=10)
        assert len(_said(caplog)) == 1, "warned once"
        for bad in (-1, 1.5, "3"):
            with pytest.raises(ValueError, match="step must be"):
                mon.log(step=bad, loss=1.0)


def test_a_new_monitor_resuming_a_run_from_a_checkpoint_is_said_marked_and_keeps_both(live_server, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="stethoscope")
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with stethoscope.attach(model, opt, run="resumed", server=live_server.url, spool_dir=tmp_path) as mon:
        first = train(mon, model, opt, 30)  # steps 0-29; the job dies after step 29...
    assert _said(caplog) == []
    # ...and a new process starts again from the checkpoint of step 20, with the same run id.
    model2 = TinyNet()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
    with stethoscope.attach(model2, opt2, run="resumed", server=live_server.url, spool_dir=tmp_path) as mon2:
        second = train(mon2, model2, opt2, 20, start=20)  # steps 20-39
    (said,) = _said(caplog)
    assert "resumes at step 20" in said and "reached step 29" in said and "restart/20/" in said
    url = live_server.url
    as_stored = [torch.tensor(v).item() for v in first + second]
    # The run's series: the first value of each step (steps 20-29 of the first attempt), then on.
    steps, values = read_series(url, "resumed", "loss")
    assert steps == list(range(40)) and values == as_stored[:30] + as_stored[40:]
    # The resumed attempt's steps 20-29 are kept too, next to them.
    steps, values = read_series(url, "resumed", "restart/20/loss")
    assert steps == list(range(20, 30)) and values == as_stored[30:40]
    assert "restart/20/grad/norm" in series_names(url, "resumed")
    (restart,) = [e for e in _events(url, "resumed") if e["kind"] == "restart"]
    assert restart["step"] == 20 and restart["info"] == {"resumed_at": 20, "previous_last_step": 29}

    # A resume past the last step continues the series: a restart event, no copies.
    caplog.clear()
    with stethoscope.attach(model2, opt2, run="resumed", server=url, spool_dir=tmp_path) as mon3:
        train(mon3, model2, opt2, 5, start=40)
    (said,) = _said(caplog)
    assert "resumes at step 40" in said and "restart/" not in said
    assert read_series(url, "resumed", "loss")[0] == list(range(45))
    assert not any(n.startswith("restart/40/") for n in series_names(url, "resumed"))
    assert sorted(e["step"] for e in _events(url, "resumed") if e["kind"] == "restart") == [20, 40]


def test_a_new_run_is_not_a_resume(live_server, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="stethoscope")
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with stethoscope.attach(model, opt, run="fresh", server=live_server.url, spool_dir=tmp_path) as mon:
        mon.event("note")  # an event before any point: still not a resume
        train(mon, model, opt, 5)
    assert _said(caplog) == []
    assert [e["kind"] for e in _events(live_server.url, "fresh")] == ["note"]
