"""Logit statistics as the monitor takes them: exact extremes every step, softmax health on a
fixed-size random subset of rows for large logits, with its sampling error.

Every step: the max |z| and the count of non-finite logits, over every row (one reduction
pass; a logit running away is a divergence sign, so it is never thinned or sampled). On the
steps that carry the expensive set: the softmax statistics (mean log Z, Softmax-Collapse
fraction, entropy, zero-loss fraction, median margin). These need a softmax over the whole
row, several passes over [rows, vocab]; on a [batch, seq, vocab] LM head that was 9% of a
small LM's step on the CPU. For logits with more than ``2 * SAMPLE_ROWS`` rows and
``SAMPLE_MIN_ENTRIES`` entries they are taken on ``SAMPLE_ROWS`` rows drawn at random (with
replacement, from the monitor's own generator: the user's random streams are untouched),
which estimates each mean without bias, and the SC fraction's standard error is sent as
``logits/sc_fraction_stderr``.

On CUDA all of it runs on the monitor's side stream (see ``Monitor._emit``): the training
stream never waits for it and nothing is read back on the host.
"""

from __future__ import annotations

import math

import torch

from ._metrics import (
    LOGIT_NAMES,
    LOGIT_NAMES_NO_TARGETS,
    LOGIT_OPS,
    LOGIT_OPS_NO_TARGETS,
    MAX,
    MEAN,
    SUM,
    softmax_row_stats,
)

#: Rows the softmax statistics are taken on when the logits are large. The SC fraction of 256
#: rows drawn at random has a standard error of at most 0.031 (sqrt(0.25 / 256)), 0.019 at the
#: detector's 10% warning level (softmax_collapse.SC_WARN_FRACTION), which it averages over
#: five readings; a [16, 64, 1000] LM head costs 4x less than over all 1,024 rows.
SAMPLE_ROWS = 256
#: Logits smaller than this many entries (1 MiB of float32) are measured over every row: they
#: cost little, and a classifier's batch is measured exactly.
SAMPLE_MIN_ENTRIES = 1 << 18
#: CPU logits of at most this many rows (a sampled subset included) have their softmax
#: statistics finished on the host (``softmax_row_stats(host=True)``): ~20 small kernels fewer,
#: each costing more than its arithmetic on a small step; Python's per-row loop costs less up
#: to about this many rows.
HOST_ROWS = SAMPLE_ROWS
#: The generator of the row subsets (a fixed seed: a run's subsets are reproducible).
SAMPLE_SEED = 0x5EED

EXTREME_NAMES = ("logits/max_abs", "logits/nonfinite")
EXTREME_OPS = (MAX, SUM)
NONFINITE_NAMES = ("logits/nonfinite",)
STDERR_NAMES = ("logits/sc_fraction_stderr",)


