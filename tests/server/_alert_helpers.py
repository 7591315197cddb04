"""Series that make the detectors fire, and posting them through the real API."""

from __future__ import annotations

import math
import random

import pytest
from live_servers import wait_until  # noqa: F401  (the alert tests import it from here)

from stethoscope.core.wire import encode_values


@pytest.fixture(autouse=True)  # autouse where a test module imports it
def no_internal_errors(request):
    """Errors the server swallows (logged, points kept) are failures in these tests."""
    server = request.getfixturevalue("live_server") if "live_server" in request.fixturenames else None
    yield
    if server is not None:
        assert server.app.state.alerting.errors == 0


#: A spike far above any noise of ``loss_curve`` (its values stay below ~2.5).
SPIKE = 40.0


def loss_curve(n: int, seed: int = 0, spikes: tuple = (), nans: tuple = ()) -> list[float]:
    """A falling minibatch-like loss with 5% noise; ``spikes`` steps jump to ``SPIKE``."""
    rng = random.Random(seed)
    v = [2.0 * math.exp(-s / 400) * (1 + 0.05 * rng.random()) + 0.1 for s in range(n)]
    for s in spikes:
        v[s] = SPIKE
    for s in nans:
        v[s] = math.nan
    return v


def post(client, run_id: str, start: int, values: list[float], name: str = "loss"):
    steps = list(range(start, start + len(values)))
    r = client.post(
        f"/runs/{run_id}/points", json={"series": [{"name": name, "steps": steps, "values": encode_values(values)}]}
    )
    assert r.status_code == 200, r.text
    return r.json()


def post_batches(
    client,
    run_id: str,
    values: list[float],
    first: int = 0,
    last: int | None = None,
    size: int = 20,
    name: str = "loss",
) -> list[dict]:
    """Post steps [first, last) of ``values`` in batches; returns the alerts the replies carried."""
    last = len(values) if last is None else last
    opened = []
    for a in range(first, last, size):
        b = min(a + size, last)
        opened += post(client, run_id, a, values[a:b], name)["alerts"]
    return opened


def make_run(client, run_id: str = "r", project: str = "p") -> str:
    r = client.put(f"/runs/{run_id}", json={"project": project})
    assert r.status_code in (200, 201), r.text
    return run_id
