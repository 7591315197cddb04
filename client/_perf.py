"""Step time, throughput and CUDA memory: cheap host numbers sent with every step.

The step time is the time from one ``log`` call to the next (the cost budget's step; the
clock is the monitor's, injected in tests), sent as ``perf/step_ms`` at the step it closes.
Samples per second follow when the batch size is known: ``attach(..., batch_size=N)``, else
the first dimension of ``targets`` (or of ``logits``) given to ``log``. On a CUDA model,
``torch.cuda.memory_allocated`` and ``max_memory_allocated`` (the caching allocator's own
counters: host reads, no device synchronisation) give ``perf/cuda_mem_mb`` and
``perf/cuda_mem_peak_mb``. A few host floats per step; no kernel, no copy.
"""

from __future__ import annotations

import torch

MB = 2**20


class StepPerf:
    """Adds the step's ``perf/*`` numbers to the host values of a record."""

    def __init__(self, device, batch_size: int | None = None) -> None:
        self.batch_size = batch_size
        self._last: float | None = None
        self._cuda = device if getattr(device, "type", None) == "cuda" else None

    def record(self, start: float, batch: int | None, host_names: list, host_values: list) -> None:
        """The numbers of the step that ends at ``start``; ``batch``: the first dimension of the
        logits (and targets) given to ``log``, or None."""
        last, self._last = self._last, start
        if last is not None and start > last:
            gap = start - last
            host_names.append("perf/step_ms")
            host_values.append(gap * 1e3)
            n = self.batch_size or batch
            if n:
                host_names.append("perf/samples_per_s")
                host_values.append(n / gap)
        if self._cuda is not None:
            host_names += ("perf/cuda_mem_mb", "perf/cuda_mem_peak_mb")
            host_values += (
                torch.cuda.memory_allocated(self._cuda) / MB,
                torch.cuda.max_memory_allocated(self._cuda) / MB,
            )