class LogitStats:
    """The monitor's logit statistics: ``stats(logits, targets, full) -> (tensor, names, ops)``.

    >>> values, names, ops = LogitStats()(logits, targets, full=True)
    """

    def __init__(self, sample_rows: int = SAMPLE_ROWS, min_entries: int = SAMPLE_MIN_ENTRIES):
        self.sample_rows = sample_rows
        self.min_entries = min_entries
        self._generators: dict = {}
        self._streams: dict = {}

    def side_stream(self, device):
        """The CUDA stream the monitor's device work runs on (one per device)."""
        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = torch.cuda.Stream(device=device)
        return s

    def _generator(self, device):
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
            g.manual_seed(SAMPLE_SEED)
        return g

    def sampled(self, logits: torch.Tensor) -> bool:
        """Whether the softmax statistics of ``logits`` are taken on a subset of rows."""
        rows = logits.numel() // logits.shape[-1]
        return rows > 2 * self.sample_rows and logits.numel() >= self.min_entries

    def _rows(self, logits: torch.Tensor, z: torch.Tensor, targets: torch.Tensor | None):
        """The rows (of ``z``, ``logits`` as [rows, classes]) and targets the softmax statistics
        read: all of them, or ``sample_rows`` drawn at random; and whether they were drawn."""
        y = None if targets is None else targets.detach().reshape(-1)
        sampled = self.sampled(logits)
        if sampled:
            idx = torch.randint(z.shape[0], (self.sample_rows,), generator=self._generator(z.device), device=z.device)
            z = z.index_select(0, idx)
            y = None if y is None else y.index_select(0, idx)
        return z, y, sampled

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor | None, full: bool, ignore_index: int = -100):
        z = logits.detach().reshape(-1, logits.shape[-1])
        max_abs, nonfinite = extremes(z)
        if not full:
            return torch.cat([max_abs, nonfinite]), EXTREME_NAMES, EXTREME_OPS
        z, y, sampled = self._rows(logits, z, targets)
        values, n = softmax_row_stats(z.float(), y, ignore_index)
        names = LOGIT_NAMES if y is not None else LOGIT_NAMES_NO_TARGETS
        ops = LOGIT_OPS if y is not None else LOGIT_OPS_NO_TARGETS
        parts = [max_abs, values, nonfinite]
        names, ops = names + NONFINITE_NAMES, ops + (SUM,)
        if sampled:
            parts.append(sc_fraction_stderr(values[1:2], n))
            names, ops = names + STDERR_NAMES, ops + (MEAN,)
        return torch.cat(parts), names, ops

    def host(self, logits: torch.Tensor, targets: torch.Tensor | None, ignore_index: int = -100):
        """``self(logits, targets, full=True)`` for CPU logits, as ``(names, host floats)``:
        the extremes read at once, the softmax statistics read in one go, the sampling error
        computed on the host; no packing."""
        z = logits.detach().reshape(-1, logits.shape[-1])
        max_abs, nonfinite = extremes_host(z)
        z, y, sampled = self._rows(logits, z, targets)
        if z.shape[0] <= HOST_ROWS:
            values, n = softmax_row_stats(z.float(), y, ignore_index, host=True)
        else:
            values, n = softmax_row_stats(z.float(), y, ignore_index)
            values, n = values.tolist(), n.item()
        names = (LOGIT_NAMES if y is not None else LOGIT_NAMES_NO_TARGETS) + NONFINITE_NAMES
        out = [max_abs, *values, nonfinite]
        if sampled:
            names += STDERR_NAMES
            out.append(sc_fraction_stderr_host(values[1], n))
        return names, out


def extremes(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max |z| and the number of non-finite entries of ``z``, over every entry, as two
    1-element float32 tensors."""
    # aminmax, not vector_norm(z, inf): the same answer (NaN propagates through both), and on
    # the CPU 30x faster ([1024, 1000]: 0.11 ms against 3.2 ms).
    mx, mn = z.aminmax()
    max_abs = torch.maximum(mx.abs(), mn.abs()).float().view(1)
    # On the CPU reading a value costs no stall: count only when the max says there is
    # something to count (the rare bad step).
    if z.device.type == "cpu" and math.isfinite(max_abs.item()):
        return max_abs, torch.zeros(1)
    return max_abs, (~torch.isfinite(z)).sum().float().view(1)


def extremes_host(logits: torch.Tensor) -> tuple[float, float]:
    """``extremes`` as host floats, for CPU logits (one reduction and one read)."""
    z = logits.detach()
    mx, mn = z.aminmax()
    mx, mn = mx.item(), mn.item()
    max_abs = math.nan if mx != mx or mn != mn else max(abs(mx), abs(mn))
    if math.isfinite(max_abs):
        return max_abs, 0.0
    return max_abs, float((~torch.isfinite(z)).sum())


def sc_fraction_stderr(fraction: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Standard error of a fraction measured on ``n`` rows drawn at random, with Agresti and
    Coull's "plus four" estimate (two more hits and two more misses), so that a subset with
    no collapsed row still reports an error above zero (the fraction may be small, not 0)."""
    m = n + 4.0
    p = (fraction * n + 2.0) / m
    return (p * (1.0 - p) / m).sqrt().view(1)


def sc_fraction_stderr_host(fraction: float, n: float) -> float:
    """``sc_fraction_stderr`` on host floats."""
    m = n + 4.0
    p = (fraction * n + 2.0) / m
    return math.sqrt(p * (1.0 - p) / m)
