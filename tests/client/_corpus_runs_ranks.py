"""The corpus's two-rank DDP trainings for issue 17's ranks drifting apart (seeded, CPU, gloo).

``ranks(...)`` starts two processes of this file (real ``torch.distributed`` over gloo, real
DDP), trains a small MLP and returns rank 0's points: ``loss``, ``lr``, what the hook's rank
check sends at every check (``stethoscope._ranks``: its ``RankCheck`` and ``summarise``, every
``every`` steps from step 0) and, every step, the ground truth the hook cannot afford: the
largest ``|w_1 - w_0|`` over every weight of the two replicas, from a full gather of them
(``truth/replica_max_abs_diff``; no detector reads it). ``kind`` picks what goes wrong at
step ``at`` on rank 1:

- ``nudge``: one weight moved by 1e-3, outside the all-reduce;
- ``skip``: its optimizer step skipped (its weights and optimizer state fall one step behind);
- ``ulp``: one weight moved by one float32 ulp (the smallest change there is);
- ``lr``: its learning rate 1% higher from then on (a per-rank schedule bug);
- ``healthy``: nothing.

What happened is decided afterwards from the series (``_corpus_labels``), never from these
parameters. Each run takes a few seconds, most of it two interpreters importing torch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def ranks(
    kind: str = "healthy",
    seed: int = 0,
    steps: int = 400,
    every: int = 50,
    at: int = 133,
    opt: str = "sgdm",
    lr: float = 0.05,
    batch: int = 32,
) -> list:
    """Train on two ranks; return rank 0's points ``[(series, step, value), ...]``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = dict(kind=kind, seed=seed, steps=steps, every=every, at=at, opt=opt, lr=lr, batch=batch)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rank0.json")
        procs = [
            subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), json.dumps(params), str(r), str(port), out],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for r in range(2)
        ]
        for p in procs:
            text, _ = p.communicate(timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"rank failed: {text.decode()[-2000:]}")
        with open(out) as f:
            return [tuple(p) for p in json.load(f)]


class _Capture:
    def __init__(self):
        self.records = []

    def put(self, rec):
        self.records.append(rec)


def _rank(params: dict, rank: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from stethoscope._ranks import RankCheck, summarise

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    seed, kind, at, lr = params["seed"], params["kind"], params["at"], params["lr"]
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
    model = torch.nn.parallel.DistributedDataParallel(net)
    if params["opt"] == "adam":
        o = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        o = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(1000 * seed + rank)  # each rank its own batches
    teacher = torch.Generator().manual_seed(seed)
    w_true = torch.randn(20, 10, generator=teacher)
    check = RankCheck(list(model.parameters()), o, dist, 2, params["every"])
    cap = _Capture()
    points: list = []
    for step in range(params["steps"]):
        if kind == "lr" and rank == 1 and step == at:
            for group in o.param_groups:
                group["lr"] *= 1.01
        x = torch.randn(params["batch"], 20, generator=g)
        y = (x @ w_true + 0.5 * torch.randn(params["batch"], 10, generator=g)).argmax(1)
        loss = F.cross_entropy(model(x), y)
        o.zero_grad()
        loss.backward()
        if not (kind == "skip" and rank == 1 and step == at):
            o.step()
        if rank == 1 and step == at and kind in ("nudge", "ulp"):
            with torch.no_grad():
                w = net[2].weight
                w[3, 5] = w[3, 5] + 1e-3 if kind == "nudge" else torch.nextafter(w[3, 5], torch.tensor(float("inf")))
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
            both = flat.new_empty(2 * flat.numel())
            dist.all_gather_into_tensor(both, flat)
        if rank == 0:
            a, b = both.view(2, -1)
            points += [
                ("loss", step, loss.item()),
                ("lr", step, o.param_groups[0]["lr"]),
                ("truth/replica_max_abs_diff", step, float((a - b).abs().max())),
            ]
        if step % params["every"] == 0:
            check.run(step, cap if rank == 0 else None)
            if rank == 0:
                rec = cap.records.pop()
                for name, v in zip(rec[3], summarise(rec[5])):
                    if v is not None:
                        points.append((name, step, v))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(points, f)
    # DDP keeps its process group alive through reference cycles: collected before the group
    # is destroyed, or gloo's threads are torn down after it and the rank aborts now and then
    # (as in ddp_worker.py)
    del model, net, o, check, loss
    import gc

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _rank(json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
