"""Dead units: the share of a ReLU layer's units that output zero on the whole batch.

Opt-in (``attach(..., dead_units=True)``): forward hooks on every ``nn.ReLU`` and
``nn.ReLU6`` module (and ``nn.Hardtanh`` with a floor of 0) compute, on the device and only
on the steps that carry the expensive set, ``1 - mean_units(any_batch(output != 0))`` -- a
comparison, a reduction over the batch and a mean: one read of the activation, a few
kernels, no host synchronisation. The next ``log`` packs the shares with the step's other
device values (``dead/<module>``). A unit is a feature (the last dimension) of a 2-D or 3-D
output (``[batch, features]``, ``[batch, tokens, features]``) and a channel (dimension 1) of
a 4-D or 5-D one (convolutions). Activations that are never exactly zero (LeakyReLU, GELU,
SiLU) have no dead units in this sense and are not hooked; ``F.relu`` called as a function
cannot be hooked (use the module). A module called several times in a step (one ``nn.ReLU``
reused, gradient accumulation) reports the mean of its calls; forward passes without
gradients or in eval mode (evaluations) are left out.
"""

from __future__ import annotations

import torch

from . import _errors

#: Series per run: past this many activation modules the rest are not hooked (the hook's
#: per-module series stay near its 64-series default).
MAX_DEAD_MODULES = 64
PREFIX = "dead/"


def _is_relu(m) -> bool:
    nn = torch.nn
    if isinstance(m, (nn.ReLU, nn.ReLU6)):
        return True
    return type(m) is nn.Hardtanh and m.min_val == 0.0


class DeadUnits:
    """Forward hooks that measure the dead share of each ReLU module on the active steps.

    >>> dead = DeadUnits(model, charge=budget.charge, clock=time.perf_counter)
    >>> dead.active = True        # this step carries the expensive set
    >>> model(x)                  # the hooks record
    >>> dead.take()               # ([1-element tensors], (names,)) or None
    """

    def __init__(self, model, charge, clock) -> None:
        self.active = False
        self._charge = charge
        self._clock = clock
        self._sums: dict = {}
        self._hooks = []
        self.names: list[str] = []
        for name, m in model.named_modules():
            if _is_relu(m) and len(self.names) < MAX_DEAD_MODULES:
                series = PREFIX + (name or "model")
                self.names.append(series)
                self._hooks.append(m.register_forward_hook(self._hook(series)))

    def _hook(self, series):
        def hook(module, args, out):
            if not self.active or not module.training or not torch.is_grad_enabled():
                return
            t0 = self._clock()
            with _errors.swallowed("dead units hook"):
                share = dead_share(out.detach())
                if share is not None:
                    prev = self._sums.get(series)
                    self._sums[series] = (share, 1) if prev is None else (prev[0] + share, prev[1] + 1)
            self._charge(self._clock() - t0)

        return hook

    def take(self):
        """This step's shares (one 1-element float tensor each, and their names), or None; resets."""
        if not self._sums:
            return None
        sums, self._sums = self._sums, {}
        names = tuple(sums)
        return [(s / n if n > 1 else s) for s, n in sums.values()], names

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def dead_share(out):
    """Share of units of ``out`` (batch first) that are zero on every element of the batch,
    as a 1-element float32 tensor on its device; None for a shape without units."""
    if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.numel() == 0:
        return None
    if out.dim() >= 4:  # [batch, channels, *spatial]: a unit is a channel
        alive = (out != 0).transpose(0, 1).reshape(out.shape[1], -1).any(dim=1)
    else:  # [batch, features] or [batch, tokens, features]: a unit is a feature
        alive = (out != 0).reshape(-1, out.shape[-1]).any(dim=0)
    return (1.0 - alive.float().mean()).reshape(1)
