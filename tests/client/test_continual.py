"""ContinualEvaluator and Monitor.task_switch: values, non-disturbance, schedule, what is sent."""

from __future__ import annotations

import httpx
import pytest
import torch
import torch.nn.functional as F
from helpers import read_series

import stethoscope

torch.set_num_threads(1)


class BNNet(torch.nn.Module):
    """BatchNorm, dropout and a frozen (eval-mode) part: everything evaluation could disturb."""

    def __init__(self, d_in=8, hidden=32, classes=6):
        super().__init__()
        self.frozen = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.BatchNorm1d(hidden))
        self.body = torch.nn.Sequential(
            torch.nn.ReLU(),
            torch.nn.Dropout(0.3),
            torch.nn.Linear(hidden, hidden),
            torch.nn.BatchNorm1d(hidden),
            torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.body(self.frozen(x)))


def held_out(task, n=200, d_in=8, classes=6, seed=0):
    g = torch.Generator().manual_seed(seed + 17 * task)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, d_in, generator=g) + y[:, None] * 0.5
    return x, y


def train_steps(model, opt, steps, evaluator=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        y = torch.randint(0, 6, (16,), generator=g)
        x = torch.randn(16, 8, generator=g) + y[:, None] * 0.5
        loss = F.cross_entropy(model(x), y)  # dropout draws from the global RNG
        opt.zero_grad()
        loss.backward()
        if evaluator is not None:
            evaluator(step)  # between backward and step: gradients must survive it
        opt.step()


def fresh(seed=0):
    torch.manual_seed(seed)
    model = BNNet()
    model.frozen.eval()  # a frozen part in eval mode inside a model in train mode
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def test_training_with_the_evaluator_is_bit_for_bit_the_same():
    torch.manual_seed(123)
    model_a, opt_a = fresh()
    train_steps(model_a, opt_a, 30)
    after_a = torch.rand(3)

    torch.manual_seed(123)
    model_b, opt_b = fresh()
    # A forward that draws random numbers in eval mode: the random state must be put back.
    ev = stethoscope.ContinualEvaluator(model_b, every=1, forward=lambda m, x: m(x + 0.0 * torch.randn_like(x)))
    for t in range(3):
        ev.add_task(t, *held_out(t))
    train_steps(model_b, opt_b, 30, evaluator=ev)
    after_b = torch.rand(3)

    assert ev.evaluations == 30
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name  # weights, BatchNorm running stats and counters
    assert torch.equal(after_a, after_b)  # the global random stream went on as if untouched
    assert [m.training for m in model_b.modules()] == [m.training for m in model_a.modules()]
    assert model_b.training and not model_b.frozen.training and not model_b.frozen[1].training


def test_evaluation_keeps_gradients_modes_and_rng_and_matches_a_direct_computation():
    model, opt = fresh()
    train_steps(model, opt, 5)
    x, y = torch.randn(16, 8), torch.randint(0, 6, (16,))
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()

    ev = stethoscope.ContinualEvaluator(model, every=1, batch_size=128)  # several forward chunks
    sets = {name: held_out(i) for i, name in enumerate(["a", "b", "c"])}
    for name, (xs, ys) in sets.items():
        ev.add_task(name, xs, ys)
    out = ev(0)

    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers))
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)
    assert sorted(out) == sorted(f"eval/{k}/{n}" for k in ("acc", "loss") for n in sets)
    model.eval()
    with torch.no_grad():
        for name, (xs, ys) in sets.items():
            logits = model(xs)
            assert out[f"eval/acc/{name}"].item() == pytest.approx(
                (logits.argmax(1) == ys).float().mean().item(), abs=1e-6
            )
            assert out[f"eval/loss/{name}"].item() == pytest.approx(F.cross_entropy(logits, ys).item(), rel=1e-5)
    model.train()


