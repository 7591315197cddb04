"""The binary array parameters of the PostgreSQL ingest path (``store.pg_arrays``): what
PostgreSQL reads back is every value sent, bit for bit, NULL where None (and NaN, for points)."""

from __future__ import annotations

import math
import struct

import psycopg
import pytest
from live_servers import PG_URL

from stethoscope_server.store.pg_arrays import float8_array, int8_array, int8_runs

INF = float("inf")
NAN = float("nan")


@pytest.fixture(scope="module")
def pg():
    try:
        conn = psycopg.connect(PG_URL.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    except psycopg.OperationalError as e:
        pytest.fail(f"PostgreSQL is required and is not reachable at {PG_URL}: {e}")
    with conn:
        yield conn


def _bits(xs) -> list:
    return [None if x is None else struct.pack("<d", x) for x in xs]


def _floats(pg, arr) -> list:
    return [
        r[0] for r in pg.execute("SELECT x FROM unnest(%s::float8[]) WITH ORDINALITY AS t(x, i) ORDER BY i", (arr,))
    ]


def _ints(pg, arr) -> list:
    return [
        r[0] for r in pg.execute("SELECT x FROM unnest(%s::bigint[]) WITH ORDINALITY AS t(x, i) ORDER BY i", (arr,))
    ]


@pytest.mark.parametrize(
    "values",
    [
        [0.5, -0.0, 0.0, INF, -INF, 5e-324, 1.7976931348623157e308, 1 / 3],
        [0.1 * i for i in range(1000)],
        [],
    ],
)
def test_floats_arrive_bit_for_bit(pg, values):
    assert _bits(_floats(pg, float8_array(values))) == _bits(values)
    assert _bits(_floats(pg, float8_array(values, nan_is_null=True))) == _bits(values)


def test_nan_is_null_for_points_and_nan_elsewhere(pg):
    values = [1.0, NAN, INF, -INF, NAN, -0.0]
    got = _floats(pg, float8_array(values, nan_is_null=True))
    assert _bits(got) == _bits([1.0, None, INF, -INF, None, -0.0])
    kept = _floats(pg, float8_array(values))
    assert math.isnan(kept[1]) and math.isnan(kept[4]) and _bits(kept[2:4]) == _bits([INF, -INF])


def test_inf_minus_inf_is_not_taken_for_a_nan(pg):
    # Their sum is NaN: the exact per-element way, which stores both as themselves.
    assert _bits(_floats(pg, float8_array([INF, -INF, 2.0], nan_is_null=True))) == _bits([INF, -INF, 2.0])


def test_none_is_null_among_floats_and_ints(pg):
    assert _bits(_floats(pg, float8_array([None, 2.5, None]))) == _bits([None, 2.5, None])
    assert _ints(pg, int8_array([None, 7, None])) == [None, 7, None]


@pytest.mark.parametrize("ints", [[0, 1, -1, 2**63 - 1, -(2**63)], list(range(10_000, 11_000)), [None] * 5])
def test_ints_arrive_exactly(pg, ints):
    assert _ints(pg, int8_array(ints)) == ints


@pytest.mark.parametrize("runs", [[(7, 50), (2**63 - 1, 3), (-(2**63), 1), (8, 0), (9, 2)], [(1, 1)], []])
def test_runs_of_ints_arrive_each_value_its_count_of_times(pg, runs):
    want = [v for v, count in runs for _ in range(count)]
    assert _ints(pg, int8_runs(runs)) == want
    assert int8_runs(runs) == int8_array(want)  # the same bytes
