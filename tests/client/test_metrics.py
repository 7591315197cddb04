"""Every metric against a direct computation of the same quantity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyNet, batch, spooled_points

import stethoscope
from stethoscope import _metrics


def direct(model, before, grads):
    """Norms and ratios per module computed the obvious way."""
    out = {}
    modules = {"body.0": model.body[0], "head": model.head}
    total = 0.0
    for name, mod in modules.items():
        g2 = sum(float(grads[id(p)].double().pow(2).sum()) for p in mod.parameters())
        w2 = sum(float(p.detach().double().pow(2).sum()) for p in mod.parameters())
        u2 = sum(float((p.detach().double() - before[id(p)].double()).pow(2).sum()) for p in mod.parameters())
        total += g2
        out[f"grad/norm/{name}"] = math.sqrt(g2)
        out[f"weight/norm/{name}"] = math.sqrt(w2)
        out[f"update_ratio/{name}"] = math.sqrt(u2) / math.sqrt(w2)
    out["grad/norm"] = math.sqrt(total)
    return out


@pytest.mark.parametrize("log_after_step", [True, False])
def test_gradient_weight_and_update_metrics(tmp_path, log_after_step):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(
        [
            {"params": model.body.parameters(), "lr": 1e-2, "name": "body"},
            {"params": model.head.parameters(), "lr": 3e-3},
        ]
    )
    mon = stethoscope.attach(model, opt, server="offline", spool_dir=tmp_path, every=1)  # every metric, every step
    expected = {}
    for step in range(6):
        x, y = batch(seed=step)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        before = {id(p): p.detach().clone() for p in model.parameters()}
        grads = {id(p): p.grad.clone() for p in model.parameters()}
        if log_after_step:
            opt.step()
            mon.log(step=step, loss=loss)
        else:
            mon.log(step=step, loss=loss)
            opt.step()
        expected[step] = direct(model, before, grads) | {
            "loss": loss.item(),
            "lr/body": 1e-2,
            "lr/1": 3e-3,
            "grad/nonfinite": 0.0,
        }
    mon.close()
    got = spooled_points(tmp_path)
    for step, values in expected.items():
        for name, want in values.items():
            assert got[name][step] == pytest.approx(want, rel=1e-5), (name, step)


def test_nonfinite_gradients_are_counted(tmp_path):
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = stethoscope.attach(model, opt, server="offline", spool_dir=tmp_path, update_ratio=False)
    x, y = batch(seed=1)
    F.cross_entropy(model(x), y).backward()
    model.head.weight.grad[0, :3] = float("nan")
    model.body[0].bias.grad[1] = float("inf")
    model.body[0].bias.grad[2] = float("-inf")
    opt.step()
    mon.log(step=0)
    mon.close()
    got = spooled_points(tmp_path)
    assert got["grad/nonfinite"][0] == 5.0
    assert math.isnan(got["grad/norm"][0])
    assert math.isinf(got["grad/norm/body.0"][0])


def test_accelerator_count_of_nonfinite_entries_matches():
    # The branch used on GPUs (no host read) runs on CPU tensors too.
    grads = [torch.tensor([1.0, math.nan, math.inf]), torch.tensor([[-math.inf, 0.0], [2.0, math.nan]])]
    assert _metrics.count_nonfinite_on_device(grads).tolist() == [4.0]
    assert _metrics.count_nonfinite_on_device([torch.zeros(3)]).tolist() == [0.0]


def reference_logit_stats(z, y=None, ignore_index=-100):
    """Per-sample loops in float32 with the ops cross_entropy uses."""
    z = z.reshape(-1, z.shape[-1]).float()
    rows = range(z.shape[0])
    keep = [i for i in rows if y is None or int(y.reshape(-1)[i]) != ignore_index]
    lse = torch.logsumexp(z, -1)
    p = torch.softmax(z, -1)
    ent = -(p * torch.log_softmax(z, -1)).sum(-1)
    # Collapse as training sees it: the loss for the top class is exactly zero in float32
    # (DESIGN.md: sum_j exp(z_j - max z) == 1, summed by the kernel cross_entropy runs).
    top_loss = F.cross_entropy(z, z.argmax(-1), reduction="none")
    collapsed = [float(top_loss[i] == 0) for i in rows]
    out = {
        "logits/max_abs": float(z.abs().max()),
        "logits/mean_logz": float(lse[keep].mean()),
        "logits/sc_fraction": sum(collapsed[i] for i in keep) / len(keep),
        "logits/entropy": float(ent[keep].mean()),
    }
    if y is not None:
        t = y.reshape(-1)
        losses = F.cross_entropy(z, t, reduction="none", ignore_index=ignore_index)
        margins = []
        for i in keep:
            others = torch.cat([z[i, : t[i]], z[i, t[i] + 1 :]])
            margins.append(float(z[i, t[i]] - torch.logsumexp(others, 0)))
        out["logits/zero_loss_fraction"] = sum(float(losses[i] == 0) for i in keep) / len(keep)
        out["logits/median_margin"] = float(torch.tensor(margins).median())  # lower median, as torch
    return out


def collapsing_logits(n=40, classes=10, seed=0):
    """Logits whose margins span 0..30 nats: some samples are in Softmax Collapse, some not."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    boost = torch.linspace(0, 30, n)
    z[torch.arange(n), y] += boost
    return z, y


