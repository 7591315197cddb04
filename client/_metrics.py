"""Metrics computed on the training device, one fused pass each, no host synchronisation.

Every function here returns a 1-D float32 tensor on the device plus the names of its
entries; the monitor concatenates them into one small tensor per step and the sender
copies that to the host once. Columns that several ranks must combine carry a reduction
(``MEAN``, ``MAX`` or ``SUM``); columns holding squared norms are finished (square root,
ratios) on the host by ``finish``.
"""

from __future__ import annotations

import math
import operator

import torch

MEAN, MAX, SUM = 0, 1, 2

#: A sample's float32 softmax is exactly one-hot when sum_j exp(z_j - max z) == 1, i.e. once
#: every other term is below the absorption bound 2^-24 (Prieto et al. 2025): margins above
#: about 16.6 nats. We test the sum itself, computed with the ops softmax uses, not the bound.
SC_ABSORPTION_BOUND = 2.0**-24

#: Above this many modules the per-module series are grouped at a coarser depth.
MAX_MODULE_SERIES = 64

_PREFIXES = ("module.", "_orig_mod.", "_forward_module.", "_fsdp_wrapped_module.")


def _strip(name: str) -> str:
    # DDP, torch.compile and FSDP wrappers add a prefix that is not part of the model.
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p) :], True
    return name


_GRAD = operator.attrgetter("grad")