def test_custom_forward_and_loss_and_the_held_out_cap():
    model, _ = fresh()
    x, y = held_out(0, n=2500)
    seen = []

    def masked(m, inputs):  # a multi-head style forward: only classes 0..2
        seen.append(len(inputs))
        return m(inputs)[:, :3]

    ev = stethoscope.ContinualEvaluator(
        model,
        max_samples=1000,
        batch_size=400,
        forward=masked,
        loss_fn=lambda z, t: F.nll_loss(F.log_softmax(z, 1), t.clamp(max=2)),
    )
    ev.add_task("t", x, y)
    kept_x, kept_y = ev._tasks["t"]
    assert len(kept_y) == 1000
    # A subset of the rows given, each with its own target, in the original order.
    idx = [int((x == row).all(1).nonzero()[0]) for row in kept_x[:50]]
    assert idx == sorted(idx) and torch.equal(y[idx], kept_y[:50])
    out = ev.evaluate()
    assert seen == [400, 400, 200]
    model.eval()
    with torch.no_grad():
        z = model(kept_x)[:, :3]
    model.train()
    assert out["eval/acc/t"].item() == pytest.approx((z.argmax(1) == kept_y).float().mean().item(), abs=1e-6)
    assert out["eval/loss/t"].item() == pytest.approx(
        F.nll_loss(F.log_softmax(z, 1), kept_y.clamp(max=2)).item(), rel=1e-5
    )


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_schedule_every_n_and_within_a_time_budget():
    model, _ = fresh()
    ev = stethoscope.ContinualEvaluator(model, every=3)
    assert ev(0) is None  # nothing to evaluate yet
    ev.add_task(0, *held_out(0))
    ran = [s for s in range(1, 12) if ev(s) is not None]
    assert ran == [1, 4, 7, 10]

    clock = FakeClock()

    def costly(m, inputs):  # each evaluation takes 1 s of (fake) wall time
        clock.t += 1.0
        return m(inputs)

    ev = stethoscope.ContinualEvaluator(model, budget=0.2, dense_after_switch=5, forward=costly, clock=clock)
    ev.add_task(0, *held_out(0))
    ran = []
    for step in range(200):
        clock.t += 1.0  # a training step takes 1 s
        if ev(step) is not None:
            ran.append(step)
    assert ran[:5] == [0, 1, 2, 3, 4]  # every step right after a new task, whatever it costs
    gaps = {b - a for a, b in zip(ran[5:], ran[6:])}
    assert gaps <= {4, 5}  # then 1 s of evaluation per ~4 s of training: a 20% share
    assert 0.19 <= ev.overhead <= 0.22
    ev.add_task(1, *held_out(1))
    more = []
    for step in range(200, 206):
        clock.t += 1.0
        if ev(step) is not None:
            more.append(step)
    assert more[:5] == [200, 201, 202, 203, 204]  # dense again after the switch


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda ev: ev.add_task("a b", torch.zeros(3, 8), torch.zeros(3, dtype=torch.long)), "task name"),
        (lambda ev: ev.add_task("a/b", torch.zeros(3, 8), torch.zeros(3, dtype=torch.long)), "task name"),
        (lambda ev: ev.add_task(1.5, torch.zeros(3, 8), torch.zeros(3, dtype=torch.long)), "task must be"),
        (lambda ev: ev.add_task("a", torch.zeros(3, 8), torch.zeros(4, dtype=torch.long)), "targets must be"),
        (lambda ev: ev.add_task("a", torch.zeros(3, 8), torch.zeros(3)), "targets must be"),
        (lambda ev: ev.add_task("a", [[0.0]], [0]), "tensors"),
        (lambda ev: ev.record("a", 0.5), "monitor"),
    ],
)
def test_misuse_raises_value_error(call, message):
    model, _ = fresh()
    with pytest.raises(ValueError, match=message):
        call(stethoscope.ContinualEvaluator(model))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"every": 0}, "every"),
        ({"budget": 1.5}, "budget"),
        ({"max_samples": 0}, "max_samples"),
        ({"loss_fn": 3}, "loss_fn"),
        ({"dense_after_switch": -1}, "dense_after_switch"),
    ],
)
def test_bad_settings_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        stethoscope.ContinualEvaluator(fresh()[0], **kwargs)
    with pytest.raises(ValueError, match="torch.nn.Module"):
        stethoscope.ContinualEvaluator("model")


