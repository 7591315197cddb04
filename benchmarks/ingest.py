"""Ingest throughput and server CPU per point, old path against new, SQLite and PostgreSQL.

Two real servers run side by side on fresh databases of the same kind: the baseline (the
packages as they were at git ``--baseline``, run from an exported copy: never a second code
path of the server) and this tree. Several sender processes (each a "training job" with its
own run) POST batches of 1,000 points (20 series x 50 steps, like a job logging 20 metrics)
over keep-alive HTTP to 127.0.0.1; every reply is checked (2xx, all points inserted). The two
arms take turns in short rounds (ABBA order), so the load other work puts on a shared
machine falls on both alike; each figure is the median over rounds and is given as a ratio
to the baseline measured in the same run.

Server CPU is the server process's own (user + system, and its worker processes'), from
/proc, over each round. PostgreSQL's own backends are not in it (they are not the server's
processes); ``--workers-scan`` measures how throughput grows with uvicorn workers there.

Then a 200,000-point series is read downsampled, on both arms: the points returned for
``max_points`` 1,500 and 2,000 (at most that many, and close to it) and the read's latency.

On SQLite, ``database_floor`` is the database's own work for the same batches, measured in
this process on a fresh file migrated like the server's, through the store's own statements
and connection settings: the resend probe, the multi-row points insert, the rollup upsert,
the commit and the periodic WAL checkpoint, with their parameters built beforehand. No
ingest path that keeps a row per point costs less than that; it is set beside the issue's
target (the baseline's CPU per point / 4) measured in the same run.

    python benchmarks/ingest.py [--rounds 4] [--seconds 4] [--senders 4] [--db sqlite,postgres]
    python benchmarks/ingest.py --db postgres --workers-scan 1,2,4   # new path only

Prints one JSON line per database (and one for the worker scan).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import baseline_code, fresh_database, machine_load, median, percentile, server  # noqa: E402

SERIES = 20
STEPS_PER_BATCH = 50  # 20 x 50 = 1,000 points a batch
READ_POINTS = 200_000
#: The commit before the bulk ingest path (issue 18): what "today" measured.
BASELINE_REF = "386ce5a"
#: Steps between rounds: each round's batches are new points of the same runs.
ROUND_STEPS = 10_000_000


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


def _sender(url: str, run_id: str, first_step: int, seconds: float, out: "mp.Queue") -> None:
    import orjson

    conn = _conn(url)
    _request(conn, "PUT", f"/api/v1/runs/{run_id}", json.dumps({"project": "bench"}).encode())
    names = [f"metric/{i}" for i in range(SERIES)]
    latencies, points, errors, step = [], 0, 0, first_step
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


def measure_ingest(srv, senders: int, seconds: float, first_step: int = 0) -> dict:
    url = srv.url
    q: mp.Queue = mp.Queue()
    procs = [mp.Process(target=_sender, args=(url, f"bench-{i}", first_step, seconds, q)) for i in range(senders)]
    cpu0 = srv.cpu()
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
        # What bounds it: the server's own CPU per point, and how much of a core it used.
        "server_cpu_us_per_point": round(server_cpu / max(points, 1) * 1e6, 2),
        "server_cpu_share": round(server_cpu / elapsed, 2),
        "seconds": round(elapsed, 1),
    }


def measure_read(url: str, repeats: int = 9) -> dict:
    import orjson

    conn = _conn(url)
    run = "bench-read"
    _request(conn, "PUT", f"/api/v1/runs/{run}", json.dumps({"project": "bench"}).encode())
    chunk = 50_000
    for k in range(0, READ_POINTS, chunk):
        steps = list(range(k, k + chunk))
        body = orjson.dumps({"series": [{"name": "loss", "steps": steps, "values": [1.0 / (1 + s) for s in steps]}]})
        _request(conn, "POST", f"/api/v1/runs/{run}/points", body)
    out = {}
    for asked in (1500, 2000):
        times, n = [], 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            d = _request(conn, "GET", f"/api/v1/runs/{run}/series/loss?max_points={asked}")
            times.append(time.perf_counter() - t0)
            n = len(d["steps"])
        out[f"read_{asked}_returned"] = n
        out[f"read_{asked}_ms"] = round(median(times) * 1e3, 1)
    return out


def database_floor(
    batches: int = 1200, runs: int = 4, group: int = 1, rollups: bool = True, chunk: int | None = None
) -> dict:
    """The SQLite work of ``batches`` 1,000-point batches (``runs`` runs' 20 series each, in
    turn, steps ascending like the senders'), ``group`` batches a transaction (the server's
    group commit joins at most one pending batch per sender), CPU microseconds per point by part.
    ``rollups=False`` leaves the rollup upsert out; ``chunk``: the same figures also for each
    ``chunk`` batches in turn (``chunks``), to see the cost change as the series grow."""
    from itertools import chain

    from stethoscope_server.settings import Settings
    from stethoscope_server.store import migrate
    from stethoscope_server.store import rollups as _rollups
    from stethoscope_server.store.db import CHECKPOINT_INTERVAL_S, make_engine
    from stethoscope_server.store.points import PointWriter, SeriesBatch, _point_params

    wall = time.time()
    with fresh_database("sqlite") as url:
        migrate.upgrade(url)
        engine = make_engine(Settings(database_url=url))
        raw = engine.raw_connection()
        db = raw.driver_connection  # the server's pragmas (the engine's connect hook)
        writer = PointWriter("sqlite")
        parts = dict.fromkeys(("probe", "points", "rollups", "commit", "checkpoint", "params"), 0.0)
        chunks: list[dict] = []
        at_chunk = dict(parts)
        # Checkpoint as often as the server's background thread would at the new path's rate
        # (~300 batches a second on this kind of machine: one per CHECKPOINT_INTERVAL_S).
        every = max(1, round(300 * CHECKPOINT_INTERVAL_S))
        cpu = time.process_time
        for b in range(batches):
            run, step = b % runs, (b // runs) * STEPS_PER_BATCH
            steps = list(range(step, step + STEPS_PER_BATCH))
            items = [
                (
                    1 + run * SERIES + i,
                    SeriesBatch(f"metric/{i}", steps, [0.5 + 1e-4 * s for s in steps], [wall] * STEPS_PER_BATCH),
                )
                for i in range(SERIES)
            ]
            t0 = cpu()
            flat = _point_params(items)
            rows = list(chain.from_iterable(_rollups.batch_rows([(sid, sb.steps, sb.values) for sid, sb in items])))
            t1 = cpu()
            if b % group == 0:
                db.execute("BEGIN IMMEDIATE")
            if writer._any_stored(db, items):
                raise RuntimeError("a fresh batch found stored points")
            t2 = cpu()
            writer._points.run(db, flat)
            t3 = cpu()
            if rollups:
                writer._rollups.run(db, rows)
            t4 = cpu()
            if (b + 1) % group == 0 or b + 1 == batches:
                db.execute("COMMIT")
            t5 = cpu()
            if (b + 1) % every == 0:
                db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            t6 = cpu()
            for part, dt in zip(parts, (t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t1 - t0)):
                parts[part] += dt
            if chunk and (b + 1) % chunk == 0:
                piece = _per_point({k: v - at_chunk[k] for k, v in parts.items()}, chunk * SERIES * STEPS_PER_BATCH)
                chunks.append({"points_stored": (b + 1) * SERIES * STEPS_PER_BATCH, **piece})
                at_chunk = dict(parts)
        raw.close()
        engine.dispose()
    n = batches * SERIES * STEPS_PER_BATCH
    out = _per_point(parts, n)
    out["points"] = n
    out["batches_per_transaction"] = group
    out["rollups"] = rollups
    if chunk:
        out["chunks"] = chunks
    return out


def _per_point(parts: dict, n: int) -> dict:
    out = {f"{k}_us_per_point": round(v / n * 1e6, 3) for k, v in parts.items()}
    out["database_us_per_point"] = round(sum(v for k, v in parts.items() if k != "params") / n * 1e6, 3)
    return out


def _summary(rounds: list[dict]) -> dict:
    keys = ("points_per_s", "server_cpu_us_per_point", "server_cpu_share", "p50_ms", "p99_ms")
    out = {k: median([r[k] for r in rounds]) for k in keys}
    out["errors"] = sum(r["errors"] for r in rounds)
    out["rounds_points_per_s"] = [r["points_per_s"] for r in rounds]
    out["rounds_cpu_us_per_point"] = [r["server_cpu_us_per_point"] for r in rounds]
    return out


def ab(kind: str, ref: str, rounds: int, seconds: float, senders: int, workers: int, with_floor: bool = True) -> dict:
    with ExitStack() as stack:
        old_code = stack.enter_context(baseline_code(ref))
        arms = {
            "baseline": stack.enter_context(server(stack.enter_context(fresh_database(kind)), workers, old_code)),
            "new": stack.enter_context(server(stack.enter_context(fresh_database(kind)), workers)),
        }
        got: dict[str, list[dict]] = {a: [] for a in arms}
        for r in range(rounds):
            order = ["baseline", "new"] if r % 2 == 0 else ["new", "baseline"]  # ABBA: drift falls on both
            for arm in order:
                got[arm].append(measure_ingest(arms[arm], senders, seconds, first_step=r * ROUND_STEPS))
        reads = {arm: measure_read(srv.url) for arm, srv in arms.items()}
    base, new = _summary(got["baseline"]), _summary(got["new"])
    floor = {}
    if kind == "sqlite" and with_floor:
        # One transaction a batch, and the best case of grouping: one per sender's batch.
        floor = database_floor()
        floor["grouped"] = database_floor(group=senders)
        target = base["server_cpu_us_per_point"] / 4
        floor["target_cpu_us_per_point_from_baseline"] = round(target, 3)
        for f in (floor, floor["grouped"]):
            f["database_share_of_target"] = round(f["database_us_per_point"] / target, 2)
            f["new_path_over_floor_us_per_point"] = round(
                new["server_cpu_us_per_point"] - f["database_us_per_point"], 3
            )
    return {
        "benchmark": "ingest",
        "database": kind,
        "workers": workers,
        "senders": senders,
        "batch_points": SERIES * STEPS_PER_BATCH,
        "baseline_ref": ref,
        "rounds": rounds,
        "seconds_per_round": seconds,
        "ratio_points_per_s_new_over_baseline": round(new["points_per_s"] / base["points_per_s"], 2),
        "ratio_cpu_per_point_baseline_over_new": round(
            base["server_cpu_us_per_point"] / new["server_cpu_us_per_point"], 2
        ),
        # Points one core of the server sustains: throughput per worker, free of the machine's
        # other load (the senders, PostgreSQL and other people's work share the two cores).
        "points_per_server_cpu_s_new": round(1e6 / new["server_cpu_us_per_point"]),
        "points_per_server_cpu_s_baseline": round(1e6 / base["server_cpu_us_per_point"]),
        "new": new,
        "baseline": base,
        "reads": reads,
        **({"database_floor": floor} if floor else {}),
        "target_cpu_us_per_point": 4.0 if kind == "sqlite" else None,
        "target_ratio": 4.0 if kind == "sqlite" else 3.0,
        "machine": machine_load(),
    }


def workers_scan(kind: str, counts: list[int], seconds: float, senders: int) -> dict:
    """Throughput of the new path with 1, 2, ... uvicorn workers, each on a fresh database."""
    got = {}
    for w in counts:
        with fresh_database(kind) as db, server(db, w) as srv:
            measure_ingest(srv, senders, min(2.0, seconds))  # warm: runs and series exist, pools full
            got[w] = measure_ingest(srv, senders, seconds, first_step=ROUND_STEPS)
    one = got[counts[0]]["points_per_s"]
    return {
        "benchmark": "ingest_workers",
        "database": kind,
        "senders": senders,
        "by_workers": {str(w): r for w, r in got.items()},
        "ratio_points_per_s_over_first": {str(w): round(r["points_per_s"] / one, 2) for w, r in got.items()},
        "machine": machine_load(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=4, help="seconds of sending per round and arm")
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--db", default="sqlite,postgres")
    ap.add_argument("--baseline", default=BASELINE_REF, help="git ref of the baseline arm")
    ap.add_argument("--no-floor", action="store_true", help="SQLite: skip the database floor")
    ap.add_argument("--workers-scan", default="", help="e.g. 1,2,4: worker scaling of the new path only")
    args = ap.parse_args()
    for kind in args.db.split(","):
        if args.workers_scan:
            counts = [int(w) for w in args.workers_scan.split(",")]
            print(json.dumps(workers_scan(kind, counts, args.seconds, args.senders)), flush=True)
        else:
            print(
                json.dumps(
                    ab(kind, args.baseline, args.rounds, args.seconds, args.senders, args.workers, not args.no_floor)
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
