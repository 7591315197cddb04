"""What one rank check costs, against a training step of the same model (CPU, one process).

A one-rank gloo group is enough to time what each rank does: the local reductions (bit
checksums of the weights and of the Adam state, sum and sum of squares in float64) and the
all-gather of its 64 bytes (a real gather on one rank: no network; on N ranks the gather of
N x 64 bytes adds one small-message latency). Each model trains with Adam (batch 64);
steps and checks alternate in rounds, medians over rounds.

Prints one JSON line per model: ``params``, ``step_ms`` (forward, backward, Adam step),
``check_ms``, ``check_over_step`` and ``share_at_default`` = check / (50 steps), the share of
the run's time the default spacing (``RANK_CHECK_EVERY``) adds.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "client"))


def mlp(width, depth, d_in=256, classes=10):
    layers, d = [], d_in
    for _ in range(depth):
        layers += [torch.nn.Linear(d, width), torch.nn.ReLU()]
        d = width
    return torch.nn.Sequential(*layers, torch.nn.Linear(d, classes))


def main():
    from stethoscope._ranks import RANK_CHECK_EVERY, RankCheck

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29613", rank=0, world_size=1)
    for name, model in (("mlp_0.3M", mlp(256, 4)), ("mlp_1.3M", mlp(1024, 2)), ("mlp_4.7M", mlp(2048, 2))):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        params = [p for p in model.parameters()]
        check = RankCheck(params, opt, dist, 1, RANK_CHECK_EVERY)
        x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
        steps, checks = [], []
        for r in range(12):
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            t1 = time.perf_counter()
            check.run(r, None)
            t2 = time.perf_counter()
            if r >= 2:
                steps.append(t1 - t0)
                checks.append(t2 - t1)
        step, chk = statistics.median(steps), statistics.median(checks)
        n = sum(p.numel() for p in params)
        print(
            json.dumps(
                {
                    "model": name,
                    "params": n,
                    "step_ms": round(step * 1e3, 3),
                    "check_ms": round(chk * 1e3, 3),
                    "check_over_step": round(chk / step, 3),
                    "share_at_default": round(chk / (RANK_CHECK_EVERY * step), 5),
                }
            )
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
