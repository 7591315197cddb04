"""Detection in the hook: the detectors run in the sender thread, step by step, online and offline.

Real tiny seeded trainings. A run blows up when its learning rate jumps to 1e38: the step after
the jump logs a NaN loss. Where a test needs to know what ``on_alert`` had heard by a given
step, the loop calls ``mon.flush()`` after each ``log()``: the sender thread takes records in
order, so when the flush returns the record of that step has been through the detectors.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import httpx
import pytest
import torch
import torch.nn.functional as F
from helpers import TinyNet, batch, spooled_points, train, train_step

import stethoscope
from stethoscope._watch import DETECTOR_ERRORS, Watch
from stethoscope.core.detectors import DETECTORS, OPEN, DetectorSet, severity_rank

JUMP_STEP = 40  # the learning rate jumps here; the next step's loss is NaN
STEPS = 50


#: The keys of an alert ``on_alert`` receives, from the hook or from the server's reply.
ALERT_KEYS = {
    "id",
    "run_id",
    "project",
    "detector",
    "key",
    "severity",
    "status",
    "start_step",
    "peak_step",
    "end_step",
    "message",
    "evidence",
    "first_detection",
    "cause",
    "cause_alert_id",
    "opened_at",
    "resolved_at",
    "acknowledged_at",
    "source",
}


def relu_net():
    # ReLU (not tanh) lets the weights' infinities through to the loss as NaN.
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def blow_up(mon, model, opt, steps=STEPS, jump_lr=1e38, flush_each=False, seen_at=None, got=None):
    """Train; the learning rate jumps to ``jump_lr`` at ``JUMP_STEP``. Returns the first step
    whose loss is not finite (None if none). With ``flush_each``, ``seen_at[step]`` holds what
    ``on_alert`` had received (``got``) once that step's record went through the sender thread."""
    first_bad = None
    for step in range(steps):
        if step == JUMP_STEP:
            for g in opt.param_groups:
                g["lr"] = jump_lr
        loss = train_step(mon, model, opt, step)
        if flush_each:
            assert mon.flush(10)
            seen_at[step] = list(got)
        if first_bad is None and not math.isfinite(loss.item()):
            first_bad = step
    return first_bad


def opens_and_escalations(changes):
    """What ``on_alert`` should hear of, given the detectors' changes in order: each episode
    the first time it is open, and again each time its severity rises (stethoscope._watch)."""
    worst, out = {}, []
    for c in changes:
        k = (c.detector, c.key, c.start_step)
        if c.status == "open" and severity_rank(c.severity) > worst.get(k, -1):
            worst[k] = severity_rank(c.severity)
            out.append((*k, c.severity, c.cause))
    return out


def divergences(alerts):
    return [a for a in alerts if a["detector"] == "divergence" and a["key"] == "nonfinite"]


def test_offline_a_nan_reaches_on_alert_at_its_step(tmp_path):
    model = relu_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    got, seen_at = [], {}
    with stethoscope.attach(model, opt, run="hook-nan", server="offline", spool_dir=tmp_path) as mon:
        mon.on_alert(got.extend)
        nan_step = blow_up(mon, model, opt, flush_each=True, seen_at=seen_at, got=got)
    assert nan_step == JUMP_STEP + 1  # the phenomenon is there: one step after the jump
    (alert,) = divergences(got)  # once, though every later step is NaN too
    assert alert["severity"] == "critical" and alert["status"] == "open"
    assert alert["start_step"] == nan_step and alert["first_detection"]["step"] == nan_step
    assert (alert["source"], alert["id"], alert["cause"], alert["run_id"]) == ("hook", None, None, "hook-nan")
    assert "diverged" in alert["message"] and set(alert) == ALERT_KEYS
    # Heard of before the loop logged step NaN + 2 (in fact at the NaN's own step).
    heard = min(s for s, alerts in seen_at.items() if divergences(alerts))
    assert heard <= nan_step + 1
    assert not divergences(seen_at[nan_step - 1])  # and not before there was anything to hear


def test_online_the_divergence_is_delivered_once(live_server, tmp_path):
    """The hook delivers first; the server's reply lists the same episodes (it is the record)
    and none of them reaches ``on_alert`` a second time."""
    model = relu_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    got = []
    with stethoscope.attach(model, opt, project="hookdet", server=live_server.url, spool_dir=tmp_path) as mon:
        mon.on_alert(got.extend)
        nan_step = blow_up(mon, model, opt)
    (alert,) = divergences(got)
    assert (alert["start_step"], alert["severity"], alert["source"]) == (nan_step, "critical", "hook")
    stored = httpx.get(f"{live_server.url}/api/v1/runs/{mon.run_id}/alerts", timeout=30).json()
    server_episodes = {(a["detector"], a["key"], a["start_step"]) for a in stored}
    assert ("divergence", "nonfinite", nan_step) in server_episodes  # the server opened it too
    delivered = Counter((a["detector"], a["key"], a["start_step"]) for a in got)
    assert set(delivered) == server_episodes  # the same episode keys on both sides
    assert max(delivered.values()) == 1  # and each delivered once in total
    assert {a["source"] for a in got} == {"hook"}


