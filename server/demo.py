"""``make demo``: the server on the embedded SQLite default, and real small CPU trainings
streaming into it live through the hook, each showing a phenomenon Stethoscope flags.

    python -m stethoscope_server.demo [--db URL] [--port 8765] [--exit]

1. modular arithmetic, (a + b) mod 23, full batch, Adam, float32: memorises the training set,
   then grows its logits until float32 softmax turns one-hot: Softmax Collapse;
2. a classifier on noisy blobs whose batches are corrupted three times: loss spikes that recover;
3. the same classifier warmed up to a learning rate far too high: divergence, then NaN;
4. full-batch gradient descent on a small regression MLP: sharpness rises to 2/lr (curvature).

The server keeps serving afterwards (Ctrl-C stops it) unless ``--exit`` is given.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import time

from .process import start_server_process, stop_process

DEFAULT_PORT = 8765
#: The demo's trainings are tiny CPU models (a step of a few ms), where the hook's default cost
#: budget would leave the expensive series (per-module norms, the logit statistics the
#: Softmax-Collapse detector reads) to every 100th step: the demo measures everything.
DEMO_EVERY = 1


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def modular_softmax_collapse(server: str, steps: int) -> str:
    import torch
    import torch.nn.functional as F

    import stethoscope

    p = 23
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    keep = torch.randperm(p * p, generator=g)[: p * p // 2]
    a, b, y = a[keep], b[keep], ((a + b) % p)[keep]
    model = torch.nn.ModuleDict(
        {
            "emb": torch.nn.Embedding(p, 32),
            "mlp": torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, p)),
        }
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    run = f"modular-sc-{int(time.time())}"
    with stethoscope.attach(
        model,
        opt,
        run=run,
        project="demo",
        server=server,
        config={"task": "(a+b) mod 23", "lr": 0.05, "optimizer": "Adam", "dtype": "float32"},
        every=DEMO_EVERY,
        tags=["softmax-collapse"],
    ) as mon:
        for step in range(steps):
            z = model["mlp"](torch.cat([model["emb"](a), model["emb"](b)], 1))
            loss = F.cross_entropy(z, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log(step=step, loss=loss, logits=z, targets=y, **{"train/acc": (z.argmax(1) == y).float().mean()})
    return run


def _blobs(seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 20, generator=g)
    y = torch.randint(0, 10, (4000,), generator=g)
    x = centers[y] + 1.5 * torch.randn(4000, 20, generator=g)
    return x, y, g


def classifier(server: str, name: str, steps: int, lr_at, corrupt=(), tags=()) -> str:
    import torch
    import torch.nn.functional as F

    import stethoscope

    x, y, g = _blobs(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr_at(0), momentum=0.9)
    run = f"{name}-{int(time.time())}"
    with stethoscope.attach(
        model,
        opt,
        run=run,
        project="demo",
        server=server,
        config={"lr": lr_at(0), "batch": 32},
        tags=list(tags),
        every=DEMO_EVERY,
    ) as mon:
        bad_since = None
        for step in range(steps):
            i = torch.randint(0, len(x), (32,), generator=g)
            xb, yb = x[i], y[i]
            if step in corrupt:
                xb, yb = 3 * xb, yb[torch.randperm(32, generator=g)]
                mon.event("note", message=f"corrupted batch at step {step}")
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            z = model(xb)
            loss = F.cross_entropy(z, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log(step=step, loss=loss, logits=z, targets=yb)
            if not math.isfinite(loss.item()):
                bad_since = step if bad_since is None else bad_since
                if step - bad_since >= 5:
                    mon.close(status="diverged")
                    break
    return run


def sharpening(server: str, steps: int) -> str:
    import torch

    import stethoscope

    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = torch.sin(x @ torch.randn(10, 1))
    model = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    lr = 0.2  # 2/lr = 10: progressive sharpening carries lambda_max up to it
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = torch.nn.MSELoss()
    run = f"edge-of-stability-{int(time.time())}"
    with stethoscope.attach(
        model,
        opt,
        run=run,
        project="demo",
        server=server,
        config={"lr": lr, "full_batch": True},
        tags=["curvature"],
        every=DEMO_EVERY,
    ) as mon:
        mon.watch_curvature(model, loss_fn, batch=(x, y), every=10)
        for step in range(steps):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log(step=step, loss=loss)
    return run


def closing_message(url: str) -> str:
    """The last words of the demo: the pages to open (the dashboard, not the JSON API)."""
    return f"\nAll runs: {url}/   alerts: {url}/alerts?project=demo"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stethoscope-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", default=os.environ.get("STETHOSCOPE_DATABASE_URL", "sqlite:///stethoscope.db"))
    ap.add_argument("--port", type=int, default=DEFAULT_PORT)
    ap.add_argument("--exit", action="store_true", help="stop the server when the trainings are done")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    port = args.port if _port_free(args.port) else 0
    if port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    try:
        proc, url = start_server_process(args.db, port)
    except RuntimeError as e:
        raise SystemExit(f"demo: {e}") from None
    print(f"\nStethoscope is running: open {url}/  (database {args.db})\n", flush=True)
    try:
        trainings = [
            ("Softmax Collapse (modular arithmetic)", lambda: modular_softmax_collapse(url, 3000)),
            (
                "loss spikes (corrupted batches)",
                lambda: classifier(
                    url, "loss-spikes", 1000, lambda s: 0.05, corrupt=(300, 500, 700), tags=["loss-spike"]
                ),
            ),
            (
                "divergence (learning rate too high)",
                lambda: classifier(
                    url, "divergence", 2000, lambda s: 0.05 + 2.95 * min(1.0, s / 300), tags=["divergence"]
                ),
            ),
            ("edge of stability (full-batch GD)", lambda: sharpening(url, 1200)),
        ]
        for title, train in trainings:
            t0 = time.time()
            print(f"training: {title} ...", flush=True)
            run = train()
            print(f"  done in {time.time() - t0:.1f} s: {url}/runs/{run}", flush=True)
        print(closing_message(url), flush=True)
        if not args.exit:
            print("The server keeps running; Ctrl-C stops it.", flush=True)
            proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_process(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
