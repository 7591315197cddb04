"""A tiny real training with the real hook, run as its own process by the fault tests.

It logs every step (loss, logits, gradients through ``stethoscope.attach``, plus ``extra``
scalar series to make entries bigger), paced by ``--sleep``, and writes what it logged to
``--out`` as JSON: the run id, each step's loss as the hook saw it (``repr``, so NaN
survives), the monitor's drop count.
With ``--pause-at`` it writes ``<out>.paused`` after that step and waits for ``<out>.go``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import stethoscope


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--sleep", type=float, default=0.02)
    p.add_argument("--spool", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--extra", type=int, default=0, help="extra scalar series per step")
    p.add_argument("--flush-every-step", action="store_true", help="one spool entry per step")
    p.add_argument("--pause-at", type=int, default=None)
    p.add_argument("--close-timeout", type=float, default=60.0)
    p.add_argument("--nan-at", type=int, default=None, help="log a NaN loss at this step (training itself goes on)")
    p.add_argument("--fsize-limit", type=int, default=None, help="RLIMIT_FSIZE in bytes (a full disk without a mount)")
    a = p.parse_args()
    if a.fsize_limit:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (a.fsize_limit, a.fsize_limit))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # every=1: the fault tests check that every series has every step
    mon = stethoscope.attach(model, opt, run=a.run, project="faults", server=a.server, spool_dir=a.spool, every=1)
    out = Path(a.out)
    losses = []
    g = torch.Generator().manual_seed(1)
    for step in range(a.steps):
        x = torch.randn(32, 8, generator=g)
        y = torch.randint(0, 4, (32,), generator=g)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        extra = {f"extra/s{i:03d}": float(step * 1000 + i) for i in range(a.extra)}
        logged = loss * float("nan") if step == a.nan_at else loss
        mon.log(step=step, loss=logged, logits=logits, targets=y, **extra)
        losses.append(logged.item())
        if a.flush_every_step:
            mon.flush(timeout=5)
        if a.pause_at is not None and step == a.pause_at:
            Path(str(out) + ".paused").write_text(json.dumps({"dropped": mon.dropped}))
            while not Path(str(out) + ".go").exists():
                time.sleep(0.05)
        time.sleep(a.sleep)
    mon.close(timeout=a.close_timeout)
    out.write_text(
        json.dumps({"run": a.run, "losses": [repr(v) for v in losses], "dropped": mon.dropped, "pid": os.getpid()})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
