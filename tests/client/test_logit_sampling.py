"""Logit statistics on a random subset of rows: exact extremes, a known sampling error."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from helpers import spooled_points

import stethoscope
from stethoscope import _logits, _metrics
from stethoscope._logits import SAMPLE_ROWS, LogitStats


def lm_logits(batch=8, seq=128, vocab=600, collapsed=0.3, seed=0):
    """[batch, seq, vocab] logits where about ``collapsed`` of the rows are in Softmax Collapse
    (their target's margin far past 16.6 nats) and the rest are not; and the targets."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, seq, vocab, generator=g)
    y = torch.randint(0, vocab, (batch, seq), generator=g)
    boost = torch.where(torch.rand(batch, seq, generator=g) < collapsed, 40.0, 2.0)
    z.scatter_add_(-1, y[..., None], boost[..., None])
    return z, y


def as_dict(values, names):
    return dict(zip(names, values.tolist()))


def test_large_logits_are_sampled_small_ones_are_not():
    stats = LogitStats()
    big, _ = lm_logits()
    assert big.shape[0] * big.shape[1] > 2 * SAMPLE_ROWS and stats.sampled(big)
    assert not stats.sampled(torch.zeros(64, 10))  # a classifier's batch: exact
    assert not stats.sampled(torch.zeros(2 * SAMPLE_ROWS, 10))
    assert not stats.sampled(torch.zeros(4 * SAMPLE_ROWS, 8))  # many rows, few entries


def test_small_logits_give_the_exact_statistics_and_no_error():
    z = torch.randn(64, 10)
    y = torch.randint(0, 10, (64,))
    values, names, _ = LogitStats()(z, y, full=True)
    got = as_dict(values, names)
    want = as_dict(_metrics.logit_stats(z, y), _metrics.LOGIT_NAMES)
    assert "logits/sc_fraction_stderr" not in got
    for name, w in want.items():
        assert got[name] == w, name
    assert got["logits/nonfinite"] == 0.0


@pytest.mark.parametrize("shape", [(8, 128, 600), (32, 256, 300)])
def test_the_subset_has_a_fixed_size(monkeypatch, shape):
    seen = []
    real = _logits.softmax_row_stats

    def spy(z, y, ignore_index=-100):
        seen.append((tuple(z.shape), tuple(y.shape)))
        return real(z, y, ignore_index)

    monkeypatch.setattr(_logits, "softmax_row_stats", spy)
    z, y = lm_logits(*shape)
    LogitStats()(z, y, full=True)
    assert seen == [((SAMPLE_ROWS, shape[-1]), (SAMPLE_ROWS,))]


def test_max_abs_and_nonfinite_counts_are_exact_over_every_row():
    z, y = lm_logits()
    z[5, 100, 17] = 123.5  # one extreme logit, in a row the subset will most likely miss
    values, names, _ = LogitStats()(z, y, full=True)
    got = as_dict(values, names)
    assert got["logits/max_abs"] == 123.5
    assert got["logits/nonfinite"] == 0.0
    z[1, 3, 0] = math.nan
    z[7, 120, 5] = math.inf
    z[7, 121, 9] = -math.inf
    z[2, 2, 2] = math.nan
    for full in (True, False):
        values, names, _ = LogitStats()(z, y, full=full)
        got = as_dict(values, names)
        assert got["logits/nonfinite"] == 4.0, full
        assert math.isnan(got["logits/max_abs"]), full
    host = _logits.extremes_host(z)
    assert math.isnan(host[0]) and host[1] == 4.0


def test_the_sampled_sc_fraction_is_within_its_reported_error():
    z, y = lm_logits(seed=1)
    exact = as_dict(_metrics.logit_stats(z, y), _metrics.LOGIT_NAMES)["logits/sc_fraction"]
    assert 0.2 < exact < 0.4, "the fixture must hold both regimes"
    stats = LogitStats()  # its own seeded generator: the same subsets every run
    estimates, errors = [], []
    for _ in range(200):  # each call draws a new subset
        values, names, _ = stats(z, y, full=True)
        got = as_dict(values, names)
        estimates.append(got["logits/sc_fraction"])
        errors.append(got["logits/sc_fraction_stderr"])
    first_error = errors[0]
    assert abs(estimates[0] - exact) <= 3 * first_error
    assert 0.02 < first_error < 0.04  # sqrt(0.3 * 0.7 / 256) = 0.029
    inside = sum(abs(e - exact) <= 2 * s for e, s in zip(estimates, errors)) / len(estimates)
    assert inside >= 0.9, "about 95% of estimates lie within two reported errors"
    # The reported error is the spread the estimates really have, and they are unbiased.
    assert statistics.stdev(estimates) == pytest.approx(statistics.fmean(errors), rel=0.25)
    assert statistics.fmean(estimates) == pytest.approx(exact, abs=3 * first_error / math.sqrt(200))


def test_a_subset_without_a_collapsed_row_still_reports_an_error():
    z, y = lm_logits(collapsed=0.0)
    got = as_dict(*LogitStats()(z, y, full=True)[:2])
    assert got["logits/sc_fraction"] == 0.0
    assert got["logits/sc_fraction_stderr"] > 0


def test_sampling_leaves_the_users_random_streams_alone():
    z, y = lm_logits()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    LogitStats()(z, y, full=True)
    assert torch.equal(torch.get_rng_state(), before)


def test_the_monitor_sends_the_error_of_sampled_statistics(tmp_path):
    vocab, seq = 300, 64
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, vocab))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = stethoscope.attach(model, opt, server="offline", spool_dir=tmp_path, every=1)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.randint(0, vocab, (16, seq), generator=g)
        logits = model(x)  # [16, 64, 300]: 1,024 rows, 307,200 entries: sampled
        loss = F.cross_entropy(logits.reshape(-1, vocab), x.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.log(step=step, loss=loss, logits=logits, targets=x)
    mon.close()
    got = spooled_points(tmp_path)
    assert sorted(got["logits/sc_fraction_stderr"]) == [0, 1, 2]
    assert all(0 < v < 0.05 for v in got["logits/sc_fraction_stderr"].values())
    assert sorted(got["logits/nonfinite"]) == [0, 1, 2]
