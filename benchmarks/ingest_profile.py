"""Where the server's time per ingested point goes: one request at a time, in-process, profiled.

The app is built by the real factory (gate, middlewares, store, detector runner) on a fresh
database and called as ASGI in this thread, its thread-pool hop replaced by a direct call so
cProfile sees every part. Each request is a batch of 1,000 new points (20 series x 50 steps,
as ``benchmarks/ingest.py`` sends). Prints the breakdown in microseconds per point, from the
profile's cumulative times of the functions that do each part (the total is the requests' own
time without the profiler's overhead; the parts are with it, so they are shares, not sums).

    python benchmarks/ingest_profile.py [--db sqlite,postgres] [--requests 300] [--top 25]

uvicorn's HTTP parsing is not in it (``benchmarks/ingest.py`` measures the real server).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import fresh_database  # noqa: E402

SERIES = 20
STEPS_PER_BATCH = 50

#: The parts of an ingest request: (label, [(file suffix, function name), ...]); a part's
#: time is the cumulative time of the first of its functions the profile holds.
PARTS = [
    ("gate (auth middleware, body read)", [("auth/gate.py", "__call__")]),
    ("route body read + decode", [("api/ingest_parse.py", "decode_body")]),
    ("parse + validate", [("api/ingest_parse.py", "parse_batch"), ("api/ingest_parse.py", "parse_columns")]),
    ("  strict_json", [("server/parsing.py", "strict_json")]),
    ("store.ingest (transaction, all)", [("store/__init__.py", "ingest")]),
    ("  run update + series ids", [("store/__init__.py", "_resolve_series")]),
    ("  points insert", [("store/points.py", "_write_sqlite"), ("store/points.py", "_write_pg")]),
    ("  rollup rows (Python)", [("store/rollups.py", "rollup_rows"), ("store/rollups.py", "rollup_columns")]),
    ("  rollups insert", [("store/points.py", "_write_rollups")]),
    ("  detector runner", [("alerting/detector_runner.py", "__call__")]),
    ("  commit", [("sqlalchemy/engine/base.py", "_commit_impl")]),
    ("reply (orjson + Response)", [("api/points.py", "_reply")]),
]


def _body(step: int) -> bytes:
    import orjson

    steps = list(range(step, step + STEPS_PER_BATCH))
    wall = time.time()
    return orjson.dumps(
        {
            "series": [
                {
                    "name": f"metric/{i}",
                    "steps": steps,
                    "values": [0.5 + 1e-4 * s for s in steps],
                    "walls": [wall] * STEPS_PER_BATCH,
                }
                for i in range(SERIES)
            ]
        }
    )


async def _call(app, method: str, path: str, body: bytes) -> tuple[int, bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    sent = False
    status, out = 0, []

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            out.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(out)


def _part_times(stats: pstats.Stats) -> dict[str, float]:
    by_func: dict[tuple[str, str], float] = {}
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
        key = (file.replace("\\", "/"), func)
        by_func[key] = by_func.get(key, 0.0) + ct
    out = {}
    for label, funcs in PARTS:
        for suffix, name in funcs:
            hits = [t for (f, fn), t in by_func.items() if fn == name and f.endswith(suffix)]
            if hits:
                out[label] = max(hits)
                break
    return out


async def _profile(db_url: str, requests: int, top: int) -> dict:
    from stethoscope_server.app import create_app
    from stethoscope_server.settings import Settings

    app = create_app(Settings(database_url=db_url))

    async def direct(fn, *args):
        return fn(*args)

    async with app.router.lifespan_context(app):
        app.state.run_in_thread = direct
        run = "/api/v1/runs/prof"
        st, reply = await _call(app, "PUT", run, json.dumps({"project": "bench"}).encode())
        assert st < 300, reply
        for k in range(20):  # warm: series exist, statements prepared
            st, reply = await _call(app, "POST", run + "/points", _body(k * STEPS_PER_BATCH))
            assert st == 200, reply
        bodies = [_body((20 + k) * STEPS_PER_BATCH) for k in range(requests)]
        t0 = time.process_time()
        for b in bodies:
            st, reply = await _call(app, "POST", run + "/points", b)
        plain = time.process_time() - t0
        assert st == 200 and json.loads(reply)["inserted"] == SERIES * STEPS_PER_BATCH, reply
        bodies = [_body((20 + requests + k) * STEPS_PER_BATCH) for k in range(requests)]
        prof = cProfile.Profile()
        prof.enable()
        for b in bodies:
            await _call(app, "POST", run + "/points", b)
        prof.disable()
    stats = pstats.Stats(prof)
    points = requests * SERIES * STEPS_PER_BATCH
    parts = _part_times(stats)
    profiled_total = sum(tt for (_cc, _nc, tt, _ct, _c) in stats.stats.values())
    if top:
        stats.sort_stats("cumulative").print_stats(top)
        stats.sort_stats("tottime").print_stats(top)
    return {
        "us_per_point_unprofiled_cpu": round(plain / points * 1e6, 2),
        "us_per_point_profiled_total": round(profiled_total / points * 1e6, 2),
        "parts_us_per_point_profiled": {k: round(v / points * 1e6, 2) for k, v in parts.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", default="sqlite,postgres")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--top", type=int, default=0, help="also print the profile's top N functions")
    args = ap.parse_args()
    for kind in args.db.split(","):
        with fresh_database(kind) as url:
            out = asyncio.run(_profile(url, args.requests, args.top))
        print(json.dumps({"benchmark": "ingest_profile", "database": kind, **out}), flush=True)


if __name__ == "__main__":
    main()
