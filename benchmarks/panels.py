"""The run page's panels request for a run with many series (issue 16, finding 7).

Fills a run with ``--series`` series (the usual named ones, then half ``grad/norm/<module>``
for the heatmap and half other per-module series) of ``--points`` points each, through the
store's own ingest path; starts a real server process on that database and times
``GET /ui/api/runs/{id}/panels``: the server's CPU time (user + system of its process, read
from /proc, so PostgreSQL's own work is not in it) and the wall time. Prints one JSON line.

    python benchmarks/panels.py [--series 9000] [--points 64] [--db sqlite postgres] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _common import fresh_database, median, server  # noqa: E402

NAMED = ("loss", "grad/norm", "lr", "logits/max_abs", "logits/mean_logz", "logits/sc_fraction", "hessian/lambda_max")
#: Points per ingest request while filling (the server's default batch limit is 50,000).
FILL_BATCH_POINTS = 50_000


def series_names(n: int) -> list[str]:
    rest = max(0, n - len(NAMED))
    modules = [f"grad/norm/layers.{i}.weight" for i in range(rest // 2)]
    other = [f"act/rms/layers.{i}" for i in range(rest - rest // 2)]
    return list(NAMED[:n]) + modules + other


def fill(url: str, run_id: str, names: list[str], points: int) -> float:
    from stethoscope_server.settings import Settings
    from stethoscope_server.store import SeriesBatch, Store, migrate
    from stethoscope_server.store.db import make_engine

    settings = Settings(database_url=url)
    migrate.upgrade(settings.database_url)
    engine = make_engine(settings)
    store = Store(engine)
    store.upsert_run(run_id, "bench")
    t0 = time.perf_counter()
    per = max(1, FILL_BATCH_POINTS // points)
    steps = list(range(points))
    walls = [1.7e9 + s for s in steps]
    for k in range(0, len(names), per):
        store.ingest(
            run_id,
            [
                SeriesBatch(n, steps, [1.0 + math.sin(s + i) / 2 for s in steps], walls)
                for i, n in enumerate(names[k : k + per], start=k)
            ],
        )
    engine.dispose()
    return time.perf_counter() - t0


def measure(kind: str, n_series: int, points: int, repeats: int) -> dict:
    run_id = "many-series"
    with fresh_database(kind) as url:
        names = series_names(n_series)
        fill_s = fill(url, run_id, names, points)
        with server(url) as srv, httpx.Client(base_url=srv.url, timeout=900) as http:
            cpu, wall, size, body = [], [], 0, None
            for _ in range(repeats):
                c0, t0 = srv.cpu(), time.perf_counter()
                r = http.get(f"/ui/api/runs/{run_id}/panels")
                wall.append(time.perf_counter() - t0)
                cpu.append(srv.cpu() - c0)
                r.raise_for_status()
                size, body = len(r.content), r.json()
        traces = sum(len(p["figure"].get("data", [])) for p in body["panels"])
        return {
            "database": kind,
            "series": len(names),
            "points_per_series": points,
            "fill_s": round(fill_s, 1),
            "request_cpu_ms": round(median(cpu) * 1e3, 1),
            "request_wall_ms": round(median(wall) * 1e3, 1),
            "reply_bytes": size,
            "traces": traces,
            "series_hidden": body.get("series", {}).get("hidden"),
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--series", type=int, default=9000)
    ap.add_argument("--points", type=int, default=64)
    ap.add_argument("--db", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    out = {
        "benchmark": "panels",
        "results": [measure(kind, args.series, args.points, args.repeats) for kind in args.db],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
