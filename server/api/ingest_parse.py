"""Validation of an ingest body, by hand: one pass per column, no object per point.

pydantic would build ~3 objects per point; a 1,000-point batch then costs more to validate
than to store. The schema in ``api.schemas.IngestBatch`` documents the same shape.
"""

from __future__ import annotations

import time
import zlib

from stethoscope.core.wire import MAX_NAME_LENGTH, MAX_STEP, decode_values

from ..parsing import BadJSON, strict_json
from ..store.points import SeriesBatch

_MIN_STEP = -MAX_STEP - 1
#: The fields of a series.
_FIELDS = frozenset({"name", "steps", "values", "walls"})


class BadBatch(ValueError):
    """A malformed batch; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def decode_body(body: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    enc = (content_encoding or "identity").strip().lower()
    if enc in ("", "identity"):
        return body
    if enc not in ("gzip", "deflate"):
        raise BadBatch(f"unsupported Content-Encoding {content_encoding!r}: send gzip, deflate or none", 415)
    d = zlib.decompressobj(wbits=31 if enc == "gzip" else 15)
    try:
        out = d.decompress(body, max_bytes + 1)
    except zlib.error as e:
        raise BadBatch(f"body is not valid {enc}: {e}", 400) from None
    if len(out) > max_bytes or d.unconsumed_tail:
        raise BadBatch(f"decompressed body is larger than {max_bytes} bytes", 413)
    return out


def _values(raw: list, k: int) -> list[float]:
    try:
        return decode_values(raw)  # the wire format's one decoding of "NaN", "Infinity", "-Infinity"
    except ValueError as e:
        raise BadBatch(f"series[{k}].values{e}") from None


def parse_batch(body: bytes, max_points: int) -> list[SeriesBatch]:
    try:
        doc = strict_json(body)  # the gate's reader too
    except BadJSON as e:
        raise BadBatch(str(e)) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("series"), list):
        raise BadBatch('body must be a JSON object {"series": [{"name", "steps", "values", "walls"}, ...]}')
    extra = set(doc) - {"series"}
    if extra:
        raise BadBatch(f"unknown field(s) {sorted(extra)}: the body has only 'series'")
    now = time.time()
    out: list[SeriesBatch] = []
    seen: set[str] = set()
    total = 0
    for k, item in enumerate(doc["series"]):
        if not isinstance(item, dict):
            raise BadBatch(f"series[{k}] must be an object with name, steps, values and walls")
        if not item.keys() <= _FIELDS:
            raise BadBatch(f"series[{k}]: unknown field(s) {sorted(set(item) - _FIELDS)}")
        name, steps, values, walls = item.get("name"), item.get("steps"), item.get("values"), item.get("walls")
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
            raise BadBatch(f"series[{k}].name must be a non-empty string of at most {MAX_NAME_LENGTH} characters")
        if "\x00" in name:  # PostgreSQL text cannot hold NUL: refused on both databases alike
            raise BadBatch(f"series[{k}].name must not contain NUL characters")
        if name in seen:
            raise BadBatch(f"series[{k}]: series {name!r} appears twice in one batch; merge its points")
        seen.add(name)
        if not isinstance(steps, list) or not isinstance(values, list):
            raise BadBatch(f"series[{k}]: steps and values must be lists")
        n = len(steps)
        if len(values) != n:
            raise BadBatch(f"series[{k}]: {n} steps but {len(values)} values")
        total += n
        if total > max_points:
            raise BadBatch(f"batch has more than {max_points} points: split it", 413)
        if n == 0:
            continue
        if set(map(type, steps)) != {int}:
            i, s = next((i, s) for i, s in enumerate(steps) if type(s) is not int)
            raise BadBatch(f"series[{k}].steps[{i}]: {s!r} is not an integer")
        first, last = steps[0], steps[-1]
        # Evenly spaced ascending steps (what a training job sends: every step, or every
        # k-th) are told by one comparison in C; they are unique and their ends are their
        # extremes. Any other order is checked in full.
        stride = steps[1] - first if n > 1 else 1
        regular = stride > 0 and last - first == stride * (n - 1) and steps == list(range(first, last + 1, stride))
        if not regular:
            first, last = min(steps), max(steps)
        if first < _MIN_STEP or last > MAX_STEP:
            raise BadBatch(f"series[{k}]: steps must fit in a signed 64-bit integer")
        vals = _values(values, k)
        if walls is None:
            walls = [now] * n
        else:
            if not isinstance(walls, list) or len(walls) != n:
                raise BadBatch(f"series[{k}]: walls must be a list of {n} numbers (or absent)")
            types = set(map(type, walls))
            if types != {float}:
                if not types <= {float, int}:
                    i, w = next((i, w) for i, w in enumerate(walls) if type(w) not in (float, int))
                    raise BadBatch(f"series[{k}].walls[{i}]: {w!r} is not a number")
                walls = [float(w) for w in walls]
            total_wall = sum(walls)
            if total_wall - total_wall != 0.0:  # some wall is inf or NaN (orjson reads 1e999 as inf)
                i, w = next((i, w) for i, w in enumerate(walls) if w - w != 0.0)
                raise BadBatch(f"series[{k}].walls[{i}]: {w!r} is not a finite number of seconds")
        if not regular and len(set(steps)) != n:  # one value per step: the first one sent wins, as in the store
            firsts: dict[int, int] = {}
            for i, s in enumerate(steps):
                firsts.setdefault(s, i)
            keep = sorted(firsts.values())
            steps, vals, walls = [steps[i] for i in keep], [vals[i] for i in keep], [walls[i] for i in keep]
        out.append(SeriesBatch(name, steps, vals, walls))
    return out
