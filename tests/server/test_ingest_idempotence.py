"""Property: any sequence of batches, with resends, overlaps and repeated steps, sent to two
servers on one database (two workers), leaves the store holding exactly the first value sent
for each (series, step); each reply's ``inserted`` counts exactly the points that were new;
a downsampled read (from the rollups) shows only points that are stored.
"""

from __future__ import annotations

import itertools
import math
import struct

import httpx
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from live_servers import _ThreadServer, free_port

from stethoscope.core.wire import decode_value, encode_values

SERIES = ["loss", "grad/norm", "x"]
values = st.floats(allow_nan=True, allow_infinity=True, width=64) | st.sampled_from(
    [math.nan, math.inf, -math.inf, 0.0]
)
# Steps from a small range, so batches overlap; a few far ones, so rollups of several buckets
# and levels are touched.
steps = st.integers(0, 150) | st.sampled_from([-5, 4095, 4096, 2**40])
column = st.lists(st.tuples(steps, values), min_size=1, max_size=25)
batch = st.dictionaries(st.sampled_from(SERIES), column, min_size=1, max_size=3)
# A send is a new batch, or a resend of an earlier one (index into those sent so far), and
# goes to server 0 or 1.
send = st.tuples(st.one_of(batch, st.integers(0, 10**6)), st.integers(0, 1))


def key(v: float):
    """A float bit for bit; every NaN alike, and zero without its sign (SQLite drops it, see
    test_wire_roundtrip.test_negative_zero_keeps_its_sign)."""
    return "nan" if v != v else struct.pack("<d", 0.0 if v == 0 else v)


@pytest.fixture
def two_servers(live_server):
    """The live server and a second one (another app, its own pool and caches) on its database."""
    from stethoscope_server.app import create_app

    port = free_port()
    with _ThreadServer(create_app(live_server.settings.model_copy(update={"port": port})), port):
        yield [live_server.url, f"http://127.0.0.1:{port}"]


_runs = itertools.count()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sends=st.lists(send, min_size=1, max_size=12))
def test_the_first_value_sent_wins_whatever_the_order_and_the_resends(two_servers, sends):
    run = f"idem-{next(_runs)}"
    note(f"sends: {sends!r}")
    apis = [url + "/api/v1" for url in two_servers]
    assert httpx.put(f"{apis[0]}/runs/{run}", json={"project": "idem"}, timeout=30).status_code == 201
    model: dict[tuple[str, int], float] = {}
    sent: list[dict] = []
    for item, server in sends:
        if isinstance(item, int):
            if not sent:
                continue
            body = sent[item % len(sent)]  # a resend, byte for byte the same batch
        else:
            body = {
                "series": [
                    {"name": n, "steps": [s for s, _ in col], "values": encode_values([v for _, v in col])}
                    for n, col in item.items()
                ]
            }
            sent.append(body)
        new = 0
        for s in body["series"]:
            for step, v in zip(s["steps"], s["values"]):
                if (s["name"], step) not in model:
                    model[(s["name"], step)] = decode_value(v)
                    new += 1
        r = httpx.post(f"{apis[server]}/runs/{run}/points", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["inserted"] == new, "inserted counts exactly the new points"
    for name in SERIES:
        want = sorted((step, v) for (n, step), v in model.items() if n == name)
        for api in apis:  # both workers read the same
            r = httpx.get(f"{api}/runs/{run}/series/{name}", params={"max_points": 100_000}, timeout=30)
            if not want:
                assert r.status_code == 404
                continue
            got = r.json()
            assert got["steps"] == [s for s, _ in want]
            assert [key(decode_value(v)) for v in got["values"]] == [key(v) for _, v in want]
        if want:
            # a downsampled read from the rollups: every point it shows is a stored point
            small = httpx.get(f"{apis[1]}/runs/{run}/series/{name}", params={"max_points": 3}, timeout=30).json()
            stored = dict(want)
            for step, v in zip(small["steps"], small["values"]):
                assert step in stored and key(decode_value(v)) == key(stored[step]), (step, v)
            finite = [v for _, v in want if v == v]
            if finite and small["downsampled"]:
                shown = [decode_value(v) for v in small["values"]]
                assert min(finite) in shown and max(finite) in shown, "the extremes are kept"