def test_logit_statistics_on_classifier_logits():
    z, y = collapsing_logits()
    got = dict(zip(_metrics.LOGIT_NAMES, _metrics.logit_stats(z, y).tolist()))
    want = reference_logit_stats(z, y)
    assert 0 < want["logits/sc_fraction"] < 1, "the fixture must contain both regimes"
    assert 0 < want["logits/zero_loss_fraction"] < 1
    for name, w in want.items():
        # fractions are float32 means: within 1e-6 they count the same samples (1/40 apart)
        assert got[name] == pytest.approx(w, rel=1e-4, abs=1e-6), name


def test_logit_statistics_on_sequence_logits_with_ignored_targets():
    z, y = collapsing_logits(n=48, classes=7, seed=3)
    z, y = z.reshape(4, 12, 7), y.reshape(4, 12).clone()
    y[0, :5] = -100
    got = dict(zip(_metrics.LOGIT_NAMES, _metrics.logit_stats(z, y).tolist()))
    want = reference_logit_stats(z, y)
    for name, w in want.items():
        if name == "logits/max_abs":
            continue  # taken over every position, ignored ones too
        assert got[name] == pytest.approx(w, rel=1e-4, abs=1e-5), name
    no_targets = dict(zip(_metrics.LOGIT_NAMES_NO_TARGETS, _metrics.logit_stats(z, None).tolist()))
    assert no_targets["logits/sc_fraction"] == pytest.approx(reference_logit_stats(z)["logits/sc_fraction"], abs=1e-6)


def test_sc_is_the_float32_sum_not_a_threshold():
    # Margins just below and just above the 2^-24 absorption point of float32.
    z = torch.tensor([[0.0, -16.0], [0.0, -17.0], [0.0, -16.7], [0.0, -16.5]])
    got = _metrics.logit_stats(z, torch.zeros(4, dtype=torch.long)).tolist()
    one_hot = [float(torch.softmax(r, 0).max()) == 1.0 for r in z]
    assert one_hot == [False, True, True, False]
    assert got[_metrics.LOGIT_NAMES.index("logits/sc_fraction")] == 0.5
    assert got[_metrics.LOGIT_NAMES.index("logits/zero_loss_fraction")] == float(
        (F.cross_entropy(z, torch.zeros(4, dtype=torch.long), reduction="none") == 0).float().mean()
    )


