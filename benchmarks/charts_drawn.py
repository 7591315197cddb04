"""Time from navigation to the run page's charts drawn, in a real headless Chromium, for this
tree and a baseline git ref (``main`` by default) measured in the same run, on the same
database, alternately: the ratios are what to read on a shared, noisy machine.

Two runs: 250 steps with every series the hook sends (the tiny training's shape), and one
series of 1,000,000 points. For each, "cold" (a new browser context: nothing cached, plotly.js
downloaded and compiled) and "warm" (the same page again: plotly.js from the cache). The
figure is the page's own ``performance.mark("stethoscope-charts-rendered")`` (navigation
start to the last chart drawn), plus the requests and bytes the page fetched by then.

    python benchmarks/charts_drawn.py [--baseline main] [--repeats 3]

The baseline is ``git archive``d into a temporary folder and served by a second server
process whose ``PYTHONPATH`` maps the package names onto it (as the editable install does).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import free_port, median  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("STETHOSCOPE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
STEPS = 250
BIG = 1_000_000
RENDER_TIMEOUT_MS = 120_000


def fill(db_url: str) -> dict:
    """The two runs, through the store's own ingest path (no detector runner: this measures drawing)."""
    from stethoscope_server.settings import Settings
    from stethoscope_server.store import SeriesBatch, Store, migrate
    from stethoscope_server.store.db import make_engine

    settings = Settings(database_url=db_url)
    migrate.upgrade(settings.database_url)
    engine = make_engine(settings)
    store = Store(engine)
    t0 = time.perf_counter()
    store.upsert_run("r250", "bench", name="250 steps, every series")
    steps = list(range(STEPS))
    wall = [1.7e9 + s for s in steps]

    def every(k: int, f) -> SeriesBatch:
        ss = [s for s in steps if s % k == 0]
        return ss, [f(s) for s in ss], [1.7e9 + s for s in ss]

    lines = {
        "loss": lambda s: 1.4 * math.exp(-s / 60) + 0.05 + (2.0 if s == 220 else 0.0),
        "lr": lambda s: 0.1 * min(1.0, (s + 1) / 20),
        "grad/norm": lambda s: 1.0 + math.sin(s / 7) / 3,
        "grad/norm/fc1": lambda s: 0.5 + math.sin(s / 5) / 5,
        "grad/norm/fc2": lambda s: 0.4 + math.cos(s / 5) / 5,
        "grad/norm/head": lambda s: 0.8 + math.sin(s / 9) / 4,
        "logits/max_abs": lambda s: 2 + s / 40,
        "logits/mean_logz": lambda s: 1.4 - s / 500,
        "logits/entropy": lambda s: 1.3 * math.exp(-s / 90),
        "logits/sc_fraction": lambda s: 0.0,
        "logits/zero_loss_fraction": lambda s: 0.0,
        "logits/median_margin": lambda s: s / 30,
    }
    batches = [SeriesBatch(n, steps, [f(s) for s in steps], wall) for n, f in lines.items()]
    for name, k, f in (
        ("hessian/trace", 10, lambda s: 40 + s / 5),
        ("hessian/lambda_max", 10, lambda s: 5 + s / 50),
        ("hessian/two_over_lr", 10, lambda s: 2 / (0.1 * min(1.0, (s + 1) / 20))),
        ("eval/acc/A", 5, lambda s: min(0.95, 0.5 + s / 200) if s < 150 else 0.6 + (s - 150) / 400),
        ("eval/acc/B", 5, lambda s: 0.0 if s < 150 else min(0.9, (s - 150) / 80)),
    ):
        batches.append(SeriesBatch(name, *every(k, f)))
    store.ingest("r250", batches)
    r250_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    store.upsert_run("big", "big", name="one million points")
    chunk = 50_000
    for lo in range(0, BIG, chunk):
        ss = list(range(lo, lo + chunk))
        vals = [2.0 / (1 + s / 1e5) for s in ss]
        store.ingest("big", [SeriesBatch("loss", ss, vals, [0.0] * chunk)])
    big_s = time.perf_counter() - t0
    engine.dispose()
    return {"fill_250_s": round(r250_s, 2), "fill_1m_s": round(big_s, 2)}


