"""Check that this tree's hook sends exactly what another commit's hook sends.

    git worktree add --detach /tmp/base main
    python benchmarks/hook_identity.py --baseline /tmp/base [--only NAME] [--steps N]

Each configuration trains the same seeded model twice, once through the hook found in
``--baseline`` (its ``client`` package imported under another name, as ``hook_overhead.py``
does) and once through this tree's, with a fake clock: the loop advances it by a step time
drawn from a seeded generator (with an occasional long pause), and every call the hook makes
advances it by 10 us, so the cost budget's choices (which steps carry the expensive set) and
``perf/step_ms`` are deterministic, given the same clock calls in the same order. Compared:

- every record the training thread queues (``Sender.put``/``put_points``): its kind, step,
  names and values in order (device-packed values read as a list), events without their
  random key and wall time;
- the spool's content after ``close``: each series' steps and values in the order they were
  written, the order series first appear, events and statuses (not wall times, nor how the
  sender cut batches, which follows the real clock).

Values are compared by ``repr`` (NaN equals NaN, -0.0 differs from 0.0). Prints one line per
configuration and exits 1 when any differs.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import random
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import hook_overhead  # noqa: E402

import stethoscope  # noqa: E402


class FakeClock:
    """Seconds that the loop advances (``advance``) and each call moves on by ``tick``."""

    def __init__(self, tick: float = 1e-5) -> None:
        self.t = 1000.0
        self.tick = tick

    def __call__(self) -> float:
        self.t += self.tick
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class TinyLM(torch.nn.Module):
    """Embedding, one linear layer, a head; ``attention`` marks its scores with the hook's
    ``attention_logits`` (the hook module is handed in)."""

    def __init__(self, vocab=400, d=32, hook=None):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.mix = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, vocab)
        self.hook = hook

    def forward(self, tokens):
        h = self.embed(tokens)
        if self.hook is not None:
            scores = self.hook.attention_logits(h @ h.transpose(-2, -1) / math.sqrt(h.shape[-1]))
            h = torch.softmax(scores, -1) @ h
        return self.head(torch.relu(self.mix(h)))


CONFIGS = {
    # name: (attach kwargs, loop options)
    "defaults": ({}, {}),
    "budget_0.2": ({"budget": 0.2}, {}),
    "every1": ({"every": 1}, {}),
    "every7_log_before_step": ({"every": 7}, {"log_before_step": True}),
    "budget_log_before_step": ({}, {"log_before_step": True}),
    "zero_grad_before_log": ({}, {"zero_grad_before_log": True}),
    "on_alert_nan": ({}, {"on_alert": True, "nan_at": 150}),
    "nan_no_callback": ({"every": 5}, {"nan_at": 120}),
    "dead_units": ({"dead_units": True}, {}),
    "dead_units_every3": ({"dead_units": True, "every": 3}, {}),
    "scalars_groups_sched": ({}, {"scalars": True, "groups": True, "sched": True, "collector": True, "events": True}),
    "lm_sampled_attention": ({}, {"model": "lm"}),
    "lm_every4_no_targets": ({"every": 4}, {"model": "lm", "no_targets": True}),
    "loss_float_no_logits": ({}, {"loss_float": True, "no_logits": True}),
    "float64": ({}, {"float64": True}),
    "no_update_ratio_batch_size": ({"update_ratio": False, "batch_size": 32}, {}),
    "no_optimizer": ({}, {"no_optimizer": True}),
    "step_none_and_gaps": ({}, {"step_none": True}),
}


def capture(mon, out: list) -> None:
    """Record what the training thread queues, then queue it as before."""
    sender = mon._sender
    put, put_points = sender.put, sender.put_points

    def grab(rec):
        kind = rec[0]
        if kind == "points":
            _, step, _wall, names, ops, packed, _ready, host_names, host_values = rec
            packed = packed.tolist() if packed is not None else None
            out.append(
                ("points", step, tuple(names), tuple(ops), _reprs(packed), tuple(host_names), _reprs(host_values))
            )
        elif kind == "event":
            body = {k: v for k, v in rec[1].items() if k not in ("key", "wall")}
            out.append(("event", json.dumps(body, sort_keys=True)))
        elif kind in ("status",):
            out.append(tuple(rec))

    def put_(rec):
        if rec[0] != "points":  # points go on through put_points
            grab(rec)
        put(rec)

    def put_points_(rec):
        grab(rec)
        put_points(rec)

    sender.put, sender.put_points = put_, put_points_


def _reprs(values):
    if values is None:
        return None
    return tuple(repr(v) if not isinstance(v, list) else _reprs(v) for v in values)


def spooled(root: pathlib.Path):
    """The spool's entries under ``root``: series in first-seen order with their steps and
    values (wall times left out), events without key and wall, statuses."""
    series: dict = {}
    events, statuses = [], []
    for seg in sorted(root.rglob("*.jsonl")):
        for line in seg.read_text().splitlines():
            entry = json.loads(line)
            kind, body = entry["t"], entry["b"]
            if kind == "points":
                for s in body["series"]:
                    col = series.setdefault(s["name"], ([], []))
                    col[0].extend(s["steps"])
                    col[1].extend(repr(v) for v in s["values"])
            elif kind == "events":
                events += [
                    json.dumps({k: v for k, v in e.items() if k not in ("key", "wall")}, sort_keys=True)
                    for e in body["events"]
                ]
            else:
                statuses.append(json.dumps(body, sort_keys=True))
    return list(series.items()), events, statuses


def run(hook, name: str, kwargs: dict, opts: dict, steps: int, spool: pathlib.Path):
    torch.manual_seed(0)
    rng = random.Random(1)
    lm = opts.get("model") == "lm"
    model = TinyLM(hook=hook) if lm else hook_overhead.tiny_mlp()
    if opts.get("float64"):
        model = model.double()
    if opts.get("groups"):
        params = list(model.named_parameters())
        opt = torch.optim.AdamW(
            [
                {"params": [p for n, p in params if n.startswith("0.")], "lr": 1e-3, "name": "first"},
                {"params": [p for n, p in params if not n.startswith("0.")], "lr": 3e-4},
            ]
        )
    else:
        opt = None if opts.get("no_optimizer") else torch.optim.AdamW(model.parameters(), lr=3e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, 50, 0.5) if opts.get("sched") else None
    clock = FakeClock()
    mon = hook.attach(model, opt, run=name, server="offline", spool_dir=spool, clock=clock, **kwargs)
    records: list = []
    capture(mon, records)
    heard = []
    if opts.get("on_alert"):
        mon.on_alert(heard.append)
    if opts.get("collector"):
        mon.add_collector(lambda step: {"extra/collected": float(step % 7), "extra/tensor": torch.tensor(step * 0.5)})
    g = torch.Generator().manual_seed(2)
    for i in range(steps):
        if lm:
            x = torch.randint(0, 400, (4, 200), generator=g)
            y = torch.randint(0, 400, (4, 200), generator=g)
        else:
            x = torch.randn(64, 64, generator=g, dtype=torch.float64 if opts.get("float64") else torch.float32)
            y = torch.randint(0, 10, (64,), generator=g)
        if opts.get("nan_at") == i:
            with torch.no_grad():
                next(model.parameters()).fill_(math.inf)
        clock.advance(rng.uniform(3e-4, 1.5e-3) if rng.random() > 0.01 else 0.05)
        if opts.get("events") and i == 40:
            mon.task_switch("second")
            mon.event("note", message="halfway", where=i)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        loss.backward()
        kw = {}
        if opts.get("scalars"):
            kw = {"extra/float": i * 0.25, "extra/tensor": loss.detach() * 2}
        logged_loss = loss.item() if opts.get("loss_float") else loss
        step = None if opts.get("step_none") and i % 3 else i * (2 if opts.get("step_none") else 1)

        args = {
            "step": step,
            "loss": logged_loss,
            "logits": None if opts.get("no_logits") else logits,
            "targets": None if opts.get("no_targets") or opts.get("no_logits") else y,
            **kw,
        }
        if opts.get("log_before_step"):
            mon.log(**args)
        if opt is not None:
            opt.step()
            if sched is not None:
                sched.step()
            if opts.get("zero_grad_before_log"):
                opt.zero_grad(set_to_none=True)
        if not opts.get("log_before_step"):
            mon.log(**args)
    mon.close()
    return records, spooled(spool / name), [[a["detector"], a["key"], a["start_step"]] for al in heard for a in al]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", required=True, metavar="DIR", help="a checkout of the commit to compare with")
    ap.add_argument("--only", help="run the configurations whose name holds this")
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = hook_overhead.load_baseline(args.baseline)
    bad = 0
    for name, (kwargs, opts) in CONFIGS.items():
        if args.only and args.only not in name:
            continue
        with tempfile.TemporaryDirectory() as d:
            a = run(base, name, kwargs, opts, args.steps, pathlib.Path(d) / "base")
            b = run(stethoscope, name, kwargs, opts, args.steps, pathlib.Path(d) / "new")
        n_points = sum(len(r[6]) + len(r[4] or ()) for r in a[0] if r[0] == "points")
        same = [a[i] == b[i] for i in range(3)]
        if all(same):
            counts = f"{len(a[0])} records, {n_points} values, {len(a[1][0])} series, {len(a[2])} alerts heard"
            print(f"{name}: same ({counts})")
            continue
        bad += 1
        what = [w for w, s in zip(("records", "spool", "alerts"), same) if not s]
        print(f"{name}: DIFFERENT ({', '.join(what)})")
        if not same[0]:
            for i, (ra, rb) in enumerate(zip(a[0], b[0])):
                if ra != rb:
                    print(f"  record {i}:\n    base {ra}\n    new  {rb}")
                    break
            else:
                print(f"  records: {len(a[0])} against {len(b[0])}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