def test_every_n_steps_thins_the_expensive_set_collectors_and_attention(tmp_path):
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = stethoscope.attach(model, opt, server="offline", spool_dir=tmp_path, every=3)
    calls = []

    def collector(step):
        calls.append(step)
        return {"hessian/trace": torch.tensor(float(step)), "hessian/top": 2.0 * step}

    def broken(step):
        raise RuntimeError("collector bug")

    mon.add_collector(collector)
    mon.add_collector(broken)
    att_max = {}
    for step in range(7):
        x, y = batch(seed=step)
        h = model.body(x)
        scores = stethoscope.attention_logits(h @ h.T)
        att_max[step] = float((h @ h.T).detach().max())
        loss = F.cross_entropy(model.head(h), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.log(step=step, loss=loss, tokens=step * 10)
        assert scores is not None
    mon.close()
    got = spooled_points(tmp_path)
    assert calls == [0, 3, 6]
    # The cheap signals and the user's scalars are never thinned; the expensive set is.
    assert sorted(got["loss"]) == sorted(got["grad/norm"]) == sorted(got["grad/nonfinite"]) == list(range(7))
    assert sorted(got["grad/norm/head"]) == [0, 3, 6]
    assert sorted(got["update_ratio/head"]) == [0, 3, 6]
    assert got["tokens"] == {s: 10.0 * s for s in range(7)}
    assert got["hessian/trace"] == {0: 0.0, 3: 3.0, 6: 6.0}
    assert got["hessian/top"] == {0: 0.0, 3: 6.0, 6: 12.0}
    assert got["stethoscope/collector_errors"] == {0: 1.0, 3: 2.0, 6: 3.0}
    assert mon.collector_errors == 3
    assert got["attention/max_logit"] == {s: pytest.approx(att_max[s]) for s in (0, 3, 6)}


def test_float64_models_are_measured_too(tmp_path):
    """_foreach_norm(dtype=float32) refuses float64 tensors: a float64 model must still get its
    gradient, weight and update norms, and its non-finite count."""
    torch.manual_seed(0)
    model = TinyNet().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = stethoscope.attach(model, opt, server="offline", spool_dir=tmp_path)
    x, y = batch(seed=2)
    loss = F.cross_entropy(model(x.double()), y)
    loss.backward()
    before = {id(p): p.detach().clone() for p in model.parameters()}
    grads = {id(p): p.grad.clone() for p in model.parameters()}
    opt.step()
    mon.log(step=0, loss=loss)
    mon.close()
    got = spooled_points(tmp_path)
    for name, want in direct(model, before, grads).items():
        assert got[name][0] == pytest.approx(want, rel=1e-5), name
    assert got["grad/nonfinite"][0] == 0.0
    wide = [torch.tensor([1.0, math.nan], dtype=torch.float64), torch.tensor([math.inf], dtype=torch.float64)]
    assert _metrics.count_nonfinite_on_device(wide).tolist() == [2.0]


def test_the_cpu_host_path_gives_the_tensor_paths_values():
    """A CPU model's expensive set is read as host floats (fewer kernels): the same values as
    the packed tensors finished on the host, to float32 rounding, NaN and missing grads too."""
    from stethoscope import _logits

    torch.manual_seed(0)
    model = TinyNet()
    layout = _metrics.ParamLayout(model)

    def close(got, want):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, rel=1e-6, abs=1e-12)

    x, y = batch(32)
    F.cross_entropy(model(x), y).backward()
    close(layout.grad_host(), _metrics.finish(layout.grad_names, layout.grad_stats().tolist()))
    model.head.bias.grad = None  # a parameter without a gradient this step
    close(layout.grad_host(), _metrics.finish(layout.grad_names, layout.grad_stats().tolist()))
    model.head.weight.grad[0, 0] = math.nan
    host = layout.grad_host()
    close(host, _metrics.finish(layout.grad_names, layout.grad_stats().tolist()))
    assert host[-1] == 1.0 and math.isnan(host[0])

    other = _metrics.ParamLayout(model)  # a snapshot of its own
    layout.take_snapshot()
    other.take_snapshot()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9).add_(0.01)
    close(layout.update_host(), _metrics.finish(other.update_names, other.update_stats().tolist()))

    stats = _logits.LogitStats()
    # a classifier, one with more rows than HOST_ROWS, a sampled LM head
    for shape, classes in (((64,), 10), ((600,), 10), ((16, 64), 1000)):
        z = torch.randn(*shape, classes) * 8
        z.view(-1, classes)[3:5] = 100.0 * torch.arange(classes)  # collapsed rows: zero loss, and a wrong guess
        t = torch.randint(0, classes, shape)
        t.view(-1)[3:5] = torch.tensor([classes - 1, 0])
        every = t.clone()  # every row counted: the host path's shortcut for that case
        t.view(-1)[::5] = -100
        for targets in (t, every, None, torch.full(shape, -100)):
            names, host = stats.host(z, targets)
            stats._generators.clear()  # the same rows drawn for both
            packed, packed_names, _ = stats(z, targets, True)
            stats._generators.clear()
            assert names == packed_names
            close(host, packed.tolist())
