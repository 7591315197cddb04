"""Reads from a 10^7-row points table on PostgreSQL, partitioned (migration 0003) and plain.

Fills one schema with 9,000,000 filler points (90 series, in SQL) and one series of
1,000,000 points through the store's own ingest path (so its rollups are real), then times
reads of that series: downsampled to 2,000 points, a raw 10,000-point range, and its last
point. Then migrates down to the unpartitioned table (same rows) and times the same reads:
the ratio is the cost or gain of partitioning at this size. Prints one JSON line.

    python benchmarks/scale.py [--filler 9000000] [--points 1000000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import fresh_database  # noqa: E402


def _time(fn, repeats: int = 9) -> float:
    fn()  # warm the cache: we measure reads of a hot series, as a dashboard does
    xs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t0)
    return round(statistics.median(xs) * 1e3, 2)


def measure(store, run_id: str, n: int) -> dict:
    return {
        "read_1m_to_2000_ms": _time(lambda: store.read_series(run_id, "loss", max_points=2000)),
        "read_raw_10k_ms": _time(
            lambda: store.read_series(run_id, "loss", start=n // 2, end=n // 2 + 9_999, max_points=10_000)
        ),
        "list_series_ms": _time(lambda: store.list_series(run_id)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--filler", type=int, default=9_000_000)
    ap.add_argument("--points", type=int, default=1_000_000)
    args = ap.parse_args()

    from sqlalchemy import text

    from stethoscope_server.settings import Settings
    from stethoscope_server.store import SeriesBatch, Store, migrate
    from stethoscope_server.store.db import make_engine

    with fresh_database("postgres") as url:
        settings = Settings(database_url=url)
        migrate.upgrade(settings.database_url)
        engine = make_engine(settings)
        store = Store(engine)
        store.upsert_run("scale", "bench")
        t0 = time.perf_counter()
        per = 100_000
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO points (series_id, step, value, wall) "
                    "SELECT 1000000 + s, g, random(), 1.7e9 "
                    "FROM generate_series(0, :k - 1) s, generate_series(0, :per - 1) g"
                ),
                {"k": args.filler // per, "per": per},
            )
        filler_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        chunk = 50_000
        for k in range(0, args.points, chunk):
            steps = list(range(k, min(args.points, k + chunk)))
            store.ingest("scale", [SeriesBatch("loss", steps, [1.0 / (1 + s) for s in steps], [1.7e9] * len(steps))])
        ingest_s = time.perf_counter() - t0
        with engine.begin() as conn:
            conn.execute(text("ANALYZE points"))
            rows = conn.execute(text("SELECT count(*) FROM points")).scalar()
            size = conn.execute(
                text(
                    "SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits WHERE inhparent = 'points'::regclass"
                )
            ).scalar()
        partitioned = measure(store, "scale", args.points)
        engine.dispose()
        t0 = time.perf_counter()
        migrate.downgrade(settings.database_url, "0002")
        downgrade_s = time.perf_counter() - t0
        engine = make_engine(settings)
        store = Store(engine)
        with engine.begin() as conn:
            conn.execute(text("ANALYZE points"))
        plain = measure(store, "scale", args.points)
        engine.dispose()
    print(
        json.dumps(
            {
                "benchmark": "scale",
                "database": "postgres",
                "rows": rows,
                "bytes_per_point": round(int(size) / rows, 1),
                "fill_filler_s": round(filler_s, 1),
                "ingest_1m_points_s": round(ingest_s, 1),
                "partitioned": partitioned,
                "plain": plain,
                "ratio_read_1m_partitioned_over_plain": round(
                    partitioned["read_1m_to_2000_ms"] / plain["read_1m_to_2000_ms"], 2
                ),
                "ratio_raw_10k_partitioned_over_plain": round(
                    partitioned["read_raw_10k_ms"] / plain["read_raw_10k_ms"], 2
                ),
                "migrate_down_10m_rows_s": round(downgrade_s, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
