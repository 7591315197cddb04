"""Cost of the hook on a small transformer language model on the CPU.

Two identical models train side by side in one process, one step each in turn (so load
from anything else on the machine hits both alike); only the second has the hook, logging
every step: loss, learning rate, gradient norms per module, weight norms and update ratios,
and the logit statistics. Prints one JSON line per configuration:

    {"bench": "hook_overhead", "every": 1, "median_ratio": 1.01, ...}

and one line with the host cost of single ``mon.log`` calls in microseconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import stethoscope


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=256, d=128, layers=2, heads=4, seq=64):
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


def make_batch(g, batch, seq, vocab):
    # A learnable stream: each token is the previous one plus a small random step.
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    steps = torch.randint(0, 3, (batch, seq), generator=g)
    tokens = (start + steps.cumsum(1)) % vocab
    return tokens[:, :-1], tokens[:, 1:]


def step_fn(model, opt, x, y, mon=None, step=0):
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    t = None
    if mon is not None:
        t0 = time.perf_counter_ns()
        mon.log(step=step, loss=loss, logits=logits, targets=y)
        t = (time.perf_counter_ns() - t0) / 1000
    return t


def measure(every, steps, warmup, args, spool):
    torch.manual_seed(0)
    base = TinyLM(args.vocab, args.d, args.layers, seq=args.seq)
    hooked = copy.deepcopy(base)
    opt_a = torch.optim.AdamW(base.parameters(), lr=3e-4)
    opt_b = torch.optim.AdamW(hooked.parameters(), lr=3e-4)
    mon = stethoscope.attach(hooked, opt_b, run=f"bench-every{every}", server="offline", spool_dir=spool, every=every)
    g = torch.Generator().manual_seed(1)
    plain, with_hook, log_us = [], [], []
    for i in range(warmup + steps):
        x, y = make_batch(g, args.batch, args.seq + 1, args.vocab)
        order = (0, 1) if i % 2 == 0 else (1, 0)  # alternate who goes first
        for which in order:
            t0 = time.perf_counter()
            if which == 0:
                step_fn(base, opt_a, x, y)
            else:
                us = step_fn(hooked, opt_b, x, y, mon, i)
            dt = time.perf_counter() - t0
            if i >= warmup:
                (plain if which == 0 else with_hook).append(dt)
                if which == 1 and i % every == 0:
                    log_us.append(us)
    mon.close()
    ratios = [b / a for a, b in zip(plain, with_hook)]
    return {
        "bench": "hook_overhead",
        "every": every,
        "steps": steps,
        "median_step_ms_plain": round(statistics.median(plain) * 1e3, 3),
        "median_step_ms_hook": round(statistics.median(with_hook) * 1e3, 3),
        "median_ratio": round(statistics.median(with_hook) / statistics.median(plain), 4),
        "median_pairwise_ratio": round(statistics.median(ratios), 4),
        "median_log_call_us_logging_step": round(statistics.median(log_us), 1),
        "dropped": mon.dropped,
        "params": sum(p.numel() for p in base.parameters()),
        "threads": torch.get_num_threads(),
    }


def log_call_cost(spool, n=2000):
    """Host microseconds of one mon.log call, without the training step around it."""
    model = TinyLM(64, 32, 1, seq=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = {"bench": "log_call_us"}
    for label, every, kwargs in (
        ("loss_tensor", 1, {}),
        ("loss_tensor_every10_skipped", 10, {}),
        ("loss_float_and_scalar", 1, {"float": True}),
    ):
        mon = stethoscope.attach(
            model, opt, run=f"bench-call-{label}", server="offline", spool_dir=spool, every=every, update_ratio=False
        )
        loss = torch.tensor(1.5)
        times = []
        for i in range(n):
            if i % every == 0 and every > 1:
                mon.log(step=i, loss=loss)  # a logging step, not timed here
                continue
            t0 = time.perf_counter_ns()
            if kwargs.get("float"):
                mon.log(step=i, loss=1.5, acc=0.5)
            else:
                mon.log(step=i, loss=loss)
            times.append((time.perf_counter_ns() - t0) / 1000)
            if i % 500 == 0:
                mon.flush()
        mon.close()
        out[label] = round(statistics.median(times), 2)
    # without gradients present (the model never ran backward) the grad kernels are skipped:
    # these are the hook's own costs (checks, packing, queueing) per call.
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--every", type=int, nargs="*", default=[1, 10])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as spool:
        for every in args.every:
            print(json.dumps(measure(every, args.steps, args.warmup, args, spool)), flush=True)
        print(json.dumps(log_call_cost(spool)), flush=True)


if __name__ == "__main__":
    main()
