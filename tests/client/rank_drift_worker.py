"""One rank of the rank-drift test (run by test_rank_drift.py, not collected by pytest).

Real DDP over gloo on the CPU. ``scenario``: ``healthy``; ``nudge`` (rank 1 adds 1e-3 to one
weight of its replica after the optimizer step of ``AT``, outside the all-reduce); ``skip``
(rank 1 skips its optimizer step at ``AT``, its Adam state and weights fall one step behind);
``broken`` (rank 1's checksum code raises from ``AT`` on: the hook swallows and counts it and
still joins the gather, or rank 0 would wait in it for ever).
"""

import gc
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import TinyNet, batch

import stethoscope
from stethoscope import _errors

STEPS = 60
EVERY = 10
AT = 33


def main(scenario, rank, world, port, url, spool, out):
    swallowed = []
    _errors.add_listener(lambda where, exc: swallowed.append(f"{where}: {exc!r}"))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different initial weights: DDP's broadcast from rank 0 must make them one
    model = torch.nn.parallel.DistributedDataParallel(TinyNet())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = stethoscope.attach(model, opt, server=url, spool_dir=spool, rank_check_every=EVERY)
    alerts = []
    mon.on_alert(alerts.extend)
    for step in range(STEPS):
        x, y = batch(n=16, seed=1000 * step + rank)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        if not (scenario == "skip" and rank == 1 and step == AT):
            opt.step()
        if scenario == "broken" and rank == 1 and step == AT:
            mon._ranks._local = lambda: 1 / 0
        if scenario == "nudge" and rank == 1 and step == AT:
            with torch.no_grad():
                model.module.head.weight[0, 0] += 1e-3
        mon.log(step=step, loss=loss, logits=logits, targets=y)
    mon.flush()
    record = {
        "run_id": mon.run_id,
        "alerts": [
            {k: a[k] for k in ("detector", "key", "severity", "start_step", "message", "evidence")} for a in alerts
        ],
        "checks": mon._ranks.checks,
        "check_seconds": mon._ranks.seconds,
    }
    mon.close()
    record["internal_errors"] = swallowed
    with open(out, "w") as f:
        json.dump(record, f)
    del model, opt, mon, logits, loss
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    scenario, rank, world, port, url, spool, out = sys.argv[1:]
    main(scenario, int(rank), int(world), int(port), url, spool, out)
