"""Detector quality on the real tiny trainings of the tests, and the detector set's cost.

    python benchmarks/detector_quality.py [--seeds 3]

Prints JSON: per detector, precision (alerts that match a phenomenon / all alerts), recall
(phenomena with an alert / all phenomena) and lead time in steps (phenomenon step minus the
step at which the alert was raised; positive = early); then the per-point cost of the whole
detector set in microseconds, fed in ingest-sized batches.

Ground truth per scenario (tests/client/_detector_scenarios.py): injected corrupted batches
and LR bumps (loss_spike), the first non-finite step (divergence), the first step with SC
fraction > 0.5 measured in float32 (softmax_collapse, added from the data in every run), the
first measurement with lambda_max >= 2/lr (edge_of_stability). Every alert that matches no
phenomenon is a false positive, including every alert in the healthy runs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "client"))

import _detector_scenarios as S  # noqa: E402

from stethoscope.core.detectors import DETECTORS, DetectorSet  # noqa: E402


def with_sc_truth(sc):
    """Add the Softmax Collapse ground truth measured in the run, wherever SC > 0.5 happened."""
    if any(e.detector == "softmax_collapse" for e in sc.events):
        return sc.events
    hit = next((s for s, v in sc.series("logits/sc_fraction") if v > 0.5), None)
    return sc.events + ([S.Event("softmax_collapse", hit, 0, hit + 30)] if hit is not None else [])


def score(scenarios):
    stats = {name: {"alerts": 0, "true_alerts": 0, "events": 0, "detected": 0, "leads": []} for name in DETECTORS}
    per_run = []
    for sc in scenarios:
        events = with_sc_truth(sc)
        changes, raised, _ = S.replay(sc, DetectorSet(sc.settings))
        opens = [(c, raised[(c.detector, c.key, c.start_step)]) for c in changes if c.action == "open"]
        for c, at in opens:
            st = stats[c.detector]
            st["alerts"] += 1
            st["true_alerts"] += any(e.detector == c.detector and e.lo <= at <= e.hi for e in events)
        for e in events:
            st = stats[e.detector]
            st["events"] += 1
            hits = [at for c, at in opens if c.detector == e.detector and e.lo <= at <= e.hi]
            if hits:
                st["detected"] += 1
                st["leads"].append(e.step - min(hits))
        per_run.append(
            {
                "run": sc.name,
                "events": [(e.detector, e.step) for e in events],
                "alerts": [(c.detector, c.key, c.severity, at) for c, at in opens],
            }
        )
    out = {}
    for name, st in stats.items():
        leads = st["leads"]
        out[name] = {
            "alerts": st["alerts"],
            "events": st["events"],
            "precision": round(st["true_alerts"] / st["alerts"], 3) if st["alerts"] else None,
            "recall": round(st["detected"] / st["events"], 3) if st["events"] else None,
            "lead_steps": {"min": min(leads), "median": statistics.median(leads), "max": max(leads)} if leads else None,
        }
    return out, per_run


def cost(scenarios, batch=1000, repeat=3):
    points = sum(len(sc.points) for sc in scenarios)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for sc in scenarios:
            ds, state = DetectorSet(sc.settings), {}
            for i in range(0, len(sc.points), batch):
                ds.update(state, sc.points[i : i + batch])
        best = min(best, time.perf_counter() - t)
    return {"points": points, "batch": batch, "us_per_point": round(1e6 * best / points, 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the seeded minibatch scenarios")
    ap.add_argument("--runs", action="store_true", help="also list every run's events and alerts")
    args = ap.parse_args()
    seeds = range(args.seeds)
    scenarios = [S.softmax_collapse_modular(), S.edge_of_stability_gd()] + [
        S.healthy_gd_below_edge(s) for s in seeds[:1]
    ]
    for f in (
        S.corrupted_batches,
        S.lr_bumps,
        S.divergence_lr_warmup,
        S.divergence_constant_lr,
        S.healthy_adam_warmup,
        S.healthy_sgd_small_batch,
    ):
        scenarios += [f(seed=s) for s in seeds]
    quality, runs = score(scenarios)
    report = {
        "runs": len(scenarios),
        "healthy_runs": sum(not sc.events for sc in scenarios),
        "detectors": quality,
        "cost": cost(scenarios),
    }
    if args.runs:
        report["per_run"] = runs
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
