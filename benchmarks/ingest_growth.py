"""Ingest throughput as an SQLite points table grows from 0.2M to 4M rows, old path against new.

Two real servers (the baseline exported from git ``--baseline``, and this tree) run side by
side on fresh SQLite files. At each size the table is first topped up with filler rows
(other series, written straight into the file in SQL while the servers are idle), then 4
senders POST 1,000-point batches to each server in turn for ``--seconds``, ``--rounds``
times per size in ABBA order (so the load other work puts on a shared machine falls on both
arms alike); each size's figure is the median of its rounds. Each figure is given against
the same arm's figure at the first size (flat = 1.0), and the new arm against the baseline
at each size. Server CPU per point is the steadier figure on a loaded machine.

The filler goes into other series, and each round's batches into the senders' own series, so
the figures above are mostly the cost of a table that grows around series that stay short. A
long training's own series grow too, and so does what each of their batches touches: the
second part replays this tree's database work alone (``ingest.database_floor``: the store's own
statements and pragmas on a fresh file, no server) for ``--replay-points`` points into the same
80 series, with and without the rollup upsert, and gives the CPU per point of each 600,000
points in turn against the first.

    python benchmarks/ingest_growth.py [--sizes 200000,1000000,2000000,4000000] [--seconds 4] [--rounds 3]
    python benchmarks/ingest_growth.py --replay-only [--replay-points 4800000]

Prints one JSON line per part.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import baseline_code, fresh_database, machine_load, median, server  # noqa: E402
from ingest import BASELINE_REF, ROUND_STEPS, SERIES, STEPS_PER_BATCH, database_floor, measure_ingest  # noqa: E402

#: Filler rows per filler series, and where their ids start (no real series has such an id).
FILLER_PER_SERIES = 100_000
FILLER_FIRST_ID = 1_000_000


def _rows(path: str) -> int:
    with sqlite3.connect(path, timeout=60) as c:
        return c.execute("SELECT count(*) FROM points").fetchone()[0]


def _fill(path: str, have: int, want: int) -> float:
    """Add filler rows until the file holds ``want`` rows of filler; returns the seconds it took."""
    t0 = time.perf_counter()
    c = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        c.execute("BEGIN IMMEDIATE")
        c.execute(
            "WITH RECURSIVE k(x) AS (SELECT ? UNION ALL SELECT x + 1 FROM k WHERE x + 1 < ?) "
            "INSERT INTO points (series_id, step, value, wall) "
            "SELECT ? + x / ?, x % ?, (x % 997) * 1e-3, 1.7e9 FROM k",
            (have, want, FILLER_FIRST_ID, FILLER_PER_SERIES, FILLER_PER_SERIES),
        )
        c.execute("COMMIT")
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        c.close()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="200000,1000000,2000000,4000000", help="filler rows at each step")
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per size and arm (medians)")
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--baseline", default=BASELINE_REF)
    ap.add_argument("--replay-points", type=int, default=4_800_000, help="points of the series replay (0: none)")
    ap.add_argument("--replay-only", action="store_true", help="only the series replay, no servers")
    args = ap.parse_args()
    if not args.replay_only:
        servers_part(args)
    if args.replay_points:
        print(json.dumps(series_replay(args.replay_points)), flush=True)


#: Batches per figure of the series replay (600,000 points).
REPLAY_CHUNK = 600


def series_replay(points: int) -> dict:
    """This tree's database work per point as the same 80 series grow, with and without the
    rollup upsert, for each ``REPLAY_CHUNK`` batches in turn (``database_floor``)."""
    batches = max(REPLAY_CHUNK, points // (SERIES * STEPS_PER_BATCH) // REPLAY_CHUNK * REPLAY_CHUNK)
    out: dict = {"benchmark": "ingest_growth_series_replay", "database": "sqlite", "series": 4 * SERIES}
    for name, rollups in (("with_rollups", True), ("without_rollups", False)):
        got = database_floor(batches=batches, rollups=rollups, chunk=REPLAY_CHUNK)
        first = got["chunks"][0]
        keys = ("database", "points", "rollups", "commit")
        out[name] = {
            "points_stored": [c["points_stored"] for c in got["chunks"]],
            **{f"{k}_us_per_point": [c[f"{k}_us_per_point"] for c in got["chunks"]] for k in keys},
            # Against the first 600,000 points: 1.0 is flat.
            "ratio_database_vs_first": [
                round(c["database_us_per_point"] / first["database_us_per_point"], 2) for c in got["chunks"]
            ],
        }
    out["machine"] = machine_load()
    return out


def servers_part(args) -> None:
    sizes = [int(x) for x in args.sizes.split(",")]
    got: dict[str, list[dict]] = {"baseline": [], "new": []}
    with ExitStack() as stack:
        old_code = stack.enter_context(baseline_code(args.baseline))
        urls = {
            "baseline": stack.enter_context(fresh_database("sqlite")),
            "new": stack.enter_context(fresh_database("sqlite")),
        }
        arms = {
            "baseline": stack.enter_context(server(urls["baseline"], 1, old_code)),
            "new": stack.enter_context(server(urls["new"], 1)),
        }
        filled = dict.fromkeys(arms, 0)
        for i, size in enumerate(sizes):
            fill_s = {}
            for arm in arms:
                fill_s[arm] = _fill(urls[arm].removeprefix("sqlite:///"), filled[arm], size)
                filled[arm] = size
            rounds: dict[str, list[dict]] = {arm: [] for arm in arms}
            for k in range(args.rounds):
                order = ["baseline", "new"] if k % 2 == 0 else ["new", "baseline"]  # ABBA
                for arm in order:
                    first_step = (i * args.rounds + k) * ROUND_STEPS
                    rounds[arm].append(measure_ingest(arms[arm], args.senders, args.seconds, first_step=first_step))
            for arm, rs in rounds.items():
                got[arm].append(
                    {
                        "points_per_s": median([r["points_per_s"] for r in rs]),
                        "server_cpu_us_per_point": median([r["server_cpu_us_per_point"] for r in rs]),
                        "errors": sum(r["errors"] for r in rs),
                        "rows_after": _rows(urls[arm].removeprefix("sqlite:///")),
                        "fill_s": round(fill_s[arm], 1),
                    }
                )
    out = {
        "benchmark": "ingest_growth",
        "database": "sqlite",
        "sizes": sizes,
        "rounds": args.rounds,
        "baseline_ref": args.baseline,
    }
    for arm, rs in got.items():
        first = rs[0]
        out[arm] = {
            "rows_after": [r["rows_after"] for r in rs],
            "points_per_s": [r["points_per_s"] for r in rs],
            "server_cpu_us_per_point": [r["server_cpu_us_per_point"] for r in rs],
            "errors": sum(r["errors"] for r in rs),
            # Against the same arm at the first size: 1.0 is flat.
            "ratio_points_per_s_vs_first": [round(r["points_per_s"] / first["points_per_s"], 2) for r in rs],
            "ratio_cpu_per_point_vs_first": [
                round(r["server_cpu_us_per_point"] / first["server_cpu_us_per_point"], 2) for r in rs
            ],
        }
    out["ratio_points_per_s_new_over_baseline"] = [
        round(n["points_per_s"] / b["points_per_s"], 2) for n, b in zip(got["new"], got["baseline"])
    ]
    out["ratio_cpu_per_point_baseline_over_new"] = [
        round(b["server_cpu_us_per_point"] / n["server_cpu_us_per_point"], 2)
        for n, b in zip(got["new"], got["baseline"])
    ]
    out["machine"] = machine_load()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
