"""CPU per point of the detector set, this tree against another commit, in one process.

    python benchmarks/detector_cost.py [--ref main] [--rounds 2] [--runs 40] [--profile MODE]

Both detector sets are fed the same points, interleaved (ref, this tree, ref, ...), and each
mode's best round is printed in microseconds per point, with the ratio. ``--ref`` is exported
with ``git archive`` as ``benchmarks/detector_identity.py`` does. Modes:

- ``batch``: corpus runs (``benchmarks/_corpus.py``) in 1000-point ``update`` batches, the
  state kept in memory (``detector_quality.py``'s cost figure);
- ``hook``: corpus runs one step at a time through ``feed_step``, as the hook's sender thread
  feeds them (also per step);
- ``steps``: the same healthy run's steps (the ``--names hook`` series, every one at every step)
  through ``feed_step``, as the hook's sender thread feeds a record: its cost per step is the
  figure times 20;
- ``ingest``: the ``--names hook`` batches of ``ingest_profile.py`` (20 series x 50 steps of a
  healthy run), routed with ``route`` and fed with ``feed``, the state round-tripped through
  JSON between batches as the server keeps it (the round trip is not timed).

``--profile MODE`` prints a cProfile listing of this tree's detectors in that mode instead.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import subprocess
import sys
import time

import _corpus as C  # noqa: I001
from detector_identity import ROOT, _ref_detectors
from ingest_profile import HOOK_NAMES, STEPS_PER_BATCH, _value


def _by_step(points):
    out: dict = {}
    for pt in points:
        out.setdefault(pt[1], []).append(pt)
    return [(step, tuple(p[0] for p in pts), [p[2] for p in pts]) for step, pts in out.items()]


def run_batch(DetectorSet, runs):
    t = 0.0
    for pts in runs:
        ds, state = DetectorSet(), {}
        t0 = time.process_time()
        for i in range(0, len(pts), 1000):
            ds.update(state, pts[i : i + 1000])
        t += time.process_time() - t0
    return t


def run_hook(DetectorSet, steps_of_runs):
    t = 0.0
    for steps in steps_of_runs:
        ds, state = DetectorSet(), {}
        feed = ds.feed_step
        t0 = time.process_time()
        for step, names, values in steps:
            feed(state, step, names, values)
        t += time.process_time() - t0
    return t


def run_ingest(DetectorSet, batches):
    t = 0.0
    ds, state = DetectorSet(), {}
    for series in batches:
        t0 = time.process_time()
        ds.feed(state, ds.route(series))
        t += time.process_time() - t0
        state = json.loads(json.dumps(state))
    return t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", default="main")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runs", type=int, default=40, help="corpus runs used (every n-th of the corpus)")
    ap.add_argument("--batches", type=int, default=300, help="ingest batches")
    ap.add_argument("--modes", default="batch,hook,steps,ingest")
    ap.add_argument("--profile", default="")
    args = ap.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", args.ref], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    RefSet = _ref_detectors(commit)
    from stethoscope.core.detectors import DetectorSet

    every = max(1, len(C.RUNS) // args.runs)
    runs = [C.load(r) for r in C.RUNS[::every]]
    steps = [_by_step(pts) for pts in runs]
    batches = []
    for b in range(args.batches):
        s0 = b * STEPS_PER_BATCH
        st = list(range(s0, s0 + STEPS_PER_BATCH))
        batches.append([(n, st, [_value(n, s) for s in st]) for n in HOOK_NAMES])
    names = tuple(HOOK_NAMES)
    healthy = [
        (s, names, [v[s % STEPS_PER_BATCH] for _, _, v in batches[s // STEPS_PER_BATCH]])
        for s in range(len(batches) * STEPS_PER_BATCH)
    ]
    points = {
        "batch": sum(map(len, runs)),
        "hook": sum(map(len, runs)),
        "steps": len(healthy) * len(names),
        "ingest": len(batches) * 1000,
    }
    work = {
        "batch": lambda S: run_batch(S, runs),
        "hook": lambda S: run_hook(S, steps),
        "steps": lambda S: run_hook(S, [healthy]),
        "ingest": lambda S: run_ingest(S, batches),
    }
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        work[args.profile](DetectorSet)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(40)
        return 0
    out = {}
    for mode in args.modes.split(","):
        best = {"ref": float("inf"), "tree": float("inf")}
        for _ in range(args.rounds):
            for who, S in (("ref", RefSet), ("tree", DetectorSet)):
                best[who] = min(best[who], work[mode](S))
        ref, tree = (1e6 * best[w] / points[mode] for w in ("ref", "tree"))
        out[mode] = {
            "points": points[mode],
            "ref_us": round(ref, 3),
            "tree_us": round(tree, 3),
            "x": round(ref / tree, 2),
        }
        print(json.dumps({mode: out[mode]}), flush=True)
    print(json.dumps({"benchmark": "detector_cost", "ref": args.ref, "commit": commit[:10], **out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
