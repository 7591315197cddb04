"""The hook against a real server: what is logged arrives, once, in order."""

from __future__ import annotations

import math
import queue
import random
import time

import httpx
import pytest
import torch
from helpers import TinyNet, read_series, series_names, train

import stethoscope


def test_metrics_reach_the_server(live_server, tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = stethoscope.attach(
        model, opt, project="hooktest", server=live_server.url, config={"lr": 0.1}, spool_dir=tmp_path / "spool"
    )
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
    for expected in (
        "lr",
        "grad/norm",
        "grad/norm/body.0",
        "grad/norm/head",
        "grad/nonfinite",
        "weight/norm/head",
        "update_ratio/head",
        "logits/max_abs",
        "logits/mean_logz",
        "logits/sc_fraction",
        "logits/zero_loss_fraction",
        "logits/median_margin",
        "logits/entropy",
    ):
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
        (0, "start"),
        (1, "note"),
        (3, "checkpoint"),
        (3, "corrupted_batch"),
    ]


def test_alerts_in_the_ingest_reply_reach_on_alert(live_server, tmp_path):
    # A NaN loss: the server's divergence detector opens a critical alert on ingest, and the
    # reply carries it back to the job (the hook's own detectors are off here; with them on,
    # the hook delivers it first and the reply's copy is dropped: test_hook_detection.py).
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    got = []
    with stethoscope.attach(model, opt, server=live_server.url, spool_dir=tmp_path, detectors=False) as mon:
        mon.on_alert(got.append)
        train(mon, model, opt, 3)
        mon.log(step=3, loss=float("nan"))
        assert mon.flush(10)
    alerts = [a for batch in got for a in batch]
    assert [(a["detector"], a["severity"], a["run_id"]) for a in alerts] == [("divergence", "critical", mon.run_id)]
    assert alerts[0]["peak_step"] == 3 and alerts[0]["source"] == "server" and isinstance(alerts[0]["id"], int)


