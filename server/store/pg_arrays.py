"""PostgreSQL array parameters in binary form, packed by ``struct`` in C.

A batch's columns travel to PostgreSQL as one array parameter each (``unnest`` turns them
into rows). psycopg adapts a list element by element (~1 us a float); a text literal built
with ``repr`` costs ~0.19 us a float and the server parses it back; the binary form
(``array_send``'s layout: a header, then a length and 8 bytes per element) is ~0.03 us,
and the server copies it.

    cur.execute("SELECT unnest(%s::float8[])", (float8_array([1.5, float("nan")]),))
    # [(1.5,), (None,)]   NaN travels as NULL, how points store it

Elements are Python floats (``float8_array``) or ints (``int8_array``); None is NULL.
"""

from __future__ import annotations

import struct
from functools import lru_cache

#: Element type oids and the array types' own (pg_type).
_FLOAT8, _INT8 = 701, 20
_FLOAT8_ARRAY, _INT8_ARRAY = 1022, 1016
#: ndim, has-null flag, element oid, length of the one dimension, its lower bound.
_HEAD = struct.Struct("!iiIii")
_NULL = struct.pack("!i", -1)
_ELEMENT = {"d": struct.Struct("!id"), "q": struct.Struct("!iq")}


class Float8Array(bytes):
    """A float8[] in PostgreSQL's binary array format."""


class Int8Array(bytes):
    """A bigint[] in PostgreSQL's binary array format."""


@lru_cache(maxsize=64)
def _body(code: str, n: int) -> struct.Struct:
    return struct.Struct("!" + ("i" + code) * n)


def _pack(items: list, code: str, oid: int, nan_is_null: bool) -> bytes:
    n = len(items)
    if not (nan_is_null and code == "d") or _no_nan(items):
        flat = [8] * (2 * n)
        flat[1::2] = items
        try:
            return _HEAD.pack(1, 0, oid, n, 1) + _body(code, n).pack(*flat)
        except struct.error:  # a None among them (a rollup's missing extreme): the slow way
            if items.count(None) == n:  # all of them (a batch's first NaN steps, mostly): at once
                return _HEAD.pack(1, 1, oid, n, 1) + _NULL * n
    element = _ELEMENT[code]
    parts = [b""]
    has_null = 0
    for x in items:
        if x is None or (nan_is_null and x != x):
            parts.append(_NULL)
            has_null = 1
        else:
            parts.append(element.pack(8, x))
    parts[0] = _HEAD.pack(1, has_null, oid, n, 1)
    return b"".join(parts)


def _no_nan(values: list) -> bool:
    """True when no value is NaN (or None), by one sum in C. A false "has NaN" (inf - inf
    sums to NaN) only sends the batch the slow, exact way."""
    try:
        total = sum(values)
    except TypeError:
        return False
    return total == total


def float8_array(values: list, nan_is_null: bool = False) -> Float8Array:
    """``values`` as a float8[]; None (and NaN, with ``nan_is_null``) as NULL."""
    return Float8Array(_pack(values, "d", _FLOAT8, nan_is_null))


def int8_array(values: list) -> Int8Array:
    """``values`` (ints, or None for NULL) as a bigint[]."""
    return Int8Array(_pack(values, "q", _INT8, False))


def int8_runs(runs: list[tuple[int, int]]) -> Int8Array:
    """A bigint[] of each (value, count) of ``runs``: the value ``count`` times, in order
    (a batch's series id for each of its points). An element's bytes are packed once and
    repeated: ~4 us for 1,000 elements of 20 series, against ~27 for ``int8_array``'s."""
    n = sum(count for _, count in runs)
    return Int8Array(_HEAD.pack(1, 0, _INT8, n, 1) + b"".join([_ELEMENT["q"].pack(8, v) * count for v, count in runs]))


def _register() -> None:
    """psycopg sends these two types as they are, in binary, with their array oid."""
    try:
        import psycopg
        from psycopg.adapt import Dumper
        from psycopg.pq import Format
    except ImportError:  # SQLite-only install: nothing sends them
        return

    class _Float8ArrayDumper(Dumper):
        format = Format.BINARY
        oid = _FLOAT8_ARRAY

        def dump(self, obj):
            return obj

    class _Int8ArrayDumper(_Float8ArrayDumper):
        oid = _INT8_ARRAY

    # The global map: every connection made after this import gets them (the app imports the
    # store before it makes its engine).
    psycopg.adapters.register_dumper(Float8Array, _Float8ArrayDumper)
    psycopg.adapters.register_dumper(Int8Array, _Int8ArrayDumper)


_register()
