"""Ingest and series reads through the real HTTP API, on both databases."""

from __future__ import annotations

import gzip
import math
import random
import struct

import pytest

from stethoscope.core.wire import decode_value, encode_values


def _run(client, run_id="r"):
    assert client.put(f"/runs/{run_id}", json={"project": "p"}).status_code in (200, 201)
    return run_id


def _post(client, run_id, series):
    body = {
        "series": [
            {"name": n, "steps": list(st), "values": encode_values(v), "walls": [1.7e9 + s for s in st]}
            for n, st, v in series
        ]
    }
    return client.post(f"/runs/{run_id}/points", json=body)


def _read(client, run_id, name, **params):
    r = client.get(f"/runs/{run_id}/series/{name}", params=params)
    assert r.status_code == 200, r.text
    d = r.json()
    return d["steps"], [decode_value(v) for v in d["values"]], d["downsampled"]


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


NONFINITE_AND_EDGES = [
    math.nan,
    math.inf,
    -math.inf,
    0.0,
    -0.0,
    1e308,
    -1e308,
    5e-324,
    2.2250738585072014e-308,
    1 / 3,
    16.635532333438686,
    -7.5,
]


def test_nonfinite_values_round_trip_unchanged(client):
    run = _run(client)
    steps = list(range(len(NONFINITE_AND_EDGES)))
    r = _post(client, run, [("logits/max_abs", steps, NONFINITE_AND_EDGES)])
    assert r.status_code == 200 and r.json()["inserted"] == len(steps)
    got_steps, got, downsampled = _read(client, run, "logits/max_abs")
    assert got_steps == steps and not downsampled
    for want, have in zip(NONFINITE_AND_EDGES, got):
        if math.isnan(want):
            assert math.isnan(have)
        else:
            assert _bits(want) == _bits(have), (want, have)
    listing = {s["name"]: s for s in client.get(f"/runs/{run}/series").json()}
    assert listing["logits/max_abs"]["last_step"] == steps[-1]


def test_nonfinite_survive_downsampling(client):
    run = _run(client)
    n = 5000
    values = [math.sin(i / 50) for i in range(n)]
    values[1234], values[2500], values[4000] = math.nan, math.inf, -math.inf
    _post(client, run, [("loss", range(n), values)])
    steps, got, downsampled = _read(client, run, "loss", max_points=90)
    assert downsampled and len(steps) <= 90
    by_step = dict(zip(steps, got))
    assert math.isnan(by_step[1234]) and by_step[2500] == math.inf and by_step[4000] == -math.inf


def test_resent_batch_is_stored_once(client):
    run = _run(client)
    batch = [("loss", range(100), [float(i) for i in range(100)]), ("lr", range(100), [0.1] * 100)]
    first = _post(client, run, batch).json()
    assert first["points"] == 200 and first["inserted"] == 200
    again = _post(client, run, batch).json()
    assert again["points"] == 200 and again["inserted"] == 0
    # an overlapping batch stores only its new steps; the first value sent for a step wins
    overlap = _post(client, run, [("loss", range(90, 110), [-1.0] * 20)]).json()
    assert overlap["inserted"] == 10
    steps, values, _ = _read(client, run, "loss", max_points=1000)
    assert steps == list(range(110))
    assert values[:100] == [float(i) for i in range(100)] and values[100:] == [-1.0] * 10


def test_duplicate_steps_in_one_batch_keep_the_first(client):
    run = _run(client)
    r = client.post(
        f"/runs/{run}/points", json={"series": [{"name": "loss", "steps": [3, 3, 4], "values": [1.0, 2.0, 5.0]}]}
    )
    assert r.status_code == 200 and r.json()["inserted"] == 2
    assert _read(client, run, "loss")[:2] == ([3, 4], [1.0, 5.0])


