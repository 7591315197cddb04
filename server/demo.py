"""``make demo``: the server on the embedded SQLite default, and real small CPU trainings
streaming into it live through the hook, each showing a phenomenon Stethoscope flags.

    python -m stethoscope_server.demo [--db URL] [--port 8765] [--exit]

They run at the same time, each paced to last at least ``--pace`` seconds (75 by default,
``STETHOSCOPE_DEMO_PACE`` too), so a person watching the dashboard sees the curves grow and the
alerts open live; ``--pace 0`` runs them as fast as the CPU allows (the tests do).

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
#: Seconds each training lasts at least: long enough to open its page and watch it happen.
DEFAULT_PACE_S = 75.0


#: The divergence demo's loss turns NaN near step 243 (seeded; the lr ramps to 3.0 by step
#: 300) and the run stops 5 steps later: its pace is spread over these steps, not 2000.
DIVERGENCE_ENDS_NEAR = 250


class Pacer:
    """Spreads ``steps`` over ``seconds`` of wall time: ``wait(step)`` sleeps until the step is due."""

    def __init__(self, steps: int, seconds: float) -> None:
        self.t0 = time.monotonic()
        self.per_step = max(0.0, seconds) / max(1, steps)

    def wait(self, step: int) -> None:
        if self.per_step:
            delay = self.t0 + step * self.per_step - time.monotonic()
            if delay > 0:
                time.sleep(delay)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _run_id(name: str) -> str:
    return f"{name}-{int(time.time())}"


def modular_softmax_collapse(server: str, steps: int, pace: float = 0.0, run: str | None = None) -> str:
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
    run = run or _run_id("modular-sc")
    pacer = Pacer(steps, pace)
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
            pacer.wait(step)
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


def classifier(
    server: str,
    name: str,
    steps: int,
    lr_at,
    corrupt=(),
    tags=(),
    pace: float = 0.0,
    run: str | None = None,
    paced_steps: int | None = None,
) -> str:
    """``paced_steps``: the steps ``pace`` is spread over (a run that diverges stops early)."""
    import torch
    import torch.nn.functional as F

    import stethoscope

    x, y, g = _blobs(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr_at(0), momentum=0.9)
    run = run or _run_id(name)
    pacer = Pacer(paced_steps or steps, pace)
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
            pacer.wait(step)
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


def sharpening(server: str, steps: int, pace: float = 0.0, run: str | None = None) -> str:
    import torch

    import stethoscope

    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = torch.sin(x @ torch.randn(10, 1))
    model = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    lr = 0.2  # 2/lr = 10: progressive sharpening carries lambda_max up to it
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = torch.nn.MSELoss()
    run = run or _run_id("edge-of-stability")
    pacer = Pacer(steps, pace)
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
            pacer.wait(step)
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.log(step=step, loss=loss)
    return run


def _run_together(trainings, url: str, pace: float) -> list[str]:
    """Start every training in its own thread; wait for all; return what failed."""
    import threading

    failures: list[str] = []
    watch = f" (each takes about {pace:g} s or more: watch them live)" if pace else ""
    print(f"training {len(trainings)} runs at the same time{watch}:", flush=True)

    def one(title: str, run: str, train) -> None:
        t0 = time.time()
        try:
            train()
        except Exception as e:  # one failed training must not hide the others
            failures.append(f"{title}: {type(e).__name__}: {e}")
            return
        print(f"  done in {time.time() - t0:.1f} s: {title}", flush=True)

    threads = []
    for title, run, train in trainings:
        print(f"  {title}: {url}/runs/{run}", flush=True)
        t = threading.Thread(target=one, args=(title, run, train), name=f"demo-{run}", daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        while t.is_alive():  # join with a timeout, so Ctrl-C is heard
            t.join(0.5)
    return failures


def closing_message(url: str) -> str:
    """The last words of the demo: the pages to open (the dashboard, not the JSON API)."""
    return f"\nAll runs: {url}/\nOpen the alerts page: {url}/alerts?project=demo"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stethoscope-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", default=os.environ.get("STETHOSCOPE_DATABASE_URL", "sqlite:///stethoscope.db"))
    ap.add_argument("--port", type=int, default=DEFAULT_PORT)
    ap.add_argument("--exit", action="store_true", help="stop the server when the trainings are done")
    ap.add_argument(
        "--pace",
        type=float,
        default=float(os.environ.get("STETHOSCOPE_DEMO_PACE", DEFAULT_PACE_S)),
        help=f"seconds each training lasts at least (default {DEFAULT_PACE_S:g}; 0: as fast as possible)",
    )
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
    status = 0
    try:
        pace = args.pace
        runs = {k: _run_id(k) for k in ("modular-sc", "loss-spikes", "divergence", "edge-of-stability")}
        trainings = [
            (
                "Softmax Collapse (modular arithmetic)",
                runs["modular-sc"],
                lambda: modular_softmax_collapse(url, 3000, pace, runs["modular-sc"]),
            ),
            (
                "loss spikes (corrupted batches)",
                runs["loss-spikes"],
                lambda: classifier(
                    url,
                    "loss-spikes",
                    1000,
                    lambda s: 0.05,
                    corrupt=(300, 500, 700),
                    tags=["loss-spike"],
                    pace=pace,
                    run=runs["loss-spikes"],
                ),
            ),
            (
                "divergence (learning rate too high)",
                runs["divergence"],
                lambda: classifier(
                    url,
                    "divergence",
                    2000,
                    lambda s: 0.05 + 2.95 * min(1.0, s / 300),
                    tags=["divergence"],
                    pace=pace,
                    run=runs["divergence"],
                    paced_steps=DIVERGENCE_ENDS_NEAR,
                ),
            ),
            (
                "edge of stability (full-batch GD)",
                runs["edge-of-stability"],
                lambda: sharpening(url, 1200, pace, runs["edge-of-stability"]),
            ),
        ]
        # All four at once, as a team's runs are: the runs page and the alerts page fill live.
        failures = _run_together(trainings, url, pace)
        if failures:
            print(f"demo: {len(failures)} training(s) failed: {'; '.join(failures)}", file=sys.stderr, flush=True)
            status = 1
        if not args.exit:
            print("\nThe server keeps running; Ctrl-C stops it.", flush=True)
        print(closing_message(url), flush=True)  # last: the page to open
        if not args.exit:
            proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_process(proc)
    return status


if __name__ == "__main__":
    sys.exit(main())