def test_server_alerts_the_hook_did_not_see_are_delivered(live_server, tmp_path):
    # Divergence off in the hook (not on the server): the server's alert reaches the job as before.
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    got = []
    off = {"divergence": {"enabled": False}}
    with stethoscope.attach(model, opt, server=live_server.url, spool_dir=tmp_path, detectors=off) as mon:
        mon.on_alert(got.extend)
        train(mon, model, opt, 3)
        mon.log(step=3, loss=float("nan"))
        assert mon.flush(10)
    (alert,) = divergences(got)
    assert alert["source"] == "server" and isinstance(alert["id"], int) and alert["start_step"] == 3
    assert set(alert) == ALERT_KEYS and alert["cause"] is None


def test_server_consequences_name_their_root_as_hook_alerts_do(live_server, tmp_path):
    """With the hook's detectors off, the server's alerts of an incident (a learning rate
    jumping to 1e20: the loss jumps, the logits go one-hot) reach the job with ``cause`` made
    from ``cause_alert_id``: the root's episode, as a hook alert names it."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    got = []
    # every=1: the consequence (Softmax Collapse) needs the logit statistics of every step
    with stethoscope.attach(model, opt, server=live_server.url, spool_dir=tmp_path, detectors=False, every=1) as mon:
        mon.on_alert(got.extend)
        blow_up(mon, model, opt, steps=JUMP_STEP + 60, jump_lr=1e20)
    assert got and {a["source"] for a in got} == {"server"}
    by_id = {a["id"]: a for a in got}
    consequences = [a for a in got if a["cause_alert_id"] is not None]
    assert consequences, "the incident has no consequence: the scenario no longer shows one"
    for a in consequences:
        root = by_id[a["cause_alert_id"]]
        assert a["cause"] == {
            "detector": root["detector"],
            "key": root["key"],
            "start_step": root["start_step"],
            "alert_id": root["id"],
        }
    assert all(a["cause"] is None for a in got if a["cause_alert_id"] is None)


def test_detectors_false_leaves_an_offline_run_without_alerts(tmp_path):
    model = relu_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    got = []
    with stethoscope.attach(model, opt, server="offline", spool_dir=tmp_path, detectors=False) as mon:
        mon.on_alert(got.extend)
        assert blow_up(mon, model, opt) == JUMP_STEP + 1
    assert got == []


def test_a_healthy_run_raises_no_hook_alert(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    got = []
    # A task it can learn (the label is the largest of the first four inputs): on random labels
    # (``helpers.batch``) the loss stays at log 4 and the plateau detector rightly says so.
    losses = []
    # The step time of a real run on a shared machine is not this test's to control (another
    # job slowing it 1.5x for 50 steps is what slow_steps is for): it is tested on an injected
    # clock in test_slow_steps.py.
    quiet = {"slow_steps": {"enabled": False}}
    with stethoscope.attach(model, opt, server="offline", spool_dir=tmp_path, detectors=quiet) as mon:
        mon.on_alert(got.extend)
        for step in range(300):
            x, _ = batch(seed=step)
            y = x[:, :4].argmax(1)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log(step=step, loss=loss, logits=logits, targets=y)
            losses.append(loss.item())
        assert mon.flush(10)
    assert sum(losses[-20:]) < 0.5 * sum(losses[:20])  # it trained
    assert got == [] and mon.detector_errors == 0


def test_on_alert_hears_the_opens_and_escalations_the_detectors_give_on_the_runs_own_points(tmp_path):
    """An incident on a real training (a learning rate jumping to 1e20 with a tanh net: the loss
    jumps by 1e19 and the logits go one-hot, no NaN). What ``on_alert`` heard is exactly the
    openings and escalations of a ``DetectorSet`` fed the run's spooled points step by step,
    with their causes: a consequence is delivered, naming a root delivered before it."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    got = []
    # every=1: the consequence (Softmax Collapse) needs the logit statistics of every step
    with stethoscope.attach(model, opt, server="offline", spool_dir=tmp_path, every=1) as mon:
        mon.on_alert(got.extend)
        blow_up(mon, model, opt, steps=JUMP_STEP + 60, jump_lr=1e20)
    by_step: dict = {}
    for name, col in spooled_points(tmp_path).items():
        for step, v in col.items():
            by_step.setdefault(step, []).append((name, step, v))
    dset, state, changes = DetectorSet(), {}, []
    for step in sorted(by_step):
        changes += dset.update(state, by_step[step])
    delivered = [(a["detector"], a["key"], a["start_step"], a["severity"], a["cause"]) for a in got]
    assert delivered == opens_and_escalations(changes)
    consequences = [a for a in got if a["cause"] is not None]
    assert consequences, "the incident has no consequence: the scenario no longer shows one"
    for a in consequences:
        root = a["cause"]
        assert (root["detector"], root["key"], root["start_step"]) in {
            (r["detector"], r["key"], r["start_step"]) for r in got[: got.index(a)]
        }


