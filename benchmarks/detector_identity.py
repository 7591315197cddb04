"""Check that the detectors of this tree give bit-identical results to those of another commit.

    python benchmarks/detector_identity.py [--ref main] [--only SUBSTR] [--modes step,batch,hook,json]

Replays every corpus run (``benchmarks/_corpus.py``) through the detector set of ``--ref``
(``client/core`` exported with ``git archive`` and imported as ``_ref_core``; its outputs are
cached under ``.stethoscope/identity/`` keyed by the commit) and through this tree's, and
compares every AlertChange (``repr`` of ``to_dict()``: key order and the sign of zero count)
and the final state (``json.dumps``, key order included). Modes: ``step`` feeds one step at a
time with ``update`` (as ``_scoring.replay`` does), ``batch`` 1000-point batches, ``hook``
one step at a time with ``feed_step`` (as the hook's sender does), ``json`` 1000-point
batches with the state round-tripped through JSON between batches (as the server keeps it).
Exits 1 on the first difference of each run, printing it.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import pathlib
import pickle
import subprocess
import sys
import tarfile

import _corpus as C  # noqa: I001

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES = ("step", "batch", "hook", "json")


def _ref_detectors(commit: str):
    dest = ROOT / ".stethoscope" / "identity" / commit
    pkg = dest / "_ref_core"
    if not pkg.exists():
        blob = subprocess.run(
            ["git", "archive", commit, "client/core"], cwd=ROOT, check=True, capture_output=True
        ).stdout
        tmp = dest / "tmp"
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            tar.extractall(tmp)
        (tmp / "client" / "core").rename(pkg)
    sys.path.insert(0, str(dest))
    return importlib.import_module("_ref_core.detectors").DetectorSet


def _by_step(points):
    out: dict = {}
    for pt in points:
        out.setdefault(pt[1], []).append(pt)
    return out


def replay(DetectorSet, points, mode: str):
    ds, state, log = DetectorSet(), {}, []
    if mode == "step":
        for step, pts in _by_step(points).items():
            log += [(step, c) for c in ds.update(state, pts)]
    elif mode == "hook":
        for step, pts in _by_step(points).items():
            names = tuple(p[0] for p in pts)
            log += [(step, c) for c in ds.feed_step(state, step, names, [p[2] for p in pts])]
    else:
        for i in range(0, len(points), 1000):
            log += [(i, c) for c in ds.update(state, points[i : i + 1000])]
            if mode == "json":
                state = json.loads(json.dumps(state))
    return [(s, repr(c.to_dict())) for s, c in log], json.dumps(state)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", default="main")
    ap.add_argument("--only", default="")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", args.ref], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    RefSet = _ref_detectors(commit)
    from stethoscope.core.detectors import DetectorSet

    modes = args.modes.split(",")
    cache_path = ROOT / ".stethoscope" / "identity" / f"{commit}.pickle"
    cache = pickle.loads(cache_path.read_bytes()) if cache_path.exists() else {}
    bad = checked = changes = 0
    for run in C.RUNS:
        if args.only not in run.name:
            continue
        points = C.load(run)
        for mode in modes:
            ref = cache.get((run.name, mode))
            if ref is None:
                ref = cache[(run.name, mode)] = replay(RefSet, points, mode)
            got = replay(DetectorSet, points, mode)
            checked += 1
            changes += len(ref[0])
            if got != ref:
                bad += 1
                if got[0] != ref[0]:
                    n = next(
                        (i for i, (a, b) in enumerate(zip(got[0], ref[0])) if a != b), min(len(got[0]), len(ref[0]))
                    )
                    print(f"DIFF {run.name} {mode}: change #{n} of {len(ref[0])} (got {len(got[0])})")
                    print("  ref:", ref[0][n] if n < len(ref[0]) else None)
                    print("  got:", got[0][n] if n < len(got[0]) else None)
                else:
                    a, b = ref[1], got[1]
                    n = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
                    print(f"DIFF {run.name} {mode}: final state at char {n}")
                    print("  ref:", a[max(0, n - 200) : n + 200])
                    print("  got:", b[max(0, n - 200) : n + 200])
        cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_bytes(pickle.dumps(cache))
    print(f"{checked} replays ({changes} changes) checked against {args.ref} {commit[:10]}: {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
