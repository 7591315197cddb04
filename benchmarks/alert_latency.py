"""Time from a batch's ingest to its alert and to its webhook delivery, and what detectors cost ingest.

Against a real server process and a real HTTP receiver on loopback, per database:

- ``ingest_to_alert_ms``: from sending the batch that holds a loss spike to the reply that
  carries the alert (the alert row is committed with the points, so it is also readable
  through ``GET /runs/{id}/alerts`` by then; ``alert_visible_ms`` checks that).
- ``ingest_to_webhook_ms``: from sending that batch to the receiver getting the signed POST.
- ``ingest_*_points_per_s``: one sender posting batches of 1,000 points of 20 series of which
  two feed the detectors (``loss``, ``grad/norm``), with detectors on and off
  (``STETHOSCOPE_DETECTORS_ENABLED=0``).

And for the hook (one line, ``"benchmark": "alert_latency_hook"``, against a real server on SQLite):

- ``nan_to_on_alert``: a real tiny training whose learning rate jumps to 1e38 (its next loss is
  NaN) keeps training; how many steps the loop had logged past the NaN step when
  ``on_alert`` heard of the divergence (0: before the loop logged the next step), and the
  milliseconds, with the hook's detectors (``hook``) and with the server's alone (``server``,
  ``detectors=False``), at the tiny model's own pace and with steps padded to ``--step-ms``
  (a job whose steps take that long on its accelerator).
- ``detector_cpu_us_per_step``: CPU the hook's detectors add to the sender thread per logged
  step of a small transformer LM (the record of every step, ~40 series): the sender thread's
  CPU clock over a run with detectors on minus one with them off, and the same records replayed
  through the hook's ``Watch`` alone, timed call by call.

    python benchmarks/alert_latency.py [--trials 30] [--seconds 5] [--db sqlite,postgres]
                                       [--parts server,hook] [--hook-trials 5] [--step-ms 10]
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


# -- the hook's own detection -----------------------------------------------------------------
JUMP_STEP = 100  # the learning rate jumps to 1e38 here; the next step's loss is NaN
MAX_STEPS_AFTER = 50_000
MAX_SECONDS_AFTER = 15.0


def _blow_up(url: str, hook: bool, seed: int, step_ms: float, spool) -> tuple[int, float, str]:
    """Steps and ms from the first NaN loss to ``on_alert`` hearing of the divergence."""
    import torch
    import torch.nn.functional as F

    import stethoscope

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(16)]
    at = {"step": -1}
    heard: dict = {}

    def on_alert(alerts):
        for a in alerts:
            if a["detector"] == "divergence" and a["key"] == "nonfinite" and not heard:
                heard.update(step=at["step"], t=time.perf_counter(), source=a.get("source"))

    mon = stethoscope.attach(
        model, opt, project="bench", server=url, spool_dir=spool, detectors=None if hook else False
    )
    mon.on_alert(on_alert)
    nan_step = t_nan = None
    step = 0
    while True:
        if step == JUMP_STEP:
            for group in opt.param_groups:
                group["lr"] = 1e38
        x, y = data[step % len(data)]
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        at["step"] = step
        t_log = time.perf_counter()
        mon.log(step=step, loss=loss, logits=logits, targets=y)
        if nan_step is None and not math.isfinite(loss.item()):  # the benchmark's own sync
            nan_step, t_nan = step, t_log
        if step_ms:
            time.sleep(step_ms / 1e3)
        if heard or (
            nan_step is not None
            and (step - nan_step > MAX_STEPS_AFTER or time.perf_counter() - t_nan > MAX_SECONDS_AFTER)
        ):
            break
        step += 1
    mon.close()
    if not heard:
        raise RuntimeError(f"on_alert never heard of the divergence ({'hook' if hook else 'server'})")
    return heard["step"] - nan_step, (heard["t"] - t_nan) * 1e3, heard["source"]


def measure_hook_latency(url: str, trials: int, step_ms_list: list[float], spool) -> dict:
    out: dict = {}
    for step_ms in step_ms_list:
        for hook in (True, False):
            steps, ms, sources = [], [], set()
            for t in range(trials):
                n, m, source = _blow_up(url, hook, t, step_ms, spool)
                steps.append(n)
                ms.append(m)
                sources.add(source)
            out[f"{'hook' if hook else 'server'}_step_ms_{step_ms:g}"] = {
                "steps": {"p50": percentile(steps, 50), "max": max(steps), "all": steps},
                "ms": {"p50": round(percentile(ms, 50), 2), "max": round(max(ms), 2)},
                "source": sorted(sources),
            }
    return {"trials": trials, "nan_to_on_alert": out}


def _lm_run(steps: int, detectors, spool: Path) -> tuple[float, float]:
    """A small transformer LM trained offline with the hook: the sender thread's CPU seconds,
    and the training loop's wall seconds."""
    import torch
    from hook_overhead import TinyLM, make_batch

    import stethoscope

    torch.manual_seed(0)
    model = TinyLM(vocab=256, d=64, layers=2, seq=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    mon = stethoscope.attach(model, opt, project="bench", server="offline", spool_dir=spool, detectors=detectors)
    if detectors is not False:
        mon.on_alert(lambda alerts: None)  # without a callback the hook's detectors do not run
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = make_batch(g, 16, 33, 256)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.log(step=step, loss=loss, logits=logits, targets=y)
    wall = time.perf_counter() - t0
    mon.flush(60)
    cpu = time.clock_gettime(time.pthread_getcpuclockid(mon._sender._thread.ident))
    mon.close()
    return cpu, wall


def _spooled_records(spool: Path) -> list[tuple[int, list, list]]:
    """Each step's (step, names, values) from an offline run's spool: what the detectors read."""
    from stethoscope.core.wire import decode_value

    by_step: dict[int, tuple[list, list]] = {}
    for seg in sorted(spool.rglob("*.jsonl")):
        for line in seg.read_text().splitlines():
            entry = json.loads(line)
            if entry["t"] == "points":
                for col in entry["b"]["series"]:
                    for step, v in zip(col["steps"], col["values"]):
                        names, values = by_step.setdefault(step, ([], []))
                        names.append(col["name"])
                        values.append(decode_value(v))
    return [(step, *by_step[step]) for step in sorted(by_step)]


def measure_detector_cpu(steps: int, rounds: int, spool) -> dict:
    from stethoscope._watch import Watch
    from stethoscope.core.detectors import DetectorSet

    on, off, wall_on, wall_off = [], [], [], []
    for r in range(rounds):
        for out, wall, detectors, name in ((on, wall_on, None, "on"), (off, wall_off, False, "off")):
            cpu, w = _lm_run(steps, detectors, spool / f"{name}-{r}")
            out.append(cpu)
            wall.append(w)
    records = _spooled_records(spool / "on-0")
    replay = []
    for _ in range(rounds):
        watch = Watch(DetectorSet(), "replay", "bench", [lambda alerts: None])
        for step, names, values in records:
            t0 = time.thread_time_ns()
            watch.points(step, names, values)
            replay.append((time.thread_time_ns() - t0) / 1e3)
    return {
        "steps": steps,
        "series_per_record": round(sum(len(r[1]) for r in records) / len(records), 1),
        "sender_cpu_us_per_step_detectors_on": round(median(on) / steps * 1e6, 1),
        "sender_cpu_us_per_step_detectors_off": round(median(off) / steps * 1e6, 1),
        "detector_cpu_us_per_step": round((median(on) - median(off)) / steps * 1e6, 1),
        "training_ms_per_step_detectors_on": round(median(wall_on) / steps * 1e3, 3),
        "training_ms_per_step_detectors_off": round(median(wall_off) / steps * 1e3, 3),
        "replay_detector_cpu_us_per_step": {
            "mean": round(sum(replay) / len(replay), 1),
            "p50": round(percentile(replay, 50), 1),
            "p99": round(percentile(replay, 99), 1),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2, help="alternating on/off runs (ingest; the hook's detector CPU)")
    ap.add_argument("--db", default="sqlite,postgres")
    ap.add_argument("--parts", default="server,hook", help="server: ingest to alert and webhook; hook: on_alert")
    ap.add_argument("--hook-trials", type=int, default=5)
    ap.add_argument("--step-ms", default="0,10", help="step durations for the hook's latency (0: as fast as it goes)")
    ap.add_argument("--cpu-steps", type=int, default=400)
    args = ap.parse_args()
    os.environ["STETHOSCOPE_WEBHOOK_ALLOW_PRIVATE"] = "1"  # the receiver listens on loopback
    parts = args.parts.split(",")
    if "hook" in parts:
        import tempfile

        import torch

        torch.set_num_threads(1)
        result = {"benchmark": "alert_latency_hook", "database": "sqlite"}
        with tempfile.TemporaryDirectory() as d:
            spool = Path(d)
            with fresh_database("sqlite") as db_url, server(db_url) as srv:
                step_ms = [float(x) for x in args.step_ms.split(",")]
                result.update(measure_hook_latency(_url(srv), args.hook_trials, step_ms, spool))
            result["detector_cpu"] = measure_detector_cpu(args.cpu_steps, args.rounds, spool)
        print(json.dumps(result), flush=True)
    for kind in args.db.split(",") if "server" in parts else ():
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