def test_an_escalation_is_delivered_and_a_peak_a_resolution_or_a_return_is_not():
    """The Watch on its own, fed host values step by step as the sender thread feeds it: a loss
    that runs away (a warning), then turns NaN (the same episode, escalated), stays NaN (updates),
    recovers (resolved) and runs away again soon after (the same episode, continued)."""
    only_divergence = {name: {"enabled": name == "divergence"} for name in DETECTORS}
    got = []
    watch = Watch(DetectorSet(only_divergence), "r", "p", [got.append])
    reference, state, changes = DetectorSet(only_divergence), {}, []
    losses = [1.0 + 0.01 * (i % 3) for i in range(60)] + [3.0] * 40 + [math.nan] * 5
    losses += [1.0] * 10 + [3.0] * 40
    for step, loss in enumerate(losses):
        watch.points(step, ("loss", "other/series"), (loss, 1.0))
        changes += reference.update(state, [("loss", step, loss)])
    actions = [(c.action, c.severity) for c in changes]
    # The scenario shows each kind of change, in the detectors as they are now.
    assert (OPEN, "warning") in actions and ("update", "critical") in actions and ("resolve", "critical") in actions
    assert actions.count(("update", "critical")) > 1 and actions.count((OPEN, "critical")) >= 1  # peaks; a return
    assert len({c.start_step for c in changes}) == 1  # one episode throughout
    expected = opens_and_escalations(changes)
    assert [e[3] for e in expected] == ["warning", "critical"]
    assert [(a["detector"], a["key"], a["start_step"], a["severity"], a["cause"]) for call in got for a in call] == (
        expected
    )
    assert {a["status"] for call in got for a in call} == {"open"}


def test_a_detector_failure_is_counted_and_never_raised(tmp_path, internal_errors):
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stethoscope.attach(model, opt, server="offline", spool_dir=tmp_path) as mon:
        mon.on_alert(lambda alerts: None)  # the detectors run for a callback (see the next test)
        train(mon, model, opt, 5)
        assert mon.flush(10)  # the sender thread waits on the queue: its state can be touched
        mon._sender.watch.state["divergence"] = ["not", "a", "state"]  # a detector bug, from now on
        train(mon, model, opt, 5, start=5)  # no exception reaches the loop
        assert mon.flush(10)
        assert mon.detector_errors == 5
    points = spooled_points(tmp_path)
    assert sorted(points["loss"]) == list(range(10))  # sending went on
    assert points[DETECTOR_ERRORS] == {s: float(s - 4) for s in range(5, 10)}
    assert {w for w, _ in internal_errors} == {"detectors"}
    internal_errors.clear()  # expected here; the autouse fixture fails on anything left


def test_without_a_callback_the_detectors_wait_and_a_late_one_hears_what_it_did_before(tmp_path):
    """Nobody hears the hook's alerts without an ``on_alert`` callback, so the detectors do not
    run until one is registered; then they catch up on the records kept meanwhile. A callback
    registered mid-incident hears exactly what one registered then heard when the detectors ran
    all along: the opens and escalations from then on, with the same final state."""
    only_divergence = {name: {"enabled": name == "divergence"} for name in DETECTORS}
    losses = [1.0 + 0.01 * (i % 3) for i in range(60)] + [3.0] * 40 + [math.nan] * 5 + [1.0] * 10 + [3.0] * 40
    late = 90  # the loss ran away (a warning opened at step 83); it turns NaN at 100 (an escalation)
    eager_got, lazy_got = [], []
    eager = Watch(DetectorSet(only_divergence), "r", "p", [])
    lazy = Watch(DetectorSet(only_divergence), "r", "p", [])
    for step, loss in enumerate(losses):
        if step == late:
            eager.callbacks.append(eager_got.append)
            lazy.callbacks.append(lazy_got.append)
            assert lazy.state == {} and eager.state != {}  # nothing fed while nobody listened
        # The eager watch is the hook before the detectors waited: always fed, delivering to
        # whoever is registered.
        eager._feed(eager.detectors, step, ("loss", "other/series"), (loss, 1.0), True)
        lazy.points(step, ("loss", "other/series"), (loss, 1.0))
    assert json.dumps(lazy.state) == json.dumps(eager.state)
    assert lazy.delivered == eager.delivered
    heard = [(a["detector"], a["start_step"], a["severity"]) for call in lazy_got for a in call]
    assert heard == [(a["detector"], a["start_step"], a["severity"]) for call in eager_got for a in call]
    assert heard == [("divergence", 64, "critical")]  # the NaN's escalation; the warning was told before


