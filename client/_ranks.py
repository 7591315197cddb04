"""Ranks drifting apart: every few steps, do the data-parallel replicas still hold one model?

Under DDP every rank applies the same all-reduced gradient to the same weights with the same
optimizer, so the replicas' parameters are bit-identical after every step. A silent error
breaks that without any loss or gradient-norm monitor noticing (TrainCheck, OSDI 2025: two
of twenty such bugs were caught by those): a rank that skips an optimizer step, a weight
changed outside the all-reduce (a gradient hook, an in-place edit on one rank, a buffer or
parameter not registered with DDP), a corrupted replica. From then on the ranks train
different models and average gradients that belong to none of them.

Every ``rank_check_every`` logging calls (the first call, then every N: ranks agree on it
because they call ``log`` in lockstep, as the per-step gather of metrics already requires)
each rank reduces its replicated parameters to a few numbers on the device -- an exact bit
checksum (the sum of the weights' bytes read as 32-bit integers, mod 2^32: order-free, so
thread counts and reduction order cannot make equal weights look different, and any single
changed weight changes it), the same checksum of the optimizer state, and the weights'
squared norm -- and one small all-gather (world x 5 float64) brings every rank's numbers to
every rank. The sender thread of rank 0 compares the checksums: the ranks whose checksums
differ from the most common ones (ties go to the group that holds rank 0) disagree. It sends

- ``ddp/ranks_disagreeing``: how many ranks disagree (0 on a healthy run, exactly);
- ``ddp/param_checksum_spread``: the largest relative difference of a disagreeing rank's
  weight norm from the reference's, ``|norm_r - norm_ref| / norm_ref``, a lower bound of the
  replicas' relative distance ``||w_r - w_ref|| / ||w_ref||`` (exactly 0 while they agree;
  it can be 0 for ranks that disagree, when only bits or the optimizer state differ);
- ``ddp/rank_drift/<r>``: that difference for each disagreeing rank ``r`` (only for them).

Only plain (replicated) parameters are checked: a sharded one (a DTensor of FSDP2 or tensor
parallel, or any parameter of a model wrapped in FSDP1) differs across ranks by design and
is left out, and a model with none left is not checked. Ranks holding different numbers of
elements (pipeline stages) are not compared. A job whose ranks hold different weights of the
same shapes by design (tensor parallel over the default group with plain tensors) must pass
``rank_check_every=None``.
"""

from __future__ import annotations

import math
import time

import torch

from . import _errors

#: Logging calls between two checks. A check reads every parameter and optimizer-state
#: element once (two reductions over the weights, one over each state tensor) and gathers
#: 40 bytes per rank. Measured on the CPU (benchmarks/rank_check_cost.py, one thread, Adam,
#: batch 64): a check costs 0.2x a training step of 1.3M- and 4.7M-parameter MLPs and 0.7x
#: for a 0.27M one (fixed per-tensor costs), so 0.4% to 1.4% of the run at one check per 50
#: steps; a drift is told within 50 steps of its start.
RANK_CHECK_EVERY = 50
#: The op that marks a record of gathered checksums (``_monitor.finish_values`` hands it here).
OP = "ranks"
SPREAD = "ddp/param_checksum_spread"
DISAGREEING = "ddp/ranks_disagreeing"
RANK_DRIFT = "ddp/rank_drift/"

# Columns of one rank's row: computed (1) or failed (0), elements checked, the parameters'
# bit checksum, the optimizer state's, the squared norm of the parameters.
_OK, _NUMEL, _PH, _SH, _S2 = range(5)
_COLUMNS = 5
_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def check_rank_every(every) -> None:
    """Misuse raises at once: a positive int, or None to turn the check off."""
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(
            "rank_check_every must be a positive int (compare the ranks' weights every N steps) "
            f"or None (no check), not {every!r}"
        )


def replicated(model: torch.nn.Module, params: list) -> list:
    """The parameters every data-parallel rank holds whole (see the module docstring)."""
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        return []
    return [p for p in params if not hasattr(p, "to_local") and not getattr(p, "_is_flat_param", False)]


