"""`make demo`'s job end to end: a real server on SQLite, real trainings streamed by the hook."""

from __future__ import annotations

import math
import subprocess
import sys

import httpx
import pytest

from stethoscope.core.wire import decode_value

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_demo_streams_every_phenomenon(db_url, server_process):
    out = subprocess.run(
        # --pace 0: as fast as the CPU allows (make demo paces each training over a minute or more).
        [sys.executable, "-m", "stethoscope_server.demo", "--db", db_url, "--port", "0", "--exit", "--pace", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Stethoscope is running: open http://127.0.0.1:" in out.stdout
    assert "training 4 runs at the same time" in out.stdout
    # It ends with the page to open: the alerts page, not a JSON URL.
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("Open the alerts page: http://127.0.0.1:") and last.endswith("/alerts?project=demo")
    # read the stored runs back through a fresh server on the same file
    sp = server_process().start()
    try:
        api = sp.url + "/api/v1"
        runs = {r["id"].rsplit("-", 1)[0]: r for r in httpx.get(api + "/runs", params={"project": "demo"}).json()}
        assert set(runs) == {"modular-sc", "loss-spikes", "divergence", "edge-of-stability"}

        def series(run, name):
            d = httpx.get(f"{api}/runs/{runs[run]['id']}/series/{name}", params={"max_points": 100_000}).json()
            return [decode_value(v) for v in d["values"]]

        assert max(series("modular-sc", "logits/sc_fraction")) > 0.5  # Softmax Collapse reached
        assert runs["divergence"]["status"] == "diverged"
        assert any(not math.isfinite(v) for v in series("divergence", "loss"))  # NaN/inf stored
        loss = series("loss-spikes", "loss")
        assert max(loss[295:305]) > 3 * sorted(loss[200:300])[50]  # the corrupted batch shows
        lam, two_over_lr = (
            series("edge-of-stability", "hessian/lambda_max"),
            series("edge-of-stability", "hessian/two_over_lr"),
        )
        assert max(lam) >= 0.9 * two_over_lr[-1]  # sharpness reaches the edge of stability
    finally:
        sp.stop()