def test_task_switches_and_accuracies_reach_the_server(live_server):
    model, opt = fresh()
    mon = stethoscope.attach(model, opt, run="cl-run", project="cl", server=live_server.url)
    ev = stethoscope.ContinualEvaluator(model, mon, every=2)
    step = 0
    for task in ["first", "second", "first"]:
        mon.task_switch(task)  # at the next step logged
        ev.add_task(task, *held_out(len(task)))
        for _ in range(4):
            F.cross_entropy(model(torch.randn(8, 8)), torch.randint(0, 6, (8,))).backward()
            opt.step()
            opt.zero_grad()
            mon.log(step=step, loss=1.0)
            step += 1
    mon.task_switch(7, step=20)
    ev.record("user", 0.625, loss=0.9, step=21)
    with pytest.raises(ValueError, match="percentage"):
        ev.record("user", 62.5)
    with pytest.raises(ValueError, match="task must be"):
        mon.task_switch(None)
    mon.close()
    assert mon.collector_errors == 0

    events = httpx.get(f"{live_server.url}/api/v1/runs/cl-run/events", params={"kind": "task_switch"}).json()
    assert [(e["step"], e["info"]) for e in events] == [
        (0, {"task": "first", "index": 0}),
        (4, {"task": "second", "index": 1}),
        (8, {"task": "first", "index": 0}),
        (20, {"task": 7, "index": 7}),
    ]
    assert read_series(live_server.url, "cl-run", "continual/task") == ([0, 4, 8, 20], [0.0, 1.0, 0.0, 7.0])
    # every=2 over the monitor's logging steps: 0, 2, 4, ...; a task is evaluated once added.
    assert read_series(live_server.url, "cl-run", "eval/acc/first")[0] == [0, 2, 4, 6, 8, 10]
    assert read_series(live_server.url, "cl-run", "eval/acc/second")[0] == [4, 6, 8, 10]
    assert read_series(live_server.url, "cl-run", "eval/acc/user") == ([21], [0.625])
    assert read_series(live_server.url, "cl-run", "eval/loss/user") == ([21], [0.9])


def test_disabled_monitor_takes_task_switches(monkeypatch):
    monkeypatch.setenv("STETHOSCOPE_DISABLED", "1")
    mon = stethoscope.attach("no model", None)
    mon.task_switch(3)
    ev = stethoscope.ContinualEvaluator(fresh()[0], mon)
    ev.record(0, 0.5)  # nowhere to send: nothing happens


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_on_a_real_class_incremental_run_the_detector_works_offline_in_the_job(seed):
    """No server: the job runs the detectors on the points it produces, as an offline job can."""
    import _continual_training as T

    from stethoscope.core.detectors import DetectorSet

    res = T.class_incremental(seed=seed)
    assert res.evaluator.evaluations == res.steps == T.TASKS * T.STEPS_PER_TASK
    points = [("continual/task", s, float(t)) for s, t in res.switches]
    points += [(f"eval/acc/{t}", s, v) for t, pts in res.acc.items() for s, v in pts]
    changes = DetectorSet().update({}, points)
    resolved = [c for c in changes if c.detector == "stability_gap" and c.action == "resolve"]
    assert len([c for c in changes if c.action == "open"]) == len(resolved) == len(changes) - len(resolved)

    # A direct look at the accuracies: every previous task whose accuracy fell more than 0.1
    # below its level just before a switch, before the next one, has exactly one alert.
    acc = {t: dict(pts) for t, pts in res.acc.items()}
    starts = [s for s, _ in res.switches] + [res.steps]
    expected = {}
    for (s, new), end in zip(res.switches[1:], starts[2:]):
        for t, by_step in acc.items():
            if t != new and s - 1 in by_step:
                low_step = min(range(s, end), key=lambda i: (by_step[i], i))
                if by_step[s - 1] - by_step[low_step] > 0.1:
                    expected[(s, t)] = (by_step[s - 1] - by_step[low_step], low_step)
    assert len(expected) >= T.TASKS - 1  # at least one gap per switch: the phenomenon is there
    assert sorted((c.evidence["switch_step"], c.key) for c in resolved) == sorted(expected)
    for c in resolved:
        gap, low_step = expected[(c.evidence["switch_step"], c.key)]
        assert c.evidence["gap"] == pytest.approx(gap) and c.evidence["min_step"] == low_step
        assert c.evidence["switch_step"] <= c.start_step <= low_step < c.end_step
        assert c.end_step - c.evidence["switch_step"] == c.evidence["recovery_steps"] <= 60
        # Recovered: three evaluations in a row back within 0.05 of the pre-switch level.
        level = c.evidence["pre_switch_acc"] - 0.05
        assert all(acc[c.key][c.end_step + i] >= level for i in range(3))
        assert acc[c.key][c.end_step - 1] < level
