"""Cost of continual evaluation per training step: the same loop with and without a
``ContinualEvaluator`` evaluating every step. Prints JSON; no asserts.

    python benchmarks/continual_eval.py [--steps 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import stethoscope


def loop(model, opt, steps, ev=None, batch=32, dim=16, classes=8):
    g = torch.Generator().manual_seed(0)
    x_all = torch.randn(4096, dim, generator=g)
    y_all = torch.randint(0, classes, (4096,), generator=g)
    t0 = time.perf_counter()
    for step in range(steps):
        i = torch.randint(4096, (batch,), generator=g)
        loss = F.cross_entropy(model(x_all[i]), y_all[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ev is not None:
            ev(step)
    return (time.perf_counter() - t0) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = []
    for hidden in (64, 512):
        for per_task in (300, 1000):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 8))
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            loop(model, opt, 30)  # warm-up
            base = loop(model, opt, args.steps)
            ev = stethoscope.ContinualEvaluator(model, every=1)
            for t in range(4):
                ev.add_task(t, torch.randn(per_task, 16), torch.randint(0, 8, (per_task,)))
            loop(model, opt, 30, ev)
            with_ev = loop(model, opt, args.steps, ev)
            out.append(
                {
                    "hidden": hidden,
                    "tasks": 4,
                    "samples_per_task": per_task,
                    "train_step_ms": base * 1e3,
                    "with_eval_ms": with_ev * 1e3,
                    "eval_ms_per_step": (with_ev - base) * 1e3,
                    "overhead": (with_ev - base) / base,
                }
            )
    print(json.dumps({"benchmark": "continual_eval", "threads": args.threads, "results": out}, indent=1))


if __name__ == "__main__":
    main()
