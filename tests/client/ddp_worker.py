"""One rank of the distributed test (run by test_integrations.py, not collected by pytest)."""

import gc
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import TinyNet, batch

import stethoscope
from stethoscope import _errors

STEPS = 5


def main(mode, rank, world, port, url, spool, out):
    swallowed = []
    _errors.add_listener(lambda where, exc: swallowed.append(f"{where}: {exc!r}"))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = TinyNet()
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in (model.body, model.head):
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = stethoscope.attach(model, opt, server=url, spool_dir=spool, every=1)  # every metric, every step
    record = {"run_id": mon.run_id, "losses": [], "rank": rank}
    for step in range(STEPS):
        x, y = batch(n=16, seed=1000 * step + rank)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.log(step=step, loss=loss, logits=logits, targets=y)
        record["losses"].append(loss.item())
    mon.close()
    record["internal_errors"] = swallowed
    with open(out, "w") as f:
        json.dump(record, f)
    # DDP and FSDP keep their process group alive through reference cycles; left to the
    # interpreter's exit, gloo's threads were torn down after it and the rank aborted now and
    # then ("terminate called without an active exception").
    del model, opt, mon, logits, loss
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, rank, world, port, url, spool, out = sys.argv[1:]
    main(mode, int(rank), int(world), int(port), url, spool, out)
