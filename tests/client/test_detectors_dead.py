"""Dead units: the rule on hand-made series, and the incident it roots."""

from __future__ import annotations

import pytest

from stethoscope.core.detectors import CAUSES, DeadUnitsDetector, DeadUnitsParams, DetectorSet


def _layers(n, value, k=3, every=5):
    return [(f"dead/fc{j}", s, value(j, s)) for s in range(0, n, every) for j in range(k)]


def test_a_layer_whose_units_die_is_one_warning_naming_it_and_it_clears_with_hysteresis():
    det, state = DeadUnitsDetector(), {}

    def value(j, s):
        if j == 1 and 300 <= s < 600:
            return 0.95
        if j == 1 and 600 <= s < 650:
            return 0.45  # below the level, above 80% of it: still flagged
        return 0.05 + 0.02 * ((s // 5 + j) % 3)

    changes = det.update(state, _layers(900, value))
    assert [(c.action, c.key) for c in changes] == [("open", "dead"), ("resolve", "dead")]
    opened, resolved = changes
    assert opened.evidence["layer"] == "fc1" and opened.severity == "warning"
    assert 300 <= opened.start_step <= 330
    assert "fc1" in opened.message and "output zero" in opened.message
    assert resolved.end_step >= 650
    assert all(len(m) == 6 for m in state["mods"].values())


def test_a_layer_dead_from_the_start_that_does_not_grow_is_not_an_alert():
    # 70% of the units dead from initialisation, steady: a wide layer at a poor init
    det = DeadUnitsDetector()
    assert det.update({}, _layers(2000, lambda j, s: 0.7 if j == 0 else 0.1)) == []


def test_one_noisy_batch_does_not_open_it():
    det = DeadUnitsDetector()
    assert det.update({}, _layers(1000, lambda j, s: 0.9 if s in (300, 305) else 0.1)) == []


def test_growing_death_opens_once_it_is_past_the_level():
    det = DeadUnitsDetector()
    changes = det.update({}, _layers(1000, lambda j, s: min(0.99, s / 1000) if j == 2 else 0.1))
    (c,) = changes
    assert c.action == "open" and c.evidence["layer"] == "fc2" and 500 <= c.start_step <= 540


def test_settings_are_checked():
    with pytest.raises(ValueError):
        DeadUnitsParams(level=1.5)
    with pytest.raises(ValueError):
        DetectorSet({"dead_units": {"patience": 0}})


def test_dead_units_root_the_plateau_and_the_vanishing_gradient_of_their_layer():
    assert "dead_units" in CAUSES["plateau"] and "dead_units" in CAUSES["layer_gradients"]
    assert CAUSES["plateau"].index("dead_units") < CAUSES["plateau"].index("layer_gradients")
    ds, state = DetectorSet(), {}
    pts = []
    for s in range(1200):
        dead = s >= 100
        pts.append(("loss", s, 2.3 * (1 + 0.001 * (s % 3)) if s >= 100 else 2.3 - 0.001 * s))
        pts.append(("lr", s, 0.1))
        for k in range(4):
            g = 0.0 if dead and k < 3 else 0.5 + 0.05 * (s % 3)
            pts.append((f"grad/norm/fc{k}", s, g))
        if s % 5 == 0:
            pts += [(f"dead/act{k}", s, 1.0 if dead and k == 2 else 0.05) for k in range(3)]
    changes = ds.update(state, pts)
    opened = {c.detector: c for c in changes if c.action == "open"}
    assert "dead_units" in opened and opened["dead_units"].cause is None
    for consequence in ("layer_gradients", "plateau"):
        if consequence in opened:
            assert opened[consequence].cause["detector"] == "dead_units"
    assert "layer_gradients" in opened


# -- the hook: forward hooks on a real tiny ReLU training ------------------------------------------
torch = pytest.importorskip("torch")
F = torch.nn.functional

from helpers import batch, spooled_points  # noqa: E402

import stethoscope  # noqa: E402
from stethoscope._dead import dead_share  # noqa: E402


def relu_mlp():
    return torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    )


def test_dead_share_counts_units_zero_on_the_whole_batch():
    x = torch.ones(4, 5)
    x[:, 1] = 0
    x[:, 3] = 0
    x[2, 3] = 1.0  # unit 3 fires on one sample: alive
    assert dead_share(x).item() == pytest.approx(1 / 5)
    conv = torch.ones(2, 4, 3, 3)
    conv[:, 2] = 0  # channel 2 silent everywhere
    assert dead_share(conv).item() == pytest.approx(1 / 4)
    assert dead_share(torch.ones(3)) is None


def test_the_hook_measures_dead_units_on_the_expensive_steps_and_a_killed_layer_is_told(tmp_path):
    torch.manual_seed(0)
    model = relu_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    alerts = []
    mon = stethoscope.attach(model, opt, server="offline", spool_dir=tmp_path, every=5, dead_units=True)
    mon.on_alert(alerts.extend)
    for step in range(300):
        if step == 150:
            with torch.no_grad():
                model[2].bias.fill_(-100.0)  # every unit of the second ReLU dies
        x, y = batch(seed=step)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 7 == 0:
            with torch.no_grad():
                model(torch.zeros(16, 8) - 1e6)  # an evaluation pass: not counted
        mon.log(step=step, loss=loss, logits=logits, targets=y)
    mon.close()
    got = spooled_points(tmp_path)
    first, second = got["dead/1"], got["dead/3"]
    assert sorted(first) == sorted(got["grad/norm/0"]) == list(range(0, 300, 5))  # the expensive steps
    assert max(v for s, v in second.items() if s < 150) < 0.3 and all(v == 1.0 for s, v in second.items() if s >= 150)
    assert max(first.values()) < 0.5
    dead = [a for a in alerts if a["detector"] == "dead_units"]
    assert dead and dead[0]["evidence"]["layer"] == "3" and 150 <= dead[0]["start_step"] <= 170
    vanishing = [a for a in alerts if a["detector"] == "layer_gradients"]
    assert all(a["cause"]["detector"] == "dead_units" for a in vanishing)


def test_without_dead_units_no_activation_is_hooked(tmp_path):
    model = relu_mlp()
    mon = stethoscope.attach(model, None, server="offline", spool_dir=tmp_path, every=1)
    assert mon._dead is None and not model[1]._forward_hooks
    mon.log(step=0, loss=model(torch.ones(2, 8)).sum())
    mon.close()
    assert not [n for n in spooled_points(tmp_path) if n.startswith("dead/")]
    with pytest.raises(ValueError, match="dead_units"):
        stethoscope.attach(model, None, server="offline", spool_dir=tmp_path, dead_units="yes")
