"""Detector quality on a labelled corpus of real tiny trainings, and the detector set's cost.

    python benchmarks/detector_quality.py [--regen] [--runs] [--part tune|holdout] [--only SUBSTR]

The corpus (``benchmarks/_corpus.py``): 148 seeded CPU trainings -- SGD with and without
momentum, Adam, AdamW; batch 4 to 256 and full batch; an MLP, a small CNN, a one-layer
transformer, softmax regression -- showing gradual and sudden divergence, loss spikes of three
causes, Softmax Collapse (and a run hovering below it), full-batch GD at the edge of
stability, class-incremental training with replay, runs stuck at their starting loss, GD past
the edge oscillating, small training sets overfitting a held-out set, layers whose gradient
vanishes (deep sigmoid/tanh stacks, dead ReLUs, a layer frozen under a normalisation) or
explodes alone (a max-norm constraint far below a layer's norm), data-parallel replicas
drifting apart (two-rank DDP runs over gloo, two processes each), and healthy runs of every
kind. Generated once (two
processes, a few minutes) into ``.corpus-cache/`` and reused while the generating code is
unchanged. Each run is labelled from its own series (``tests/client/_corpus_labels.py``).

Prints JSON: for the tuning part and the held-out part separately, per detector: recall,
precision, lead time in steps (median and worst), false alerts per 10,000 healthy steps,
episodes per detected event; loud alerts per incident; and the ``done_when`` criteria of the
issue, each a boolean with its figure (definitions in ``benchmarks/_scoring.py``). Then the
per-point cost of the whole detector set, fed in ingest-sized batches. ``--runs`` adds every
run's events, episodes and notes.

Detectors run with their default settings, as a new project gets them (``--scenario-settings``
gives the GD runs ``check_trace: false``, as the scenario tests do).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import _corpus as C  # noqa: I001  (puts tests/client on sys.path)
import _scoring as Q
from _corpus_labels import label

from stethoscope.core.detectors import DetectorSet

GD_SETTINGS = {"edge_of_stability": {"check_trace": False}}


def cost(runs_points, batch=1000, repeat=3):
    points = sum(len(p) for p in runs_points)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for pts in runs_points:
            ds, state = DetectorSet(), {}
            for i in range(0, len(pts), batch):
                ds.update(state, pts[i : i + batch])
        best = min(best, time.perf_counter() - t)
    return {"points": points, "batch": batch, "us_per_point": round(1e6 * best / points, 2)}


def _jsonable(r):
    eps = [
        {
            "detector": k[0],
            "key": k[1],
            "start": k[2],
            "raised": ep["raised"],
            "warned": ep["warned"],
            "severity": ep["severity"],
            "opens": ep["opens"],
            "cause": ep["cause"] and ep["cause"]["detector"],
            "loud": ep["loud"],
            "true": ep["true"],
        }
        for k, ep in r["episodes"].items()
    ]
    events = [{k: v for k, v in ev.items() if k != "matched"} for ev in r["events"]]
    return {**r, "events": events, "episodes": eps}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--regen", action="store_true", help="regenerate every run, even if cached")
    ap.add_argument("--runs", action="store_true", help="also list every run's events and alerts")
    ap.add_argument("--part", choices=["tune", "holdout"], help="only this part of the corpus")
    ap.add_argument("--only", help="only runs whose name contains this")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--scenario-settings", action="store_true", help="GD runs with check_trace false")
    ap.add_argument("--no-cost", action="store_true", help="skip the per-point cost measurement")
    args = ap.parse_args()
    runs = [r for r in C.RUNS if (not args.part or r.part == args.part) and (not args.only or args.only in r.name)]
    generation = C.ensure(runs, regen=args.regen, processes=args.processes)
    t = time.perf_counter()
    results, all_points = [], []
    for run in runs:
        points = C.load(run)
        all_points.append(points)
        settings = GD_SETTINGS if args.scenario_settings and run.gen == "gd" else None
        labels = label(points, run.divergence)
        results.append(Q.score_run(run, labels, Q.replay(points, settings)))
    report = {
        "corpus": {
            "runs": len(runs),
            "families": len({r.family for r in runs}),
            "steps": sum(r["steps"] for r in results),
            "generation": generation,
            "scoring_seconds": round(time.perf_counter() - t, 1),
        },
    }
    for part in ("tune", "holdout"):
        rs = [r for r in results if r["part"] == part]
        if rs:
            report[part] = Q.summarize(rs)
    if not args.no_cost:
        report["cost"] = cost(all_points)
    if args.runs:
        report["per_run"] = [_jsonable(r) for r in results]
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
