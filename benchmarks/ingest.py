"""Ingest throughput and downsampled-read latency against a real server, SQLite and PostgreSQL.

Several sender processes (each a "training job" with its own run) POST batches of 1,000
points (20 series x 50 steps, like a job logging 20 metrics) over keep-alive HTTP for
--seconds; every reply is checked (2xx, all points inserted). Then a 1,000,000-point series is
read downsampled to 2,000 points. Prints one JSON line per database.

    python benchmarks/ingest.py [--seconds 20] [--senders 4] [--db sqlite,postgres]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import fresh_database, median, percentile, server  # noqa: E402

SERIES = 20
STEPS_PER_BATCH = 50  # 20 x 50 = 1,000 points a batch
READ_POINTS = 1_000_000


def _conn(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=60)


def _request(conn, method, path, body=None):
    conn.request(method, path, body=body, headers={"content-type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    if r.status >= 300:
        raise RuntimeError(f"{method} {path}: {r.status} {data[:300]!r}")
    return json.loads(data)


def _sender(url: str, run_id: str, seconds: float, out: "mp.Queue") -> None:
    import orjson

    conn = _conn(url)
    _request(conn, "PUT", f"/api/v1/runs/{run_id}", json.dumps({"project": "bench"}).encode())
    names = [f"metric/{i}" for i in range(SERIES)]
    latencies, points, errors, step = [], 0, 0, 0
    t_end = time.monotonic() + seconds
    wall = time.time()
    while time.monotonic() < t_end:
        steps = list(range(step, step + STEPS_PER_BATCH))
        body = orjson.dumps(
            {
                "series": [
                    {
                        "name": n,
                        "steps": steps,
                        "values": [0.5 + 1e-4 * s for s in steps],
                        "walls": [wall] * STEPS_PER_BATCH,
                    }
                    for n in names
                ]
            }
        )
        t0 = time.perf_counter()
        try:
            reply = _request(conn, "POST", f"/api/v1/runs/{run_id}/points", body)
            if reply["inserted"] != SERIES * STEPS_PER_BATCH:
                errors += 1
            points += reply["inserted"]
        except Exception:
            errors += 1
            conn.close()
            conn = _conn(url)
        latencies.append(time.perf_counter() - t0)
        step += STEPS_PER_BATCH
    out.put((points, errors, latencies))


def measure_ingest(srv, senders: int, seconds: float) -> dict:
    url = srv.url
    cpu0 = srv.cpu()
    q: mp.Queue = mp.Queue()
    procs = [mp.Process(target=_sender, args=(url, f"bench-{i}", seconds, q)) for i in range(senders)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    results = [q.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - t0
    server_cpu = srv.cpu() - cpu0
    points = sum(r[0] for r in results)
    lat = [x for r in results for x in r[2]]
    return {
        "points_per_s": round(points / elapsed),
        "requests": len(lat),
        "errors": sum(r[1] for r in results),
        "p50_ms": round(percentile(lat, 50) * 1e3, 2),
        "p99_ms": round(percentile(lat, 99) * 1e3, 2),
        "senders": senders,
        # What bounds it: the server's own CPU per point, and what one core would sustain.
        "server_cpu_us_per_point": round(server_cpu / max(points, 1) * 1e6, 2),
        "server_cpu_share": round(server_cpu / elapsed, 2),
        "points_per_server_cpu_s": round(points / max(server_cpu, 1e-9)),
        "seconds": round(elapsed, 1),
    }


def measure_read(url: str, repeats: int = 15) -> dict:
    import orjson

    conn = _conn(url)
    run = "bench-read"
    _request(conn, "PUT", f"/api/v1/runs/{run}", json.dumps({"project": "bench"}).encode())
    chunk = 50_000
    for k in range(0, READ_POINTS, chunk):
        steps = list(range(k, k + chunk))
        body = orjson.dumps({"series": [{"name": "loss", "steps": steps, "values": [1.0 / (1 + s) for s in steps]}]})
        _request(conn, "POST", f"/api/v1/runs/{run}/points", body)
    times, n = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        d = _request(conn, "GET", f"/api/v1/runs/{run}/series/loss?max_points=2000")
        times.append(time.perf_counter() - t0)
        n = len(d["steps"])
    zoom = []
    for i in range(repeats):  # a zoomed read: 5% of the run, somewhere in the middle
        a = 100_000 + i * 37_000
        t0 = time.perf_counter()
        _request(conn, "GET", f"/api/v1/runs/{run}/series/loss?max_points=2000&start={a}&end={a + 50_000}")
        zoom.append(time.perf_counter() - t0)
    return {
        "read_1m_to_2000_ms": round(median(times) * 1e3, 1),
        "read_points_returned": n,
        "read_zoom_50k_ms": round(median(zoom) * 1e3, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--db", default="sqlite,postgres")
    args = ap.parse_args()
    for kind in args.db.split(","):
        with fresh_database(kind) as db_url, server(db_url, args.workers) as srv:
            result = {
                "benchmark": "ingest",
                "database": kind,
                "workers": args.workers,
                "batch_points": SERIES * STEPS_PER_BATCH,
            }
            result.update(measure_ingest(srv, args.senders, args.seconds))
            result.update(measure_read(srv.url))
            result["target_points_per_s"] = 250_000 if kind == "sqlite" else 150_000
            result["target_read_ms"] = 150
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
