"""Time from a batch's ingest to its alert and to its webhook delivery, and what detectors cost ingest.

Against a real server process and a real HTTP receiver on loopback, per database:

- ``ingest_to_alert_ms``: from sending the batch that holds a loss spike to the reply that
  carries the alert (the alert row is committed with the points, so it is also readable
  through ``GET /runs/{id}/alerts`` by then; ``alert_visible_ms`` checks that).
- ``ingest_to_webhook_ms``: from sending that batch to the receiver getting the signed POST.
- ``ingest_*_points_per_s``: one sender posting batches of 1,000 points of 20 series of which
  two feed the detectors (``loss``, ``grad/norm``), with detectors on and off
  (``STETHOSCOPE_DETECTORS_ENABLED=0``).

    python benchmarks/alert_latency.py [--trials 30] [--seconds 5] [--db sqlite,postgres]
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import math
import os
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import fresh_database, median, percentile, server  # noqa: E402

WARMUP_STEPS = 100  # the loss-spike detector judges after 32 points
BATCH_STEPS = 50


class _Receiver:
    def __init__(self) -> None:
        self.arrivals: dict[int, float] = {}
        self.cond = threading.Condition()
        rec = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                t = time.perf_counter()
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()
                if body.get("event") == "alert.opened":
                    with rec.cond:
                        rec.arrivals.setdefault(body["alert"]["id"], t)
                        rec.cond.notify_all()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, alert_id: int, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        with self.cond:
            while alert_id not in self.arrivals:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"webhook for alert {alert_id} not received in {timeout} s")
                self.cond.wait(0.1)
            return self.arrivals[alert_id]


def _url(srv) -> str:
    return getattr(srv, "url", srv)  # _common.server yields a URL, or an object holding one


def _conn(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=60)


def _request(conn, method, path, body=None):
    conn.request(
        method,
        path,
        body=None if body is None else json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    r = conn.getresponse()
    data = r.read()
    if r.status >= 300:
        raise RuntimeError(f"{method} {path}: {r.status} {data[:300]!r}")
    return json.loads(data) if data else None


def _loss(rng: random.Random, steps: range) -> list[float]:
    return [2.0 * math.exp(-s / 400) * (1 + 0.05 * rng.random()) + 0.1 for s in steps]


def measure_latency(url: str, trials: int) -> dict:
    receiver = _Receiver()
    conn = _conn(url)
    _request(conn, "POST", "/api/v1/projects/bench/webhooks", {"url": receiver.url, "secret": "benchmark-secret"})
    rng = random.Random(0)
    to_alert, visible, to_hook = [], [], []
    for t in range(trials):
        run = f"latency-{t}"
        _request(conn, "PUT", f"/api/v1/runs/{run}", {"project": "bench"})
        for a in range(0, WARMUP_STEPS, BATCH_STEPS):
            steps = range(a, a + BATCH_STEPS)
            _request(
                conn,
                "POST",
                f"/api/v1/runs/{run}/points",
                {"series": [{"name": "loss", "steps": list(steps), "values": _loss(rng, steps)}]},
            )
        steps = range(WARMUP_STEPS, WARMUP_STEPS + BATCH_STEPS)
        values = _loss(rng, steps)
        values[-1] = 40.0  # the spike, last point of the batch
        t0 = time.perf_counter()
        reply = _request(
            conn,
            "POST",
            f"/api/v1/runs/{run}/points",
            {"series": [{"name": "loss", "steps": list(steps), "values": values}]},
        )
        t1 = time.perf_counter()
        (alert,) = reply["alerts"]
        listed = _request(conn, "GET", f"/api/v1/runs/{run}/alerts")
        t2 = time.perf_counter()
        assert [a["id"] for a in listed] == [alert["id"]]
        t3 = receiver.wait(alert["id"])
        to_alert.append(t1 - t0)
        visible.append(t2 - t0)
        to_hook.append(t3 - t0)
    receiver.server.shutdown()

    def ms(xs, q):
        return round(percentile(xs, q) * 1e3, 2)

    return {
        "trials": trials,
        "ingest_to_alert_ms": {"p50": ms(to_alert, 50), "p95": ms(to_alert, 95), "max": ms(to_alert, 100)},
        "alert_visible_ms": {"p50": ms(visible, 50), "p95": ms(visible, 95)},
        "ingest_to_webhook_ms": {"p50": ms(to_hook, 50), "p95": ms(to_hook, 95), "max": ms(to_hook, 100)},
    }


def measure_ingest(url: str, seconds: float) -> float:
    """Points per second from one sender; loss and grad/norm feed the detectors."""
    conn = _conn(url)
    run = f"ingest-{time.monotonic_ns()}"
    _request(conn, "PUT", f"/api/v1/runs/{run}", {"project": "bench"})
    rng = random.Random(1)
    names = ["loss", "grad/norm"] + [f"metric/{i}" for i in range(18)]
    points, step = 0, 0
    t_end = time.monotonic() + seconds
    t0 = time.perf_counter()
    while time.monotonic() < t_end:
        steps = range(step, step + BATCH_STEPS)
        loss = _loss(rng, steps)
        series = [
            {
                "name": n,
                "steps": list(steps),
                "values": loss if n == "loss" else [1.0 + 0.1 * rng.random() for _ in steps],
            }
            for n in names
        ]
        points += _request(conn, "POST", f"/api/v1/runs/{run}/points", {"series": series})["inserted"]
        step += BATCH_STEPS
    return points / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2, help="alternating on/off ingest measurements")
    ap.add_argument("--db", default="sqlite,postgres")
    args = ap.parse_args()
    os.environ["STETHOSCOPE_WEBHOOK_ALLOW_PRIVATE"] = "1"  # the receiver listens on loopback
    for kind in args.db.split(","):
        result: dict = {"benchmark": "alert_latency", "database": kind}
        with fresh_database(kind) as db_url, server(db_url) as srv:
            result.update(measure_latency(_url(srv), args.trials))
        on, off = [], []
        for _ in range(args.rounds):
            for enabled, out in (("1", on), ("0", off)):
                os.environ["STETHOSCOPE_DETECTORS_ENABLED"] = enabled
                with fresh_database(kind) as db_url, server(db_url) as srv:
                    out.append(measure_ingest(_url(srv), args.seconds))
        os.environ.pop("STETHOSCOPE_DETECTORS_ENABLED", None)
        result["ingest_detectors_on_points_per_s"] = round(median(on))
        result["ingest_detectors_off_points_per_s"] = round(median(off))
        result["detector_cost_pct"] = round(100 * (1 - median(on) / median(off)), 1)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