@contextmanager
def baseline_tree(ref: str):
    """``ref`` of this repository, unpacked, with the package names mapped onto its folders."""
    with tempfile.TemporaryDirectory(prefix="stethoscope-baseline-") as d:
        tree = Path(d) / "tree"
        tree.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        pkgs = Path(d) / "pkgs"
        pkgs.mkdir()
        for name, folder in (
            ("stethoscope", "client"),
            ("stethoscope_server", "server"),
            ("stethoscope_dashboard", "dashboard"),
        ):
            (pkgs / name).symlink_to(tree / folder)
        if not (tree / "server" / "migrations").exists():
            (tree / "server" / "migrations").symlink_to(tree / "migrations")
        yield str(pkgs)


@contextmanager
def serve(db_url: str, pythonpath: str | None):
    from stethoscope_server.process import start_server_process, stop_process

    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    proc, url = start_server_process(db_url, free_port(), stdout=subprocess.DEVNULL, env=env)
    try:
        yield url
    finally:
        stop_process(proc)


def page_load(page, url: str) -> dict:
    page.goto(url)
    page.wait_for_selector("#charts[data-rendered]", timeout=RENDER_TIMEOUT_MS)
    return page.evaluate(
        """() => {
          const mark = performance.getEntriesByName('stethoscope-charts-rendered')[0].startTime;
          const res = performance.getEntriesByType('resource').filter(r => r.startTime <= mark);
          const nav = performance.getEntriesByType('navigation')[0];
          return {ms: mark, requests: res.length + 1,
                  bytes: res.reduce((a, r) => a + (r.transferSize || 0), 0) + (nav ? nav.transferSize : 0)};
        }"""
    )


def measure(browser, urls: dict[str, str], path: str, repeats: int) -> dict:
    out: dict[str, dict[str, list]] = {k: {"cold": [], "warm": [], "requests": [], "bytes_cold": []} for k in urls}
    for i in range(repeats):
        order = list(urls) if i % 2 == 0 else list(urls)[::-1]  # alternate who goes first
        for which in order:
            ctx = browser.new_context(viewport={"width": 1440, "height": 900})
            try:
                page = ctx.new_page()
                cold = page_load(page, urls[which] + path)
                warm = page_load(page, urls[which] + path)
            finally:
                ctx.close()
            out[which]["cold"].append(cold["ms"])
            out[which]["warm"].append(warm["ms"])
            out[which]["requests"].append(cold["requests"])
            out[which]["bytes_cold"].append(cold["bytes"])
    summary = {}
    for which, v in out.items():
        summary[which] = {
            "cold_ms": round(median(v["cold"]), 1),
            "warm_ms": round(median(v["warm"]), 1),
            "requests": int(median(v["requests"])),
            "bytes_cold": int(median(v["bytes_cold"])),
            "cold_ms_all": [round(x) for x in v["cold"]],
            "warm_ms_all": [round(x) for x in v["warm"]],
        }
    b, c = summary["baseline"], summary["current"]
    summary["ratio_baseline_over_current"] = {
        k: round(b[k] / c[k], 2) if c[k] else None for k in ("cold_ms", "warm_ms", "requests", "bytes_cold")
    }
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default="main", help="git ref to compare against (default main)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as d, ExitStack() as stack:
        db_url = f"sqlite:///{d}/charts.db"
        filled = fill(db_url)
        base_path = stack.enter_context(baseline_tree(args.baseline))
        urls = {
            "baseline": stack.enter_context(serve(db_url, base_path)),
            "current": stack.enter_context(serve(db_url, None)),
        }
        pw = stack.enter_context(sync_playwright())
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        stack.callback(browser.close)
        result = {
            "benchmark": "charts_drawn",
            "baseline": args.baseline,
            "repeats": args.repeats,
            **filled,
            "run_250_steps": measure(browser, urls, "/runs/r250", args.repeats),
            "run_1m_points": measure(browser, urls, "/runs/big", args.repeats),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
