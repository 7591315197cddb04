"""What the hook costs a training step, against the bare loop and against doing it by hand.

Two workloads, each trained by several identical copies ("arms") in one process:

- ``lm``: a 2-layer transformer language model (vocab 1000, seq 64, batch 16);
- ``mlp``: a tiny MLP whose step takes about a millisecond, where any fixed cost shows.

Arms: ``bare`` (no monitoring), ``stethoscope`` (``attach`` with its defaults: the cost
budget where this version has one; no ``on_alert`` callback, so the hook's own detectors wait),
``stethoscope_on_alert`` (the defaults with an ``on_alert`` callback: the hook's detectors run
in its sender thread), ``stethoscope_every1`` (every metric every step, the old
behaviour), ``baseline`` and ``baseline_every1`` (with ``--baseline DIR``: another commit's hook, its
defaults and every metric every step: the cost of the expensive set, before and after),
``stethoscope_dead`` (with ``--dead-units``: the defaults plus ``dead_units=True``), ``floor``
(with ``--floor``: only the torch work of the cheap signals, read on the host and kept in a
deque, no sender: the least any hook measuring them every step can cost), and
``hand`` (the same metrics computed in the loop with ``.item()`` calls and
appended to a local JSON-lines file: what a wandb or TensorBoard user writes by hand, the
anchor). Every arm logs every step.

The arms run interleaved in blocks (``--block`` steps each, ``--rounds`` rounds, a new random
order each round, one warm-up round not counted), so load from anything else on the machine
hits all arms alike. Per arm it prints, as one JSON line per workload:

- ``ratio``: the median over rounds of the arm's block time over the bare loop's block time
  in the same round (block sums, so a spaced-out expensive measurement counts in full);
  ``ratio_round_min``/``_max`` show the spread, ``ratio_total`` is all rounds' time over the
  bare loop's (more exposed to a neighbour's burst of load);
- ``cpu_ratio``: CPU seconds per step (the training thread's, plus the monitor's background
  thread's) over the bare loop's: what the monitoring costs in compute, whatever else runs on
  the machine (it counts the background thread as if it never ran in parallel);
- ``main_ms_per_step``: mean main-thread milliseconds of the monitoring itself per step
  (``mon.log`` plus the hook's optimizer-step hooks, timed by benchmark hooks registered
  around them; for ``hand``, the hand-written code), and ``main_ms_logging_step_median``;
- ``extra_ms_per_step``: the arm's mean step time minus the bare loop's (includes what the
  background thread takes from the training thread: the GIL, a core).

    python benchmarks/hook_overhead.py                 # both workloads, ~2 minutes
    python benchmarks/hook_overhead.py --workloads mlp --rounds 30
    git worktree add /tmp/base main && python benchmarks/hook_overhead.py --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import random
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import stethoscope

ARMS = ("bare", "stethoscope", "stethoscope_on_alert", "stethoscope_every1", "hand")
#: An older version of the hook (``--baseline DIR``), imported under this name.
BASELINE = None


def load_baseline(src: str):
    """Import the ``client`` package found under ``src`` (a checkout of another commit, e.g.
    ``git worktree add /tmp/main main``) as a second, independent copy of the hook, so that
    before and after run interleaved in one process."""
    import importlib.util
    import sys

    root = os.path.join(src, "client")
    spec = importlib.util.spec_from_file_location(
        "stethoscope_baseline", os.path.join(root, "__init__.py"), submodule_search_locations=[root]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["stethoscope_baseline"] = module
    spec.loader.exec_module(module)
    return module


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=1000, d=128, layers=2, heads=4, seq=64):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.zeros(seq, d))
        layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(seq))

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        h = self.blocks(h, mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True)
        return self.head(self.norm(h))


def tiny_mlp(d_in=64, hidden=128, classes=10):
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, classes),
    )


def make_batch(g, batch, seq, vocab):
    # A learnable stream: each token is the previous one plus a small random step.
    # (benchmarks/alert_latency.py uses it too.)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    tokens = (start + torch.randint(0, 3, (batch, seq), generator=g).cumsum(1)) % vocab
    return tokens[:, :-1], tokens[:, 1:]


def lm_batches(n, batch=16, seq=64, vocab=1000):
    g = torch.Generator().manual_seed(1)
    return [make_batch(g, batch, seq + 1, vocab) for _ in range(n)]


def mlp_batches(n, batch=64, d_in=64, classes=10):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, d_in, generator=g), torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)]


WORKLOADS = {
    "lm": (lambda: TinyLM(), lambda: lm_batches(8)),
    "mlp": (lambda: tiny_mlp(), lambda: mlp_batches(8)),
}


# -- the "hand" arm: what users write without a monitor ---------------------------------
class HandLogger:
    """The same metrics, computed the obvious way with ``.item()``, one JSON line a step."""

    def __init__(self, model, opt, path):
        self.opt = opt
        self.groups: dict[str, list] = {}
        for name, p in model.named_parameters():
            self.groups.setdefault(name.rsplit(".", 1)[0] if "." in name else "root", []).append(p)
        self.before = None
        self.file = open(path, "w")  # noqa: SIM115 - closed in close()
        opt.register_step_pre_hook(self._pre)

    def _pre(self, opt, args, kwargs):
        self.before = {id(p): p.detach().clone() for ps in self.groups.values() for p in ps}

    def log(self, step, loss, logits, y):
        rec = {"step": step, "loss": loss.item(), "lr": self.opt.param_groups[0]["lr"]}
        total, nonfinite = 0.0, 0
        for name, ps in self.groups.items():
            g2 = sum(p.grad.pow(2).sum().item() for p in ps if p.grad is not None)
            w2 = sum(p.detach().pow(2).sum().item() for p in ps)
            u2 = sum((p.detach() - self.before[id(p)]).pow(2).sum().item() for p in ps)
            nonfinite += sum(int((~torch.isfinite(p.grad)).sum().item()) for p in ps if p.grad is not None)
            total += g2
            rec[f"grad/norm/{name}"] = g2**0.5
            rec[f"weight/norm/{name}"] = w2**0.5
            rec[f"update_ratio/{name}"] = (u2**0.5) / max(w2**0.5, 1e-30)
        rec["grad/norm"] = total**0.5
        rec["grad/nonfinite"] = nonfinite
        z = logits.detach().reshape(-1, logits.shape[-1]).float()
        t = y.reshape(-1)
        logp = torch.log_softmax(z, -1)
        rec["logits/max_abs"] = z.abs().max().item()
        rec["logits/mean_logz"] = torch.logsumexp(z, -1).mean().item()
        rec["logits/sc_fraction"] = (logp.amax(-1) == 0).float().mean().item()
        rec["logits/entropy"] = -(logp.exp() * logp).sum(-1).mean().item()
        logp_y = logp.gather(-1, t[:, None]).squeeze(-1)
        rec["logits/zero_loss_fraction"] = (logp_y == 0).float().mean().item()
        others = torch.logsumexp(z.scatter(-1, t[:, None], -float("inf")), -1)
        rec["logits/median_margin"] = (z.gather(-1, t[:, None]).squeeze(-1) - others).median().item()
        self.file.write(json.dumps(rec) + "\n")

    def close(self):
        self.file.close()


class FloorHook:
    """The cheap signals' torch work and nothing else: the global gradient norm in an optimizer
    pre-step hook (per-tensor norms, combined on the host), the loss, the logits' min and max and
    the learning rate read on the host, one tuple a step appended to a deque."""

    def __init__(self, model, opt):
        import collections
        import math

        self.params = list(model.parameters())
        self.opt = opt
        self.records = collections.deque(maxlen=1000)
        self.grad_norm = None
        self._hypot = math.hypot
        opt.register_step_pre_hook(self._pre)

    def _pre(self, opt, args, kwargs):
        grads = [p.grad for p in self.params if p.grad is not None]
        self.grad_norm = self._hypot(*[n.item() for n in torch._foreach_norm(grads, 2)])

    def log(self, step, loss, logits, y):
        mx, mn = logits.detach().aminmax()
        lr = self.opt.param_groups[0]["lr"]
        self.records.append((step, time.time(), loss.item(), self.grad_norm, mx.item(), mn.item(), lr))


# -- one arm -----------------------------------------------------------------------------
class Arm:
    def __init__(self, name, model, spool):
        self.name = name
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        self.mon = self.hand = None
        self.hook_s = 0.0  # time spent in the monitor's optimizer hooks this step
        if name == "hand":
            self.hand = HandLogger(model, self.opt, os.path.join(spool, "hand.jsonl"))
        elif name == "floor":
            self.hand = FloorHook(model, self.opt)
        elif name.startswith(("stethoscope", "baseline")):
            # Benchmark hooks registered before and after attach's bracket the monitor's own.
            self.opt.register_step_pre_hook(self._mark)
            self.opt.register_step_post_hook(self._mark)
            kwargs = {"every": 1} if name.endswith("_every1") else {}
            if name.endswith("_dead"):
                kwargs = {"dead_units": True}
            hook = BASELINE if name.startswith("baseline") else stethoscope
            self.mon = hook.attach(model, self.opt, run=f"bench-{name}", server="offline", spool_dir=spool, **kwargs)
            if name.endswith("_on_alert"):
                self.mon.on_alert(lambda alerts: None)  # the hook's detectors run for a listener
            self.opt.register_step_pre_hook(self._unmark)
            self.opt.register_step_post_hook(self._unmark)
        self.step_i = 0
        self.steps: list[list[float]] = []  # per round: step seconds
        self.cpu: list[float] = []  # main-thread CPU seconds per counted step
        self.main: list[float] = []  # main-thread monitoring seconds per counted step

    def _mark(self, *a):
        self._t = time.perf_counter()

    def _unmark(self, *a):
        self.hook_s += time.perf_counter() - self._t

    def run_block(self, batches, n, record):
        times = []
        for _ in range(n):
            x, y = batches[self.step_i % len(batches)]
            self.hook_s = 0.0
            c0 = time.thread_time()
            t0 = time.perf_counter()
            logits = self.model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            t1 = time.perf_counter()
            if self.mon is not None:
                self.mon.log(step=self.step_i, loss=loss, logits=logits, targets=y)
            elif self.hand is not None:
                self.hand.log(self.step_i, loss, logits, y)
            t2 = time.perf_counter()
            times.append(t2 - t0)
            if record:
                self.cpu.append(time.thread_time() - c0)
                self.main.append(t2 - t1 + self.hook_s)
            self.step_i += 1
        if record:
            self.steps.append(times)

    def sender_cpu_per_step(self) -> float:
        """CPU seconds of the monitor's background thread per step (0 without one)."""
        if self.mon is None:
            return 0.0
        self.mon.flush(60)
        thread = self.mon._sender._thread
        if thread is None:
            return 0.0
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident)) / max(1, self.step_i)

    def close(self):
        if self.mon is not None:
            self.mon.close()
        if self.hand is not None and hasattr(self.hand, "close"):
            self.hand.close()