def test_the_records_kept_for_a_late_callback_are_bounded(monkeypatch):
    from stethoscope import _watch

    monkeypatch.setattr(_watch, "MAX_BACKLOG", 5)
    fed = []

    class Recorder(DetectorSet):
        def feed_step(self, state, step, names, values):
            fed.append(step)
            return []

    watch = Watch(Recorder(), "r", "p", [])
    for step in range(20):
        watch.points(step, ("loss",), (1.0,))
    assert fed == [] and len(watch._backlog) == 5
    watch.callbacks.append(lambda alerts: None)
    watch.points(20, ("loss",), (1.0,))
    assert fed == [15, 16, 17, 18, 19, 20]


@pytest.mark.parametrize(
    "detectors, message",
    [
        ("on", "detectors must be a dict"),
        ([{"loss_spike": {}}], "detectors must be a dict"),
        ({"spikes": {}}, "detectors: unknown detector 'spikes'"),
        ({"loss_spike": {"treshold": 5}}, "detectors: loss_spike: unknown setting 'treshold'"),
        ({"loss_spike": {"window": 12.5}}, "detectors: loss_spike.window must be int"),
        ({"divergence": 3}, "detectors: settings for 'divergence' must be"),
        ({"divergence": {"enabled": "no"}}, "detectors: divergence.enabled must be true or false"),
    ],
)
def test_misuse_of_detectors_raises_value_error(detectors, message, tmp_path):
    model = TinyNet()
    with pytest.raises(ValueError, match=message):
        stethoscope.attach(model, None, server="offline", spool_dir=tmp_path, detectors=detectors)


def test_a_non_finite_step_wakes_the_sender_at_once(tmp_path, monkeypatch):
    """While records flow the sender looks every POLL_INTERVAL_S (20 ms: ~20 steps of a 1 ms
    step); the step whose loss is NaN must not wait for that look. Its record is put as urgent
    (it wakes the thread), the finite steps before it are not (they wake nobody)."""
    from stethoscope import _sender

    urgent_by_step = {}
    put_nowait = _sender.RecordQueue.put_nowait

    def spy(self, item, urgent=False):
        if isinstance(item, tuple) and item[0] == "points":
            urgent_by_step[item[1]] = urgent
        return put_nowait(self, item, urgent)

    monkeypatch.setattr(_sender.RecordQueue, "put_nowait", spy)
    model = relu_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stethoscope.attach(model, opt, run="hook-wake", server="offline", spool_dir=tmp_path) as mon:
        nan_step = blow_up(mon, model, opt)
    assert nan_step == JUMP_STEP + 1
    assert not any(urgent_by_step[s] for s in range(nan_step)), urgent_by_step
    assert all(urgent_by_step[s] for s in range(nan_step, STEPS))


def test_feed_step_gives_the_changes_and_state_update_gives(tmp_path):
    """``DetectorSet.feed_step`` (the Watch's per-record path, its routing cached per tuple of
    names) against ``update`` on the same points, step by step: a real run that blows up (a
    loss spike, the logits one-hot, the divergence, then NaN), every metric every step."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stethoscope.attach(model, opt, server="offline", spool_dir=tmp_path, every=1, detectors=False) as mon:
        blow_up(mon, model, opt, steps=JUMP_STEP + 60, jump_lr=1e20)
    by_step: dict = {}
    for name, col in spooled_points(tmp_path).items():
        for step, v in col.items():
            by_step.setdefault(step, []).append((name, v))
    fed, state_fed, changes_fed = DetectorSet(), {}, []
    ref, state_ref, changes_ref = DetectorSet(), {}, []
    for step in sorted(by_step):
        names = tuple(n for n, _ in by_step[step])
        values = [v for _, v in by_step[step]]
        changes_fed += fed.feed_step(state_fed, step, names, values)
        changes_ref += ref.update(state_ref, [(n, step, v) for n, v in by_step[step]])
        if step % 7 == 0:  # the same names in another order: a plan of its own, the same result
            rev = tuple(reversed(names))
            assert fed.feed_step(json.loads(json.dumps(state_fed)), step + 1, rev, values[::-1]) == ref.update(
                json.loads(json.dumps(state_ref)), [(n, step + 1, v) for n, v in zip(rev, values[::-1])]
            )
    assert len({c.detector for c in changes_ref}) >= 3, "the scenario no longer alerts on several detectors"
    assert changes_fed == changes_ref
    assert json.dumps(state_fed, sort_keys=True) == json.dumps(state_ref, sort_keys=True)
