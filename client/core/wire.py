"""The wire format shared by the hook and the server (standard library only).

A batch of points for one run is a JSON object::

    {"series": [{"name": "loss", "steps": [0, 1, 2], "values": [2.3, "NaN", 2.1],
                 "walls": [1700000000.0, 1700000000.1, 1700000000.2]}]}

Columns, not one object per point: a point costs a few bytes of JSON and the server
validates a column with one pass instead of building an object per point.

Plain JSON has no NaN or infinity. Like the protobuf JSON mapping, a non-finite value
travels as one of the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``; every finite
value is a JSON number. ``encode_value``/``decode_value`` are the two halves, and
``encode_values``/``decode_values`` the same for a column (the server's ingest parser decodes
with ``decode_values``: there is one decoding).
"""

from __future__ import annotations

import math

NAN = "NaN"
POS_INF = "Infinity"
NEG_INF = "-Infinity"
_DECODE = {NAN: math.nan, POS_INF: math.inf, NEG_INF: -math.inf}
_HINT = "non-finite values are 'NaN', 'Infinity', '-Infinity'"

#: Largest batch the server takes in one request (points, summed over series).
MAX_POINTS_PER_BATCH = 50_000
#: Longest series, run, project or event-kind name.
MAX_NAME_LENGTH = 200
#: Steps are signed 64-bit integers on every database.
MAX_STEP = 2**63 - 1

RUN_STATUSES = ("running", "finished", "failed", "diverged")


def encode_value(x: float) -> float | str:
    """A float as it travels: itself when finite, else one of the three strings."""
    if x != x:
        return NAN
    if x == math.inf:
        return POS_INF
    if x == -math.inf:
        return NEG_INF
    return x


def decode_value(v: object) -> float:
    """The float a wire value stands for; ``ValueError`` for anything else."""
    if type(v) is float:
        return v
    if type(v) is int:
        return float(v)
    if type(v) is str:
        try:
            return _DECODE[v]
        except KeyError:
            raise ValueError(f"not a number: {v!r} ({_HINT})") from None
    raise ValueError(f"not a number: {v!r}")


def encode_values(xs) -> list:
    """Encode a sequence of floats; finite ones pass through untouched."""
    out = list(xs)
    for i, x in enumerate(out):
        if not (x - x == 0.0):  # NaN or +-inf: inf - inf is NaN
            out[i] = encode_value(x)
    return out


def decode_values(raw: list) -> list[float]:
    """Decode a column of wire values: ``raw`` itself when every value is already a float (the
    common case, checked in C), else a copy with each value through ``decode_value``.

    ``ValueError`` for the first value that is not a number, with its index: ``[3]: 'nan' is
    not a number (...)``.
    """
    if set(map(type, raw)) == {float}:
        return raw
    out = list(raw)
    for i, v in enumerate(out):
        if type(v) is not float:
            try:
                out[i] = decode_value(v)
            except ValueError:
                raise ValueError(f"[{i}]: {v!r} is not a number ({_HINT})") from None
    return out