class RankCheck:
    """The check on one rank: ``due(calls)`` says whether this ``log`` call checks, ``run``
    computes, gathers and queues the record for the sender.

    >>> check = RankCheck(params, optimizer, dist, world, every=50)
    >>> if check.due(calls): check.run(step, sender)
    """

    def __init__(self, params: list, optimizer, dist, world: int, every: int):
        self.params = params
        self.optimizer = optimizer
        self.dist = dist
        self.world = world
        self.every = every
        self.device = params[0].device
        torch.zeros(1, dtype=torch.float64, device=self.device)  # a device without float64 raises here
        self.names = (SPREAD, DISAGREEING) + tuple(f"{RANK_DRIFT}{r}" for r in range(world))
        self.ops = (OP,) * len(self.names)
        #: Seconds the checks took on this rank (the local reductions and the gather), and how many.
        self.seconds = 0.0
        self.checks = 0

    def due(self, calls: int) -> bool:
        return (calls - 1) % self.every == 0

    def run(self, step: int, sender) -> None:
        """Check now. The gather happens whatever fails before it: a rank that skipped it
        would leave the others waiting in it for ever."""
        t0 = time.perf_counter()
        try:
            row = self._local()
        except Exception as exc:  # noqa: BLE001 - our bug: this rank's row says "failed"
            _errors.report("rank check", exc)
            row = torch.zeros(_COLUMNS, dtype=torch.float64, device=self.device)
        out = row.new_empty(self.world * _COLUMNS)
        self.dist.all_gather_into_tensor(out, row)
        packed, ready = out.view(self.world, _COLUMNS), None
        if sender is not None:
            if packed.device.type != "cpu":
                host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=packed.device.type == "cuda")
                host.copy_(packed, non_blocking=True)
                if packed.device.type == "cuda":
                    ready = torch.cuda.Event()
                    ready.record()  # the sender thread waits on it, the training thread never
                packed = host
            sender.put(("points", step, time.time(), self.names, self.ops, packed, ready, (), ()))
        self.checks += 1
        self.seconds += time.perf_counter() - t0

    @torch.no_grad()
    def _local(self) -> torch.Tensor:
        bits, norms, numel = [], [], 0
        for p in self.params:
            p = p.detach()
            numel += p.numel()
            b = _bits(p)
            if b is not None:
                bits.append(b)
            if p.is_floating_point():
                norms.append(torch.linalg.vector_norm(p))
        state = []
        opt_state = self.optimizer.state if self.optimizer is not None else {}
        for p in self.params:
            st = opt_state.get(p)
            if not st:
                continue
            for v in st.values():
                # step counters (scalars, often on the CPU) follow the weights; moments do not
                if isinstance(v, torch.Tensor) and v.numel() > 1 and v.device == self.device:
                    b = _bits(v.detach())
                    if b is not None:
                        state.append(b)
        dev, f64 = self.device, torch.float64
        zero = torch.zeros((), dtype=f64, device=dev)
        return torch.stack(
            [
                torch.ones((), dtype=f64, device=dev),
                torch.tensor(float(numel), dtype=f64, device=dev),
                torch.stack(bits).sum(dtype=torch.int32).double() if bits else zero,
                torch.stack(state).sum(dtype=torch.int32).double() if state else zero,
                torch.stack(norms).double().square().sum() if norms else zero,
            ]
        )


def _bits(t: torch.Tensor):
    """The sum of ``t``'s bytes read as int32 words, wrapping (mod 2^32): exact, and the same
    in any order of summation. (A wide accumulator, int64, cost 80x more on the CPU.)"""
    flat = t.reshape(-1)
    if flat.numel() * flat.element_size() % 4 == 0:
        return flat.view(torch.int32).sum(dtype=torch.int32)
    dtype = _INT.get(flat.element_size())
    return None if dtype is None else flat.view(dtype).sum(dtype=torch.int32)


def summarise(packed) -> list:
    """The gathered rows (world x 5) as the values of ``RankCheck.names``; None for a
    series not sent at this check (the drift of a rank that agrees)."""
    rows = packed.tolist()
    world = len(rows)
    out: list = [None] * (2 + world)
    ok = [r for r in range(world) if rows[r][_OK] == 1.0]
    if not ok or len({rows[r][_NUMEL] for r in ok}) > 1:
        return out  # nothing computed, or ranks holding different parameters: nothing to compare
    keys = {r: (rows[r][_PH], rows[r][_SH]) for r in ok}  # exact: the norms are not (reduction order)
    groups: dict = {}
    for r in ok:
        groups.setdefault(keys[r], []).append(r)
    # the most common numbers are the reference; on a tie, the group holding the lowest rank
    ref_key = max(groups, key=lambda k: (len(groups[k]), -groups[k][0]))
    ref = rows[groups[ref_key][0]]
    spread = 0.0
    count = 0
    for r in ok:
        if keys[r] == ref_key:
            continue
        count += 1
        d = _distance(rows[r], ref)
        out[2 + r] = d
        spread = d if d != d or d > spread else spread
    out[0], out[1] = spread, float(count)
    return out


def _distance(row: list, ref: list) -> float:
    """``|norm - norm_ref| / norm_ref``: a lower bound of the replicas' relative distance
    ``||w - w_ref|| / ||w_ref||`` (0 when only the bits, or the optimizer state, differ)."""
    norm_ref = math.sqrt(ref[_S2]) if ref[_S2] >= 0 else math.nan
    norm = math.sqrt(row[_S2]) if row[_S2] >= 0 else math.nan
    diff = abs(norm - norm_ref)
    if diff != diff:
        return math.nan
    if norm_ref == 0:
        return math.inf if diff > 0 else 0.0
    return diff / norm_ref