def run_workload(name, args, spool, budget_supported):
    make_model, make_batches = WORKLOADS[name]
    torch.manual_seed(0)
    base = make_model()
    batches = make_batches()
    names = ARMS + (("stethoscope_dead",) if args.dead_units else ())
    names += ("baseline", "baseline_every1") if BASELINE is not None else ()
    names += ("floor",) if args.floor else ()
    arms = [Arm(a, copy.deepcopy(base), spool) for a in names]
    rng = random.Random(0)
    block = args.block if args.block else (20 if name == "lm" else 100)
    rounds = args.rounds if args.rounds else (10 if name == "lm" else 30)
    for r in range(rounds + 1):
        order = arms[:]
        rng.shuffle(order)
        for arm in order:
            arm.run_block(batches, block, record=r > 0)
    sender_cpu = {arm.name: arm.sender_cpu_per_step() for arm in arms}
    for arm in arms:
        arm.close()
    bare = arms[0]
    bare_cpu = statistics.fmean(bare.cpu)
    bare_round = [sum(t) for t in bare.steps]
    bare_total = sum(bare_round)
    n_steps = sum(len(t) for t in bare.steps)
    out = {
        "bench": "hook_overhead",
        "workload": name,
        "block": block,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "budget_supported": budget_supported,
        "bare_step_ms_median": round(statistics.median(t for ts in bare.steps for t in ts) * 1e3, 3),
        "params": sum(p.numel() for p in base.parameters()),
        "arms": {},
    }
    for arm in arms[1:]:
        per_round = [a / b for a, b in zip((sum(t) for t in arm.steps), bare_round)]
        total = sum(sum(t) for t in arm.steps)
        cpu = statistics.fmean(arm.cpu) + sender_cpu[arm.name]
        row = {
            "ratio": round(statistics.median(per_round), 4),
            "ratio_total": round(total / bare_total, 4),
            "ratio_round_min": round(min(per_round), 4),
            "ratio_round_max": round(max(per_round), 4),
            "extra_ms_per_step": round((total - bare_total) / n_steps * 1e3, 3),
            "main_ms_per_step": round(statistics.fmean(arm.main) * 1e3, 4),
            "main_ms_logging_step_median": round(statistics.median(arm.main) * 1e3, 4),
            "cpu_ratio": round(cpu / bare_cpu, 4),
            "sender_cpu_ms_per_step": round(sender_cpu[arm.name] * 1e3, 4),
        }
        if arm.mon is not None:
            row["dropped"] = arm.mon.dropped
            budget = getattr(arm.mon, "_budget", None)
            if budget is not None:
                row["monitor_cost"] = {
                    k: (round(v, 5) if isinstance(v, float) else v) for k, v in budget.stats().items()
                }
        out["arms"][arm.name] = row
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=0, help="counted rounds, one more warms up (default: 10 lm, 30 mlp)")
    ap.add_argument("--block", type=int, default=0, help="steps per block (default: 20 lm, 100 mlp)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared: 1)")
    ap.add_argument(
        "--baseline",
        metavar="DIR",
        help="also run the hook found in DIR/client (another commit's checkout) as the arm 'baseline'",
    )
    ap.add_argument(
        "--dead-units", action="store_true", help="also the arm 'stethoscope_dead': the defaults plus dead_units=True"
    )
    ap.add_argument(
        "--floor", action="store_true", help="also the arm 'floor': the cheap signals' torch work alone, no sender"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global BASELINE
    if args.baseline:
        BASELINE = load_baseline(args.baseline)
    budget_supported = "budget" in inspect.signature(stethoscope.attach).parameters
    with tempfile.TemporaryDirectory() as spool:
        for name in args.workloads:
            print(json.dumps(run_workload(name, args, spool, budget_supported)), flush=True)


if __name__ == "__main__":
    main()
