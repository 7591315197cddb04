"""Property tests of the wire encoding: any float, NaN, +-inf, -0.0 and subnormals included,
comes back as itself: through ``stethoscope.core.wire`` alone, through the server's own parser and
reply encoder, and end to end through the hook's transport, a real server and each database.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
import sys

import httpx
import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from stethoscope._transport import HttpTransport
from stethoscope.core.wire import decode_value, encode_value, encode_values
from stethoscope_server.api.ingest_parse import parse_batch

#: Floats of every kind; hypothesis draws NaN, +-inf, -0.0 and subnormals on its own, and
#: these make sure each kind shows up in every run.
EDGES = [
    math.nan,
    math.inf,
    -math.inf,
    0.0,
    -0.0,
    5e-324,
    -5e-324,
    2.2250738585072009e-308,
    sys.float_info.max,
    -sys.float_info.max,
    sys.float_info.min,
    1.0 + 2**-52,
    0.1,
    1e300,
    -1e-300,
]
any_float = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True) | st.sampled_from(EDGES)


def same(a: float, b: float) -> bool:
    """The same float: bit for bit, except that every NaN is the same NaN (the wire has one)."""
    if a != a or b != b:
        return a != a and b != b
    return struct.pack("<d", a) == struct.pack("<d", b)


def through_json(v):
    """What a JSON reader gets from the hook's writer (``json.dumps``, no NaN allowed)."""
    return json.loads(json.dumps(v, allow_nan=False))


@settings(max_examples=3000, deadline=None)
@given(any_float)
def test_encode_then_decode_is_the_identity(x):
    wire = encode_value(x)
    assert type(wire) in (float, str)
    assert same(decode_value(through_json(wire)), x)
    assert same(decode_value(orjson.loads(orjson.dumps(wire))), x)
    assert encode_values([x]) == [wire] or (x != x and encode_values([x]) == ["NaN"])


@settings(max_examples=500, deadline=None)
@given(st.lists(any_float, max_size=50))
def test_the_server_parses_what_the_hook_writes_and_replies_what_it_stored(xs):
    body = json.dumps(
        {"series": [{"name": "x", "steps": list(range(len(xs))), "values": encode_values(xs)}]}, allow_nan=False
    ).encode()
    if xs:  # an empty column is skipped
        (batch,) = parse_batch(body, 50_000)
        assert all(same(a, b) for a, b in zip(batch.values, xs, strict=True))
    # the reply of a read: orjson over encode_values, read by the hook's side with json
    reply = json.loads(orjson.dumps({"values": encode_values(xs)}))
    assert all(same(decode_value(v), x) for v, x in zip(reply["values"], xs, strict=True))


_runs = itertools.count()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(xs=st.lists(any_float, min_size=1, max_size=40))
@example(xs=EDGES)  # every kind, every run
def test_every_float_round_trips_through_the_server_and_the_database(live_server, xs):
    run = f"wire-{next(_runs)}"
    api = live_server.url + "/api/v1"
    transport = HttpTransport(live_server.url)  # the hook's own transport (gzip past 1 KiB)
    try:
        transport.request("PUT", f"/api/v1/runs/{run}", {"project": "wire"})
        reply = transport.request(
            "POST",
            f"/api/v1/runs/{run}/points",
            {"series": [{"name": "x", "steps": list(range(len(xs))), "values": encode_values(xs)}]},
            compress=True,
        )
    finally:
        transport.close()
    assert reply["inserted"] == len(xs)
    body = httpx.get(f"{api}/runs/{run}/series/x", params={"max_points": 1000}, timeout=30).json()
    assert body["steps"] == list(range(len(xs))) and not body["downsampled"]
    got = [decode_value(v) for v in body["values"]]
    # Bit for bit on both databases, -0.0 included (SQLite: migration 0004).
    bad = [(i, x, g) for i, (x, g) in enumerate(zip(xs, got)) if not same(x, g)]
    assert not bad, f"stored and read back differently (step, sent, got): {bad}"
    (info,) = httpx.get(f"{api}/runs/{run}/series", timeout=30).json()
    assert same(decode_value(info["last_value"]), xs[-1])


def test_negative_zero_keeps_its_sign(client):
    assert client.put("/runs/zero", json={"project": "wire"}).status_code == 201
    r = client.post("/runs/zero/points", json={"series": [{"name": "x", "steps": [0, 1], "values": [-0.0, 0.0]}]})
    assert r.status_code == 200, r.text
    got = [decode_value(v) for v in client.get("/runs/zero/series/x").json()["values"]]
    assert [math.copysign(1.0, v) for v in got] == [-1.0, 1.0]