class _Clock:
    """A clock that moves only when the test moves it."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class _Edges(random.Random):
    """A generator whose ``uniform`` draws the low end, then the high end, in turn."""

    def __init__(self) -> None:
        super().__init__(0)
        self.high = False

    def uniform(self, a, b):
        x = b if self.high else a
        self.high = not self.high
        return x


def test_the_ship_schedule_spreads_the_first_batch_and_jitters_the_rest():
    """The first batch leaves after 0.5 to 1.5 intervals, each later one an interval after the
    previous, give or take 10%: the bounds, computed on an injected clock."""
    from stethoscope._sender import FIRST_FLUSH_SPREAD, FLUSH_INTERVAL_S, FLUSH_JITTER, ShipSchedule

    clock = _Clock()
    schedule = ShipSchedule(_Edges(), clock)  # the low end first
    assert schedule.next_at == pytest.approx(100.0 + FLUSH_INTERVAL_S * (1 - FIRST_FLUSH_SPREAD))
    assert schedule.wait() == pytest.approx(FLUSH_INTERVAL_S * (1 - FIRST_FLUSH_SPREAD)) and not schedule.due()
    clock.t = schedule.next_at
    assert schedule.due() and schedule.wait() == 0.0
    schedule.shipped()  # the high end
    assert schedule.next_at - clock.t == pytest.approx(FLUSH_INTERVAL_S * (1 + FLUSH_JITTER))
    clock.t += 5.0  # shipped late (the thread was busy): the next one is an interval after that
    schedule.shipped()  # the low end
    assert schedule.next_at - clock.t == pytest.approx(FLUSH_INTERVAL_S * (1 - FLUSH_JITTER))


def test_jobs_started_together_do_not_send_in_step():
    """Jobs launched together (a sweep, the ranks of one job) must not hit the server in the
    same instant every second: each sender's first batch leaves at its own random moment, and
    later ones an interval apart, give or take 10%. Six schedules started at one instant on an
    injected clock, each with its own generator as each sender has, shipping when due."""
    from stethoscope._sender import FIRST_FLUSH_SPREAD, FLUSH_INTERVAL_S, FLUSH_JITTER, ShipSchedule

    clock = _Clock(0.0)
    schedules = [ShipSchedule(random.Random(seed), clock) for seed in range(6)]
    shipped: list[list[float]] = [[] for _ in schedules]
    while clock.t < 20 * FLUSH_INTERVAL_S:
        clock.t = min(s.next_at for s in schedules)  # the next moment any sender is due
        for s, times in zip(schedules, shipped):
            if s.due():
                times.append(clock.t)
                s.shipped()
    firsts = [t[0] for t in shipped]
    lo, hi = FLUSH_INTERVAL_S * (1 - FIRST_FLUSH_SPREAD), FLUSH_INTERVAL_S * (1 + FIRST_FLUSH_SPREAD)
    assert all(lo <= f <= hi for f in firsts), firsts
    assert max(firsts) - min(firsts) > 0.1 * FLUSH_INTERVAL_S, firsts
    lo, hi = FLUSH_INTERVAL_S * (1 - FLUSH_JITTER), FLUSH_INTERVAL_S * (1 + FLUSH_JITTER)
    for times in shipped:
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert len(gaps) >= 15 and all(lo <= g <= hi for g in gaps), gaps
    moments = [t for times in shipped for t in times]
    assert len(set(moments)) == len(moments)  # no two senders ship at one moment


def test_each_sender_runs_its_own_schedule(live_server, tmp_path, monkeypatch):
    """The sender ships on a ``ShipSchedule`` with a generator of its own (so jobs whose users
    seed ``random`` alike still spread out); what every job logs arrives whole."""
    from stethoscope import _sender

    made = []

    class Recorded(_sender.ShipSchedule):
        def __init__(self, rng, clock=time.monotonic):
            super().__init__(rng, clock)
            made.append(rng)

    monkeypatch.setattr(_sender, "ShipSchedule", Recorded)
    mons = []
    for i in range(3):
        model = TinyNet()
        mons.append(
            stethoscope.attach(
                model,
                torch.optim.SGD(model.parameters(), lr=0.1),
                project="herd",
                server=live_server.url,
                spool_dir=tmp_path / f"s{i}",
            )
        )
    for step in range(40):
        for mon in mons:
            mon.log(step=step, loss=1.0 / (step + 1))
    for mon in mons:
        mon.close()
    assert len(made) == 3 and len({id(r) for r in made}) == 3
    assert all(type(r) is random.Random and r is not random._inst for r in made)
    for mon in mons:
        steps, _ = read_series(live_server.url, mon.run_id, "loss")
        assert steps == list(range(40))


class _WakeSpy:
    """Stands in for a ``RecordQueue``'s wake-up event: notes each wait's timeout and each
    ``set``; during the first wait the ``arriving`` records are put on the queue, and a wait
    returns ``woken``."""

    def __init__(self, q, arriving=(), woken=True):
        self.q, self.arriving, self.woken = q, list(arriving), woken
        self.waits, self.sets = [], 0

    def wait(self, timeout):
        self.waits.append(timeout)
        for item in self.arriving:
            self.q.put_nowait(item)
        self.arriving = []
        return self.woken

    def set(self):
        self.sets += 1

    def clear(self):
        pass


@pytest.mark.parametrize("arriving", [["a"], ["a", "b"]], ids=["woken-by-one", "drained-several"])
def test_once_records_come_the_sender_polls_instead_of_being_woken_by_each(arriving):
    """An idle sender is woken by the first record of a run; from then on records are flowing
    and its next look polls (waits ``POLL_INTERVAL_S``, woken by nobody), whether the wake-up
    brought one record or it drained several (``RecordQueue.take``). Going idle again after
    each record would have every step's record wake it: the thread switch and the GIL cost a
    ~1 ms step more than the record itself (on the tiny MLP of benchmarks/hook_overhead.py the
    median log() took twice as long)."""
    from stethoscope import _sender

    q = _sender.RecordQueue(100)

    q._wake = spy = _WakeSpy(q, arriving)  # records arrive while the consumer waits
    taken = [q.get(timeout=1.0)]  # idle: waited to be woken, then took the first
    while (item := q.take()) is not None:  # and the rest, in order
        taken.append(item)
    assert taken == arriving
    with pytest.raises(queue.Empty):
        q.get(timeout=1.0)
    assert spy.waits == [1.0, _sender.POLL_INTERVAL_S]  # the second look polls, not an idle wait
    sets = spy.sets
    q.put_nowait("c")
    assert spy.sets == sets  # a polling consumer is woken by nobody
    assert q.get(timeout=1.0) == "c"
    for _ in range(2):
        with pytest.raises(queue.Empty):
            q.get(timeout=1.0)
    # a poll, and when it found nothing, idle again: the next record (a slow step) wakes it
    assert spy.waits[-2:] == [_sender.POLL_INTERVAL_S, 1.0]


def test_a_quiet_consumer_waits_for_its_batch_unless_records_pile_up_or_one_is_urgent():
    """With ``poll=None`` (no on_alert callback: nothing reads a record before its batch ships)
    the consumer waits its whole timeout, whether records flowed or not, and a step's record
    does not wake it, idle or not, until ``QUIET_LOOK_RECORDS`` wait; an urgent record (a
    flush, an event, a NaN) still does."""
    from stethoscope import _sender

    q = _sender.RecordQueue(10_000)

    q._wake = spy = _WakeSpy(q, woken=False)
    with pytest.raises(queue.Empty):
        q.get(timeout=1.0, poll=None)  # nothing came: a quiet consumer does not go idle
    for i in range(_sender.QUIET_LOOK_RECORDS):
        q.put_nowait(("points", i))
    assert spy.sets == 0  # records do not wake it, though it found none at its last look
    assert [q.get(timeout=1.0, poll=None) for _ in range(3)] == [("points", i) for i in range(3)]
    while q.take() is not None:
        pass
    with pytest.raises(queue.Empty):
        q.get(timeout=0.7, poll=None)  # records flowed: still the whole wait, no poll
    assert spy.waits == [1.0, 0.7]
    for i in range(_sender.QUIET_LOOK_RECORDS + 1):
        q.put_nowait(("points", i))
    assert spy.sets == 1  # past QUIET_LOOK_RECORDS waiting records, a put wakes it
    while q.take() is not None:
        pass
    q.put_nowait(("flush", None), urgent=True)
    assert spy.sets == 2


def test_the_sender_looks_at_each_batch_until_an_on_alert_callback_listens(tmp_path, monkeypatch):
    """Without an on_alert callback the hook's detectors wait and the sender thread looks at
    the queue only when its batch is due (``poll=None``); once a callback is registered it
    looks every ``POLL_INTERVAL_S``, so the callback hears of a step soon after it is logged."""
    from stethoscope import _sender

    polls = []
    get = _sender.RecordQueue.get

    def spy(self, timeout, poll=_sender.POLL_INTERVAL_S):
        polls.append(poll)
        return get(self, timeout, poll)

    monkeypatch.setattr(_sender.RecordQueue, "get", spy)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = stethoscope.attach(model, opt, run="quiet", server="offline", spool_dir=tmp_path)
    train(mon, model, opt, 30)
    assert mon.flush(10)
    quiet = len(polls)
    assert quiet and set(polls) == {None}
    mon.on_alert(lambda alerts: None)
    deadline = time.monotonic() + 10
    step = 30
    while _sender.POLL_INTERVAL_S not in polls[quiet:] and time.monotonic() < deadline:
        train(mon, model, opt, 1, start=step)
        step += 1
        time.sleep(0.01)
    mon.close()
    assert _sender.POLL_INTERVAL_S in polls[quiet:]


def test_spool_lines_are_what_json_dumps_writes(tmp_path, monkeypatch):
    """The spool writes a points entry with each shared steps or walls column encoded once
    (``_spool._points_line``): each line must be byte for byte ``json.dumps`` of the entry it
    was given, on a real run's batches (every series sharing its steps and walls, a NaN loss
    encoded, a scalar logged at other steps, the final status) and on bodies of other shapes."""
    import json

    from stethoscope import _spool

    given = []
    append = _spool.Spool.append

    def spy(self, kind, body):
        given.append((kind, json.loads(json.dumps(body))))  # a copy, as it was handed over
        return append(self, kind, body)

    monkeypatch.setattr(_spool.Spool, "append", spy)
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stethoscope.attach(model, opt, run="lines", server="offline", spool_dir=tmp_path) as mon:
        train(mon, model, opt, 30)
        mon.log(step=30, loss=math.nan)
        for step in range(31, 40, 3):
            mon.log(step=step, loss=1.0, **{"eval/acc": 0.5 + step / 100})
    lines = [line for seg in sorted(tmp_path.rglob("*.jsonl")) for line in seg.read_bytes().splitlines(keepends=True)]
    assert [k for k, _ in given] == [json.loads(line)["t"] for line in lines]
    assert {"points", "status"} <= {k for k, _ in given}
    shared = 0
    for (kind, body), line in zip(given, lines):
        assert line == (json.dumps({"t": kind, "b": body}, separators=(",", ":"), allow_nan=False) + "\n").encode()
        if kind == "points":
            walls = [tuple(s["walls"]) for s in body["series"]]
            shared += len(walls) - len(set(walls))
    assert shared > 0, "no series shared its walls: the case the spool encodes once is not exercised"
    odd = {"series": [{"name": "x", "steps": [1], "values": ["NaN"], "walls": [1.5], "extra": 1}]}
    assert _spool._line("points", odd) == (json.dumps({"t": "points", "b": odd}, separators=(",", ":")) + "\n").encode()
    # a column of one repeated value is encoded once; values that equal it but print otherwise
    for values in ([0.1, 0.1, 0.1], [0.1, 0.1, 0.2], [3.0, 3, 3.0], [1.0, True], [0.0, -0.0], [2.5, 2.5, "NaN"]):
        body = {
            "series": [{"name": "c", "steps": [1, 2, 3][: len(values)], "values": values, "walls": [1.0] * len(values)}]
        }
        want = (json.dumps({"t": "points", "b": body}, separators=(",", ":")) + "\n").encode()
        assert _spool._line("points", body) == want, values


def test_a_batch_makes_the_columns_of_its_records_point_by_point():
    """``Batch.add`` keeps rows and turns runs of records with the same names into columns
    later; the columns, their order and the spool entries must be those of adding every point
    in record order: runs broken by other names, a name twice in one record (its points in
    record order), device values before host values, ``set_point`` and ``add_point`` between
    records, a non-finite value."""
    from stethoscope._batch import Batch

    def finish(names, ops, packed):
        return list(packed)

    cheap = ["loss", "grad/norm", "lr"]
    records = [("points", s, 100.0 + s, (), (), None, None, list(cheap), [s + 0.5, 2.0 * s, 0.1]) for s in range(4)]
    records.append(("points", 4, 104.0, ("grad/norm/a",), (0,), [9.0], None, ["loss", "grad/norm"], [4.5, 8.0]))
    records += [
        ("points", s, 100.0 + s, (), (), None, None, ["loss", "x", "loss"], [s + 0.5, 1.0, s + 1.5]) for s in (5, 6)
    ]
    records += [("points", s, 100.0 + s, (), (), None, None, list(cheap), [s + 0.5, math.inf, 0.1]) for s in (7, 8)]
    records.append(("points", 9, 109.0, (), (), None, None, ["y"], [3.0]))

    expected: dict = {}

    def point(name, step, value, wall):
        col = expected.setdefault(name, ([], [], []))
        col[0].append(step)
        col[1].append(value)
        col[2].append(wall)

    batch = Batch(finish)
    seen = []
    for i, rec in enumerate(records):
        seen.append(batch.add(rec))
        _, step, wall, names, _, packed, _, host_names, host_values = rec
        for name, v in zip([*names, *host_names], [*(packed or ()), *host_values]):
            point(name, step, v, wall)
        if i == 2:
            batch.set_point("lr", step, 0.2)  # the last point of a series still in rows: replaced
            expected["lr"][1][-1] = 0.2
            batch.set_point("errors", step, 1.0)
            batch.set_point("errors", step, 2.0)  # the same step: replaced
            point("errors", step, 2.0, None)
    batch.add_point("z", 10, 7.0, wall=110.0)
    point("z", 10, 7.0, 110.0)
    assert seen[4] == (4, ("grad/norm/a", "loss", "grad/norm"), (9.0, 4.5, 8.0))
    assert batch.points == sum(len(c[0]) for c in expected.values())
    series = batch.series
    assert list(series) == list(expected)
    for name, (steps, values, walls) in expected.items():
        assert series[name][0] == steps and series[name][1] == values, name
        if name != "errors":
            assert series[name][2] == walls, name
    (kind, body), *rest = batch.take()
    assert kind == "points" and not rest
    assert [s["name"] for s in body["series"]] == list(expected)
    assert body["series"][1]["values"] == [0.0, 2.0, 4.0, 6.0, 8.0, "Infinity", "Infinity"]
    assert body["series"][0]["values"] == [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 6.5, 7.5, 7.5, 8.5]
    assert batch.series == {} and batch.points == 0


def test_the_queue_wake_up_behaves_as_an_event():
    """``_sender.Wake`` stands in for ``threading.Event`` on the record queue: set, clear and
    a timed wait, a set from another thread waking the waiter, the flag left up by a wait."""
    import threading

    from stethoscope._sender import Wake

    wake = Wake()
    assert not wake.is_set()
    assert wake.wait(0.05) is False
    assert wake.wait(-1.0) is False  # a timeout already past: no wait
    wake.set()
    wake.set()  # twice: still up once
    assert wake.is_set() and wake.wait(10.0) is True and wake.is_set()  # left up, as Event does
    wake.clear()
    wake.clear()
    assert not wake.is_set() and wake.wait(0.0) is False
    timer = threading.Timer(0.05, wake.set)
    timer.start()
    assert wake.wait(10.0) is True  # woken by the other thread
    timer.join()