def _local(t):
    # A DTensor (FSDP2 / tensor parallel) holds a shard; its norm is combined across ranks.
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class ParamLayout:
    """Which parameter belongs to which module series, decided once at attach time."""

    def __init__(self, model: torch.nn.Module, depth: int | None = None):
        named = [(_strip(n), p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no parameter with requires_grad=True; nothing to monitor")
        paths = [n.split(".")[:-1] for n, _ in named]
        if depth is None:
            depth = max((len(p) for p in paths), default=0)
            while depth > 1 and len({tuple(p[:depth]) for p in paths}) > MAX_MODULE_SERIES:
                depth -= 1
        groups: dict[str, int] = {}
        index = []
        for path in paths:
            key = ".".join(path[:depth]) or "root"
            index.append(groups.setdefault(key, len(groups)))
        self.params = [p for _, p in named]
        self.groups = list(groups)
        self.sharded = any(hasattr(p, "to_local") for p in self.params)
        # _foreach_norm(dtype=float32) refuses to narrow float64: such models take their norms
        # in float64 and cast them (the series are float32 either way).
        self._float64 = any(p.dtype == torch.float64 for p in self.params)
        self.device = _local(self.params[0]).device
        self._multi_device = len({_local(p).device for p in self.params}) > 1
        self._index_all = torch.tensor(index, dtype=torch.long, device=self.device)
        self._index_list = index
        self._subset_cache: dict[tuple, torch.Tensor] = {}
        self.snapshot: list[torch.Tensor] | None = None
        red = SUM if self.sharded else MEAN
        g = self.groups
        self.grad_names = ("grad/norm",) + tuple(f"grad/norm/{m}" for m in g) + ("grad/nonfinite",)
        self.grad_ops = (red,) * (len(g) + 1) + (SUM if self.sharded else MEAN,)
        #: What a step without the expensive set carries: the global norm and the count.
        self.grad_total_names = ("grad/norm", "grad/nonfinite")
        self.grad_total_ops = (red, SUM if self.sharded else MEAN)
        self.update_names = tuple(f"weight/norm/{m}" for m in g) + tuple(f"update_ratio/{m}" for m in g)
        self.update_ops = (red,) * (2 * len(g))

    def _stack_sq(self, norms: list[torch.Tensor]) -> torch.Tensor:
        if self._multi_device:
            norms = [n.to(self.device) for n in norms]
        return torch.stack(norms).square_()

    def _group_sum(self, sq: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(self.groups), dtype=torch.float32, device=self.device).index_add_(0, index, sq)

    def grad_stats(self, per_module: bool = True) -> torch.Tensor | None:
        """[total sum of squares, per-module sums of squares..., non-finite count], or with
        ``per_module=False`` only [total sum of squares, non-finite count] (the same norms,
        fewer kernels and series: what every step carries)."""
        if not per_module:
            grads = [_local(p.grad) for p in self.params if p.grad is not None]
            if not grads:
                return None
            norms = self._norms(grads)
            if self._multi_device:
                norms = [n.to(self.device) for n in norms]
            total = torch.stack(norms).square_().sum().view(1)
            return torch.cat([total, count_nonfinite(grads, total)])
        present = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not present:
            return None
        if len(present) == len(self.params):
            grads = [_local(p.grad) for p in self.params]
            index = self._index_all
        else:
            grads = [_local(self.params[i].grad) for i in present]
            key = tuple(present)
            index = self._subset_cache.get(key)
            if index is None:
                index = torch.tensor([self._index_list[i] for i in present], dtype=torch.long, device=self.device)
                self._subset_cache = {key: index}
        sq = self._stack_sq(self._norms(grads))
        per = self._group_sum(sq, index)
        total = per.sum().view(1)
        return torch.cat([total, per, count_nonfinite(grads, total)])

    def grad_total_host(self) -> tuple[float, float] | None:
        """(global gradient norm, non-finite entries) as host floats: the cheap signals on a
        CPU model, where reading a value costs no stall and a float needs no packing."""
        if self.sharded:
            grads = [_local(p.grad) for p in self.params if p.grad is not None]
        else:
            grads = [g for g in map(_GRAD, self.params) if g is not None]
        if not grads:
            return None
        # The per-tensor norms read one by one and combined in double on the host: two kernels
        # fewer than stacking them and taking a dot (a ~1 ms step pays ~10 us per kernel), and
        # no float32 overflow of the sum of squares (a norm above 1.8e19 squared).
        total = math.hypot(*[n.item() for n in self._norms(grads)])
        if math.isfinite(total):
            return total, 0.0
        return total, float(sum(int((~torch.isfinite(g)).sum()) for g in grads))

    def grad_host(self) -> list[float] | None:
        """``grad_stats()`` as host floats, finished: [global norm, per-module norms...,
        non-finite count]. The expensive set on a CPU model, where reading a value costs no
        stall: one norm kernel and one read, the grouping in Python (on a ~1 ms step each
        small kernel costs more than its arithmetic)."""
        grads, index = [], []
        for g, i in zip(map(_GRAD, self.params), self._index_list):
            if g is not None:
                grads.append(_local(g) if self.sharded else g)  # _local: a failed getattr a tensor
                index.append(i)
        if not grads:
            return None
        per = [0.0] * len(self.groups)
        for i, n in zip(index, torch.stack(self._norms(grads)).tolist()):
            per[i] += n * n
        total = sum(per)
        nonfinite = 0.0 if math.isfinite(total) else float(sum(int((~torch.isfinite(g)).sum()) for g in grads))
        return [_root(total), *map(_root, per), nonfinite]

    def update_host(self) -> list[float] | None:
        """``update_stats()`` as host floats, finished: [weight norms per module..., update
        ratios per module...] (the same values ``finish`` makes of the squares)."""
        if self.snapshot is None:
            return None
        params = self._detached()
        torch._foreach_sub_(self.snapshot, params)  # snapshot now holds -update
        k = len(params)
        norms = torch.stack(self._norms(self.snapshot + params)).tolist()
        dn, wn = [0.0] * len(self.groups), [0.0] * len(self.groups)
        for j, i in enumerate(self._index_list):
            dn[i] += norms[j] * norms[j]
            wn[i] += norms[k + j] * norms[k + j]
        weights = [_root(w) for w in wn]
        ratios = []
        for w, d in zip(weights, dn):
            u = _root(d)
            ratios.append(u / w if w > 0 else (0.0 if u == 0 else math.inf))
        return weights + ratios

    def _norms(self, tensors: list) -> list:
        if self._float64:
            return [n.float() for n in torch._foreach_norm(tensors, 2)]
        return torch._foreach_norm(tensors, 2, dtype=torch.float32)

    def _detached(self) -> list:
        """The parameters' (local shards') tensors, detached."""
        if self.sharded:
            return [_local(p).detach() for p in self.params]
        return [p.detach() for p in self.params]  # no _local: a failed getattr a tensor

    def take_snapshot(self) -> None:
        """Copy the weights before the optimizer step (for the update ratio)."""
        params = self._detached()
        if self.snapshot is None:
            self.snapshot = [t.clone() for t in params]
        else:
            torch._foreach_copy_(self.snapshot, params)

    def update_stats(self) -> torch.Tensor | None:
        """[weight sums of squares per module..., update sums of squares per module...]."""
        if self.snapshot is None:
            return None
        params = self._detached()
        torch._foreach_sub_(self.snapshot, params)  # snapshot now holds -update
        dn = self._stack_sq(self._norms(self.snapshot))
        wn = self._stack_sq(self._norms(params))
        return torch.cat([self._group_sum(wn, self._index_all), self._group_sum(dn, self._index_all)])

    def release_snapshot(self) -> None:
        self.snapshot = None


def count_nonfinite(grads: list[torch.Tensor], total_sq: torch.Tensor) -> torch.Tensor:
    """Number of NaN/inf gradient entries, as a 1-element float32 tensor."""
    dev = total_sq.device
    if dev.type == "cpu":
        # On the CPU reading a value costs no stall, and a finite sum of squares means every
        # entry is finite, so the exact count is only taken on the rare bad step.
        if math.isfinite(float(total_sq)):
            return torch.zeros(1, device=dev)
        n = sum(int((~torch.isfinite(g)).sum()) for g in grads)
        return torch.tensor([float(n)], device=dev)
    return count_nonfinite_on_device(grads).to(dev)


def count_nonfinite_on_device(grads: list[torch.Tensor]) -> torch.Tensor:
    """The same count without reading anything back: x - x is 0 for finite x and NaN
    otherwise, and the L0 "norm" counts the non-zero entries (NaN != 0)."""
    diffs = torch._foreach_sub(grads, grads)
    if any(g.dtype == torch.float64 for g in grads):  # float32 would narrow float64: refused
        counts = [c.float() for c in torch._foreach_norm(diffs, 0)]
    else:  # counted in float32 even for float16 grads (whose largest value is 65504)
        counts = torch._foreach_norm(diffs, 0, dtype=torch.float32)
    dev = counts[0].device
    return torch.stack([c.to(dev) for c in counts]).sum().view(1)


LOGIT_NAMES_NO_TARGETS = ("logits/max_abs", "logits/mean_logz", "logits/sc_fraction", "logits/entropy")
LOGIT_OPS_NO_TARGETS = (MAX, MEAN, MEAN, MEAN)
LOGIT_NAMES = LOGIT_NAMES_NO_TARGETS + ("logits/zero_loss_fraction", "logits/median_margin")
LOGIT_OPS = LOGIT_OPS_NO_TARGETS + (MEAN, MEAN)


def logit_stats(logits: torch.Tensor, targets: torch.Tensor | None, ignore_index: int = -100) -> torch.Tensor:
    """Softmax-health statistics of a batch of logits over every row, in float32 with
    softmax's own ops (the monitor samples rows of large logits: see ``_logits``).

    ``logits`` is [..., classes] ([batch, classes] or [batch, seq, vocab]); ``targets`` has
    the leading shape and class indices; entries equal to ``ignore_index`` are left out.
    Returns the values named by ``LOGIT_NAMES`` (or ``LOGIT_NAMES_NO_TARGETS``).
    """
    z = logits.detach().reshape(-1, logits.shape[-1]).float()
    y = None if targets is None else targets.detach().reshape(-1)
    mx, mn = z.aminmax()
    max_abs = torch.maximum(mx.abs(), mn.abs()).view(1)
    values, _ = softmax_row_stats(z, y, ignore_index)
    return torch.cat([max_abs, values])


def softmax_row_stats(z: torch.Tensor, y: torch.Tensor | None, ignore_index: int = -100, host: bool = False):
    """Over the rows of ``z`` ([rows, classes], float32): [mean log Z, SC fraction, entropy]
    and with class indices ``y`` ([rows]) also [zero-loss fraction, median margin], as one
    tensor; and the number of rows counted (``ignore_index`` left out), a 1-element tensor.
    ``host=True`` (CPU tensors): the same as a list of floats and a float, the per-row values
    read at once and averaged on the host (see ``_row_stats_host``)."""
    if host:
        return _row_stats_host(z, y, ignore_index)
    # torch's own log_softmax, the kernel cross_entropy runs: its rounding decides which
    # samples have exactly zero loss and an exactly one-hot softmax, so we use it, not a copy.
    # The per-row statistics are stacked and averaged together: on a small batch each kernel
    # costs more than its arithmetic (a ~1 ms CPU step pays ~5-10 us per kernel), so fewer
    # kernels, the same products and sums.
    logp = torch.log_softmax(z, dim=-1)
    top = logp.amax(dim=-1)  # -log sum_j exp(z_j - max z)
    lse = z.amax(dim=-1) - top  # log Z
    collapsed = (top == 0).float()  # the sum is exactly 1: Softmax Collapse
    p = torch.softmax(z, dim=-1)  # cheaper on the CPU than logp.exp()
    ent = (p * logp).sum(dim=-1).neg_()
    if y is None:
        n = torch.full((1,), float(z.shape[0]), device=z.device)
        return torch.stack([lse, collapsed, ent]).mean(dim=1), n
    y = y.reshape(-1, 1)
    valid = y != ignore_index
    y = torch.where(valid, y, 0)
    valid = valid.view(-1)
    weight = valid.float()
    count = weight.sum().view(1)
    logp_y = logp.gather(-1, y).view(-1)
    zero_loss = (logp_y == 0).float()
    # Margin z_y - logsumexp(z_others) = log p_y - log(sum of the others' p), the others'
    # sum taken on its own: 1 - p_y cancels to 0 in float32 right where it matters (> 16.6).
    p.scatter_(-1, y, 0.0)
    margin = (logp_y - p.sum(dim=-1).log()).masked_fill_(~valid, math.nan)
    means = (torch.stack([lse, collapsed, ent, zero_loss]) * weight).sum(dim=1) / count.clamp_min(1.0)
    return torch.cat([means, margin.nanmedian().view(1)]), count


def _row_stats_host(z: torch.Tensor, y: torch.Tensor | None, ignore_index: int):
    """``softmax_row_stats`` for a few rows on the CPU: the same kernels up to the per-row
    values (log_softmax, softmax, the gathers), which are read in one go and finished in
    Python (in double: the same values to float32 rounding). On a ~1 ms step each of the ~20
    small kernels this saves costs more than the Python that replaces it."""
    logp = torch.log_softmax(z, dim=-1)
    p = torch.softmax(z, dim=-1)
    per_row = [logp.amax(dim=-1), z.amax(dim=-1), (p * logp).sum(dim=-1)]
    if y is not None:
        labels = y.tolist()
        valid = [1.0 if t != ignore_index else 0.0 for t in labels]
        y = y.view(-1, 1)
        if 0.0 in valid:
            y = torch.where(y != ignore_index, y, 0)
        per_row.append(logp.gather(-1, y).view(-1))
        p.scatter_(-1, y, 0.0)
        per_row.append(p.sum(dim=-1))
    rows = torch.stack(per_row).tolist()
    top, zmax, plogp = rows[0], rows[1], rows[2]
    lse = [m - t for m, t in zip(zmax, top)]
    ent = [-v for v in plogp]
    if y is None:
        n = float(len(top))
        return [sum(lse) / n, sum([1.0 if t == 0 else 0.0 for t in top]) / n, sum(ent) / n], n
    logp_y, others = rows[3], rows[4]
    count = sum(valid)
    n = max(count, 1.0)
    if 0.0 not in valid:  # every row counted (no ignore_index): the same sums, in fewer steps
        return _all_rows_host(lse, top, ent, logp_y, others, n), count
    collapsed = [1.0 if t == 0 else 0.0 for t in top]

    def vmean(xs):  # x * 0 keeps a NaN in an ignored row, as the tensor path's sum does
        return sum(x * w for x, w in zip(xs, valid)) / n

    margins = sorted(
        ly - (math.log(o) if o > 0 else (-math.inf if o == 0 else math.nan))
        for ly, o, w in zip(logp_y, others, valid)
        if w
    )
    margins = [m for m in margins if m == m]
    zero_loss = [1.0 if v == 0 else 0.0 for v in logp_y]
    # torch.nanmedian: the lower of the two middle values, NaN when none is left
    median = margins[(len(margins) - 1) // 2] if margins else math.nan
    return [vmean(lse), vmean(collapsed), vmean(ent), vmean(zero_loss), median], count


def _all_rows_host(lse, top, ent, logp_y, others, n):
    """``_row_stats_host``'s means and median when every row counts (every weight 1.0): the
    same values, bit for bit. ``x * 1.0`` is ``x`` (NaN and -0.0 too), so each weighted sum is
    the plain sum in the same order; a sum of 1.0s and 0.0s is the count of 1.0s; and
    ``math.log(o)`` is what the general path takes for ``o > 0`` or NaN, raising for the rest,
    which the general path then handles. The margins are sorted in the same order as there."""
    try:
        margins = sorted(map(operator.sub, logp_y, map(math.log, others)))
    except ValueError:  # a row whose other classes sum to 0 (or less): the general path
        margins = sorted(
            ly - (math.log(o) if o > 0 else (-math.inf if o == 0 else math.nan)) for ly, o in zip(logp_y, others)
        )
    total = sum(margins)
    if total != total:  # a NaN among them (or +inf and -inf): left out, as the general path does
        margins = [m for m in margins if m == m]
    median = margins[(len(margins) - 1) // 2] if margins else math.nan
    return [sum(lse) / n, float(top.count(0.0)) / n, sum(ent) / n, float(logp_y.count(0.0)) / n, median]


def _root(sq: float) -> float:
    """A norm from its square, as ``finish`` takes it (a negative or NaN square is kept)."""
    return math.sqrt(sq) if sq >= 0 else sq


def finish(names: tuple, values: list[float]) -> list[float]:
    """Turn packed squares into norms and ratios, on the host, in place."""
    for i, name in enumerate(names):
        if name.startswith(("grad/norm", "weight/norm/")):
            values[i] = math.sqrt(values[i]) if values[i] >= 0 else values[i]
    # update ratios follow the weight norms of the same modules (see update_names)
    k = 0
    for i, name in enumerate(names):
        if name.startswith("update_ratio/"):
            if k == 0:
                k = sum(1 for n in names if n.startswith("update_ratio/"))
                w0 = i - k
            w = values[w0 + (i - w0 - k)]
            u = math.sqrt(values[i]) if values[i] >= 0 else values[i]
            values[i] = u / w if w > 0 else (0.0 if u == 0 else math.inf)
    return values