def test_gzip_body(client):
    run = _run(client)
    import json

    raw = json.dumps({"series": [{"name": "loss", "steps": list(range(1000)), "values": [0.5] * 1000}]}).encode()
    r = client.post(
        f"/runs/{run}/points",
        content=gzip.compress(raw),
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert r.status_code == 200 and r.json()["inserted"] == 1000


@pytest.mark.parametrize(
    "body, status, needle",
    [
        (b"{nope", 422, "not valid JSON"),
        (b"[]", 422, "must be a JSON object"),
        (b'{"series": {}}', 422, "must be a JSON object"),
        (b'{"series": [], "extra": 1}', 422, "unknown field"),
        (b'{"series": [{"name": "", "steps": [1], "values": [1]}]}', 422, "name must be a non-empty string"),
        (b'{"series": [{"name": 5, "steps": [1], "values": [1]}]}', 422, "name must be"),
        (b'{"series": [{"name": "a", "steps": [1, 2], "values": [1]}]}', 422, "2 steps but 1 values"),
        (b'{"series": [{"name": "a", "steps": [true], "values": [1]}]}', 422, "is not an integer"),
        (b'{"series": [{"name": "a", "steps": ["1"], "values": [1]}]}', 422, "is not an integer"),
        (b'{"series": [{"name": "a", "steps": [1], "values": ["nan"]}]}', 422, "is not a number"),
        (b'{"series": [{"name": "a", "steps": [1], "values": [null]}]}', 422, "is not a number"),
        (b'{"series": [{"name": "a", "steps": [1], "values": [1], "walls": ["x"]}]}', 422, "walls[0]"),
        (
            b'{"series": [{"name": "a", "steps": [1], "values": [1], "walls": [1, 2]}]}',
            422,
            "walls must be a list of 1",
        ),
        (b'{"series": [{"name": "a", "steps": [9223372036854775808], "values": [1]}]}', 422, "64-bit"),
        (
            b'{"series": [{"name": "a", "steps": [9223372036854775807, 9223372036854775808], "values": [1, 2]}]}',
            422,
            "64-bit",
        ),
        (b'{"series": [{"name": "a", "steps": [0, 9223372036854775808, 1], "values": [1, 2, 3]}]}', 422, "64-bit"),
        (
            b'{"series": [{"name": "a", "steps": [1], "values": [1]}, {"name": "a", "steps": [2], "values": [1]}]}',
            422,
            "appears twice",
        ),
        (b'{"series": [{"name": "' + b"x" * 201 + b'", "steps": [1], "values": [1]}]}', 422, "at most 200"),
    ],
)
def test_malformed_batches_get_a_clear_4xx_and_store_nothing(client, body, status, needle):
    run = _run(client)
    r = client.post(f"/runs/{run}/points", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]
    assert client.get(f"/runs/{run}/series").json() == []


def test_oversized_batches_are_413(client, live_server):
    run = _run(client)
    limit = live_server.settings.max_points_per_batch
    r = client.post(
        f"/runs/{run}/points",
        json={"series": [{"name": "a", "steps": list(range(limit + 1)), "values": [0.0] * (limit + 1)}]},
    )
    assert r.status_code == 413 and "split it" in r.json()["detail"]
    r = client.post(
        f"/runs/{run}/points",
        content=b" " * (live_server.settings.max_body_bytes + 1),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and "STETHOSCOPE_MAX_BODY_BYTES" in r.json()["detail"]  # the gate's one check
    bomb = gzip.compress(b" " * (live_server.settings.max_body_bytes + 10))
    r = client.post(
        f"/runs/{run}/points", content=bomb, headers={"content-type": "application/json", "content-encoding": "gzip"}
    )
    assert r.status_code == 413
    r = client.post(
        f"/runs/{run}/points",
        content=b"garbage",
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert r.status_code == 400


def test_ingest_into_missing_run_is_404(client):
    r = client.post("/runs/ghost/points", json={"series": [{"name": "a", "steps": [1], "values": [1]}]})
    assert r.status_code == 404 and "PUT /api/v1/runs/ghost" in r.json()["detail"]


def test_series_names_with_slashes_and_missing_series(client):
    run = _run(client)
    _post(client, run, [("grad/norm/encoder.layers.0", [1, 2], [0.5, 0.25])])
    assert _read(client, run, "grad/norm/encoder.layers.0")[:2] == ([1, 2], [0.5, 0.25])
    assert client.get(f"/runs/{run}/series/nope").status_code == 404
    assert client.get(f"/runs/{run}/series/grad/norm/encoder.layers.0", params={"max_points": 1}).status_code == 422


def _bucketed_truth(values, lo, hi):
    seg = values[lo : hi + 1]
    finite = [v for v in seg if not math.isnan(v)]
    return max(finite), min(finite)


@pytest.mark.parametrize("n", [3000, 200_000])
def test_downsampling_keeps_extremes_and_every_nan(client, n):
    """Long series (rollup path) and short ones (raw path): each bucket keeps its max, min, NaN."""
    run = _run(client)
    rng = random.Random(7)
    values = [1.0 + 0.1 * rng.random() for _ in range(n)]
    # far apart (n/12), so no two share an output bucket (about n/100 wide) and each must survive
    spikes = {n * (2 * k + 1) // 12 + rng.randrange(n // 48): 50.0 + k for k in range(6)}
    dips = {n * (2 * k + 1) // 12 + n // 24 + rng.randrange(n // 48): -10.0 - k for k in range(6)}
    nans = [n * k // 12 + n // 48 + rng.randrange(n // 48) for k in range(12)]
    for s, v in {**spikes, **dips}.items():
        values[s] = v
    for s in nans:
        values[s] = math.nan
    chunk = 20_000
    for k in range(0, n, chunk):
        assert _post(client, run, [("loss", range(k, min(n, k + chunk)), values[k : k + chunk])]).status_code == 200
    for params in [{"max_points": 300}, {"max_points": 300, "start": n // 7, "end": n - n // 5}]:
        steps, got, downsampled = _read(client, run, "loss", **params)
        lo, hi = params.get("start", 0), params.get("end", n - 1)
        assert downsampled and 0 < len(steps) <= 300
        assert steps == sorted(set(steps)) and lo <= steps[0] and steps[-1] <= hi
        for s, v in zip(steps, got):  # every point returned is a stored point
            assert (math.isnan(v) and math.isnan(values[s])) or v == values[s]
        by_step = dict(zip(steps, got))
        for s in [*spikes, *dips]:
            if lo <= s <= hi:
                assert by_step.get(s) == values[s], f"extreme at {s} lost"
        for s in nans:
            if lo <= s <= hi:
                assert s in by_step and math.isnan(by_step[s]), f"NaN at {s} lost"
        top, bottom = _bucketed_truth(values, lo, hi)
        assert max(v for v in got if not math.isnan(v)) == top
        assert min(v for v in got if not math.isnan(v)) == bottom


def test_downsampled_buckets_are_exact(client):
    """Every returned point is the max or min of the stretch between its neighbours' buckets:
    checked by recomputing, for each consecutive pair of returned steps, that no stored value
    between them exceeds both."""
    run = _run(client)
    rng = random.Random(3)
    n = 100_000
    values = [rng.gauss(0, 1) for _ in range(n)]
    _post(client, run, [("x", range(0, 50_000), values[:50_000])])
    _post(client, run, [("x", range(50_000, n), values[50_000:])])
    steps, got, _ = _read(client, run, "x", max_points=600)
    # the buckets partition the range; between two returned points of the same bucket (or
    # adjacent buckets) no value can exceed max(returned), so the global top-k must all be there
    top = sorted(range(n), key=lambda i: values[i])[-3:]
    bottom = sorted(range(n), key=lambda i: values[i])[:3]
    for s in top + bottom:
        assert s in steps


def test_events_are_idempotent_and_ordered(client):
    run = _run(client)
    ev = [
        {"key": "e2", "step": 200, "kind": "task_switch", "info": {"task": "b"}},
        {"key": "e1", "step": 100, "kind": "checkpoint", "message": "saved"},
    ]
    assert client.post(f"/runs/{run}/events", json={"events": ev}).json() == {"received": 2, "inserted": 2}
    assert client.post(f"/runs/{run}/events", json={"events": ev}).json() == {"received": 2, "inserted": 0}
    got = client.get(f"/runs/{run}/events").json()
    assert [e["step"] for e in got] == [100, 200] and got[1]["info"] == {"task": "b"}
    assert [e["key"] for e in client.get(f"/runs/{run}/events", params={"kind": "task_switch"}).json()] == ["e2"]
    assert client.post(f"/runs/{run}/events", json={"events": [{"key": "", "step": 1, "kind": "x"}]}).status_code == 422
    assert client.post("/runs/ghost/events", json={"events": ev}).status_code == 404


@pytest.mark.parametrize("wall", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_an_event_wall_that_is_not_finite_is_a_422_and_stores_nothing(client, wall):
    """Issue 16, finding 8: an event's wall took NaN and infinity."""
    run = _run(client)
    body = b'{"events": [{"key": "e", "step": 1, "kind": "checkpoint", "wall": ' + wall + b"}]}"
    r = client.post(f"/runs/{run}/events", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    # The one JSON reader (``parsing.strict_json``) refuses these spellings before the route's
    # own check of ``wall`` sees them; either way it is a 422 that says what is wrong.
    assert "wall" in r.text or "json_invalid" in r.text
    assert client.get(f"/runs/{run}/events").json() == []
    ok = client.post(
        f"/runs/{run}/events", json={"events": [{"key": "e", "step": 1, "kind": "checkpoint", "wall": 1.7e9}]}
    )
    assert ok.status_code == 200 and client.get(f"/runs/{run}/events").json()[0]["wall"] == 1.7e9


def test_read_many_gives_what_read_series_gives_one_by_one(client, live_server):
    """``Store.read_many`` (the dashboard's panels) batches the reads of many series: each
    series comes back exactly as ``read_series`` gives it, whole, sparse or downsampled."""
    run = _run(client)
    rng = random.Random(7)
    series = [
        ("short", range(50), [rng.random() for _ in range(50)]),
        (
            "short/nan",
            range(10, 40),
            [math.nan if s % 7 == 0 else -math.inf if s == 20 else float(s) for s in range(10, 40)],
        ),
        ("sparse", range(0, 200_000, 1000), [rng.random() for _ in range(200)]),
        ("long", range(20_000), [rng.gauss(0, 1) if s != 12_345 else math.nan for s in range(20_000)]),
        ("late", range(5_000, 5_010), [1.0] * 10),
    ]
    for name, steps, values in series:
        for k in range(0, len(steps), 10_000):
            assert _post(client, run, [(name, steps[k : k + 10_000], values[k : k + 10_000])]).status_code == 200
    store = live_server.store
    names = [n for n, _, _ in series] + ["missing"]
    for start, end, max_points in ((None, None, 1500), (100, 4_000, 600), (30, 15_000, 300), (6_000, 7_000, 1500)):
        got = store.read_many(run, names, start, end, max_points)
        assert set(got) == set(names) - {"missing"}
        for name in got:
            want = store.read_series(run, name, start, end, max_points)
            assert got[name].steps == want.steps and got[name].downsampled == want.downsampled, (name, start, end)
            assert [_bits(v) for v in got[name].values] == [_bits(v) for v in want.values], (name, start, end)


def test_downsamplers_agree_because_they_share_one_bucket(client):
    """Issue 15: the rollups written at ingest (both their fast path and their point-by-point
    path), the range read and the continual summary's downsampler keep the same points of a
    bucket (min, max, first NaN; ties to the smaller step), because they share ``Extremes``."""
    from stethoscope_server.store.continual import downsample

    run = _run(client)
    n = 640  # ten 64-step buckets at the finest rollup level
    rng = random.Random(15)
    with_nan = [float(rng.choice([1, 2, 3])) for _ in range(n)]  # ties in every bucket
    nonfinite = {5: math.nan, 9: math.nan, 70: math.inf, 71: -math.inf, 200: math.nan, 201: -math.inf, 639: math.inf}
    for i, v in nonfinite.items():
        with_nan[i] = v
    finite = [float(rng.choice([1, 2, 3])) for _ in range(n)]
    finite[100] = finite[300] = math.inf  # a sum that stays inf: the rollups' sorted fast path
    assert _post(client, run, [("a", range(n), with_nan), ("b", range(n), finite)]).status_code == 200
    # A bucket shows 3 points where NaN is about, else 2: "a" at max_points 30 and "b" at 20
    # make ten buckets, which read the level-6 rollups (one per output bucket); 300 buckets
    # raw points.
    for name, values, few in (("a", with_nan, 30), ("b", finite, 20)):
        for max_points in (few, 300):
            steps, got, down = _read(client, run, name, max_points=max_points)
            assert down
            want_s, want_v, _ = downsample(list(range(n)), values, max_points)
            assert (steps, [repr(v) for v in got]) == (want_s, [repr(v) for v in want_v]), (name, max_points)


def test_the_ingest_route_is_matched_first_and_leaves_what_runid_refuses_to_fastapi(client, settings):
    """``IngestRoute`` takes POST /runs/{run_id}/points ahead of FastAPI's routing, for the run
    ids ``RunId`` takes; other methods and refused ids reach FastAPI's route, its 405 and 422."""
    from starlette.routing import Match

    from stethoscope_server.api.points import IngestRoute
    from stethoscope_server.app import create_app

    first = create_app(settings).router.routes[0]
    assert isinstance(first, IngestRoute)

    def match(method, path):
        got, child = first.matches({"type": "http", "method": method, "path": path, "root_path": ""})
        return (got, child.get("path_params", {}).get("run_id"))

    assert match("POST", "/api/v1/runs/r 1/points") == (Match.FULL, "r 1")
    assert match("POST", "/api/v1/runs/" + "x" * 200 + "/points") == (Match.FULL, "x" * 200)
    for method, path in [
        ("GET", "/api/v1/runs/r/points"),
        ("POST", "/api/v1/runs/" + "x" * 201 + "/points"),
        ("POST", "/api/v1/runs//points"),
        ("POST", "/api/v1/runs/a/b/points"),
        ("POST", "/api/v1/runs/a\x00b/points"),
        ("POST", "/api/v1/runs/r/points/"),
        ("POST", "/api/v1/runs/r/series"),
    ]:
        assert match(method, path) == (Match.NONE, None), (method, path)
    # The run id it reads is the one the gate's rule reads (auth.access, the same template
    # through Starlette's compiler): a path the two read apart would authorize one run and
    # write another.
    from stethoscope_server.auth import access

    for path in [
        "/api/v1/runs/r/points\n",
        "/api/v1/runs/r\n/points",
        "/api/v1/runs/%2e%2e/points",
        "/api/v1/runs/ /points",
    ]:
        _, _, params = access.match("POST", path)
        assert match("POST", path) == (Match.FULL, params["run_id"]), path
    r = client.post("/runs/" + "x" * 201 + "/points", json={"series": []})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "run_id"]
    assert client.get(f"/runs/{_run(client)}/points").status_code == 405


def test_parse_keeps_steps_as_sent_and_the_first_value_of_a_repeated_step():
    """Evenly spaced ascending steps (checked by one comparison) and any other order (checked
    in full) parse to the same thing: the steps as sent, a repeated step's first value."""
    import orjson

    from stethoscope_server.api.ingest_parse import parse_batch

    def parsed(steps):
        body = orjson.dumps(
            {"series": [{"name": "a", "steps": steps, "values": [float(i) for i in range(len(steps))]}]}
        )
        (sb,) = parse_batch(body, 10_000)
        return sb.steps, sb.values

    assert parsed([7]) == ([7], [0.0])
    assert parsed([0, 10, 20, 30]) == ([0, 10, 20, 30], [0.0, 1.0, 2.0, 3.0])
    assert parsed([5, 3, 4]) == ([5, 3, 4], [0.0, 1.0, 2.0])
    assert parsed([0, 2, 4, 4, 8]) == ([0, 2, 4, 8], [0.0, 1.0, 2.0, 4.0])  # spaced but for one repeat
    assert parsed([0, 2, 2, 6]) == ([0, 2, 6], [0.0, 1.0, 3.0])  # ends as an even spacing would have them
    assert parsed([3, 3, 3]) == ([3], [0.0])
    assert parsed([2, 1, 0]) == ([2, 1, 0], [0.0, 1.0, 2.0])
