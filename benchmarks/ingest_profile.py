"""Where the server's time per ingested point goes: one request at a time, in-process.

The app is built by the real factory (gate, middlewares, store, detector runner) on a fresh
database and called as ASGI in this thread, its thread-pool hop replaced by a direct call, so
one thread does all the work and its CPU time is the request's. Each request is a batch of
1,000 new points (20 series x 50 steps, as ``benchmarks/ingest.py`` sends). The parts are
timed by wrapping the functions that do them (thread CPU time, inclusive; no profiler), and
printed in microseconds per point; ``--top N`` adds a cProfile listing (whose own overhead
inflates Python-heavy parts: read its shares, not its sums).

    python benchmarks/ingest_profile.py [--db sqlite,postgres] [--requests 300] [--top 25]
    PYTHONPATH=/tmp/old-pkgs python benchmarks/ingest_profile.py   # another tree's packages

uvicorn's HTTP parsing and the thread hop are not in it (``benchmarks/ingest.py`` measures
the real server).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import math
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import fresh_database  # noqa: E402

SERIES = 20
STEPS_PER_BATCH = 50
#: ``--names hook``: series a hook sends, most of them read by a detector (the default names,
#: ``metric/0`` ..., are read by none: the detector runner routes them and stops there).
HOOK_NAMES = [
    "loss",
    "lr",
    "grad/norm",
    "grad/nonfinite",
    "logits/max_abs",
    "logits/sc_fraction",
    "logits/median_margin",
    "logits/zero_loss_fraction",
    "logits/log_z_mean",
    "eval/loss",
    "hessian/lambda_max",
    "hessian/trace",
    "hessian/two_over_lr",
] + [f"grad/norm/layer{i}" for i in range(7)]
NAMES = [f"metric/{i}" for i in range(SERIES)]


def _value(name: str, s: int) -> float:
    """A healthy run's value of ``name`` at step ``s`` (with ``--names hook`` the detectors
    stay quiet, as they do on most batches); ``metric/*`` climb slowly, as ingest.py's do."""
    wiggle = 0.01 * math.sin(s)
    if name.startswith("metric/"):
        return 0.5 + 1e-4 * s
    if name in ("loss", "eval/loss"):
        return 2.0 / (1.0 + 1e-4 * s) + wiggle
    if name in ("grad/nonfinite", "logits/sc_fraction", "logits/zero_loss_fraction"):
        return 0.0
    return {"lr": 1e-3, "hessian/two_over_lr": 2000.0, "hessian/lambda_max": 10.0, "hessian/trace": 100.0}.get(
        name, 1.0
    ) * (1.0 + wiggle)


#: The parts of an ingest request: label -> (module, attribute path); a part that a tree lacks
#: is left out. Each is timed inclusively (a part's time holds the parts it calls).
PARTS = {
    "parse + validate": ("stethoscope_server.api.points", "parse_batch"),
    "store.ingest (transaction, all)": ("stethoscope_server.store", "Store.ingest"),
    "  points writer (insert + rollups)": ("stethoscope_server.store.points", "PointWriter.write"),
    "    points insert (SQLite)": ("stethoscope_server.store.points", "PointWriter._write_sqlite"),
    "  points writer (PostgreSQL, known series: run touched, points and rollups, one statement)": (
        "stethoscope_server.store.points",
        "PointWriter.write_touching",
    ),
    "  points writer (PostgreSQL, known series no detector takes: one statement in autocommit)": (
        "stethoscope_server.store.points",
        "PointWriter.write_all_new",
    ),
    "    points insert (PostgreSQL; since the one-statement path, with the rollups)": (
        "stethoscope_server.store.points",
        "PointWriter._write_pg",
    ),
    "    rollup rows (Python)": ("stethoscope_server.store.points", "_rollups.rollup_rows"),
    "    rollup rows (Python, whole batch)": ("stethoscope_server.store.points", "_rollups.batch_rows"),
    "  detector runner": ("stethoscope_server.alerting.detector_runner", "DetectorRunner.__call__"),
    "    states read and decoded": ("stethoscope_server.store.detector_states", "load_states"),
    "    states read, decoded or kept ones reused": (
        "stethoscope_server.alerting.detector_runner",
        "DetectorRunner._load_states",
    ),
    "    states encoded": ("stethoscope_server.store.detector_states", "encode_states"),
    "    states written": ("stethoscope_server.store.detector_states", "save_states"),
    "  commit": ("sqlalchemy.engine.base", "Connection._commit_impl"),
}


def _install_timers() -> tuple[dict[str, float], dict[str, int]]:
    import importlib

    spent = dict.fromkeys(PARTS, 0.0)
    calls = dict.fromkeys(PARTS, 0)
    for label, (module, path) in PARTS.items():
        owner = importlib.import_module(module)
        *parents, name = path.split(".")
        for part in parents:
            owner = getattr(owner, part, None)
        fn = getattr(owner, name, None) if owner is not None else None
        if fn is None:
            del spent[label], calls[label]
            continue

        def timed(*args, _fn=fn, _label=label, **kwargs):
            t0 = time.thread_time()
            try:
                return _fn(*args, **kwargs)
            finally:
                spent[_label] += time.thread_time() - t0
                calls[_label] += 1

        setattr(owner, name, timed)
    return spent, calls


def _body(step: int) -> bytes:
    import orjson

    steps = list(range(step, step + STEPS_PER_BATCH))
    wall = time.time()
    return orjson.dumps(
        {
            "series": [
                {
                    "name": name,
                    "steps": steps,
                    "values": [_value(name, s) for s in steps],
                    "walls": [wall] * STEPS_PER_BATCH,
                }
                for name in NAMES
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
        spent, calls = _install_timers()
        t0 = time.thread_time()
        for b in bodies:
            st, reply = await _call(app, "POST", run + "/points", b)
        total = time.thread_time() - t0
        assert st == 200 and json.loads(reply)["inserted"] == SERIES * STEPS_PER_BATCH, reply
        if top:
            bodies = [_body((20 + requests + k) * STEPS_PER_BATCH) for k in range(requests)]
            prof = cProfile.Profile(time.thread_time)
            prof.enable()
            for b in bodies:
                await _call(app, "POST", run + "/points", b)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(top)
    points = requests * SERIES * STEPS_PER_BATCH
    parts = {k: round(v / points * 1e6, 2) for k, v in spent.items() if calls[k]}
    rest = total - spent.get("parse + validate", 0.0) - spent.get("store.ingest (transaction, all)", 0.0)
    parts["gate, FastAPI, reply (the rest)"] = round(rest / points * 1e6, 2)
    return {"us_per_point_cpu": round(total / points * 1e6, 2), "parts_us_per_point": parts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", default="sqlite,postgres")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--top", type=int, default=0, help="also print the profile's top N functions")
    ap.add_argument("--names", choices=["metric", "hook"], default="metric", help="hook: series detectors read")
    args = ap.parse_args()
    if args.names == "hook":
        NAMES[:] = HOOK_NAMES
    for kind in args.db.split(","):
        with fresh_database(kind) as url:
            out = asyncio.run(_profile(url, args.requests, args.top))
        print(json.dumps({"benchmark": "ingest_profile", "database": kind, "names": args.names, **out}), flush=True)


if __name__ == "__main__":
    main()
