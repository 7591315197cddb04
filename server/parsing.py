"""One reading of what a request says, shared by the gate (``security``) and the routes.

The gate decides who may act on a thing from the request's path and body; the route then acts
on the thing the same request names. If the two read the request differently, the gate checks
one thing and the route acts on another: an id spelled ``+1`` or ``1.0`` was once no id to the
gate (so no project was checked) and id 1 to the route, and a body with a byte order mark was
no JSON to the gate and a run in any project to the route. So there is one reading of each:

    parse_id("7", TOKEN_ID_MAX) == 7        # "+7", "07", "7.0", " 7", "７": ValueError
    strict_json(b'{"project": "P"}')        # a BOM, UTF-16 or NaN: BadJSON

Routes declare ids with ``id_path`` and get bodies through ``api.deps.StrictJSONRoute``; the
gate calls the same two functions.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any

import orjson
from fastapi import Path
from pydantic import BeforeValidator

#: The only spelling of an id: decimal ASCII digits, no sign, no leading zero. (``[0-9]`` and
#: not ``\d``, which also takes other scripts' digits such as the full-width ``７``.)
_CANONICAL_ID = re.compile(r"0|[1-9][0-9]*")
#: Ids of alerts (64-bit columns) and of webhooks and tokens (32-bit columns).
ALERT_ID_MAX = 2**63 - 1
WEBHOOK_ID_MAX = TOKEN_ID_MAX = 2**31 - 1
#: Longer strings of digits are not converted at all (they are out of every range anyway).
MAX_ID_DIGITS = 40


def parse_id(raw: object, maximum: int) -> int:
    """The id ``raw`` names, if it is written the one canonical way and lies in 1..maximum."""
    if isinstance(raw, int) and not isinstance(raw, bool):  # a caller in Python, not a request
        value = raw
    elif isinstance(raw, str) and len(raw) <= MAX_ID_DIGITS and _CANONICAL_ID.fullmatch(raw):
        value = int(raw)
    else:
        shown = raw if isinstance(raw, str) and len(raw) <= 40 else f"{str(raw)[:40]}..."
        raise ValueError(
            f"{shown!r} is not an id: write it in decimal digits only (no sign, spaces, "
            f"leading zeros, decimal point or exponent)"
        )
    if not 1 <= value <= maximum:
        raise ValueError(f"id {value} is out of range: ids run from 1 to {maximum}")
    return value


def id_path(maximum: int, description: str):
    """A path parameter that is an id: ``AlertId = id_path(ALERT_ID_MAX, "the alert's id")``."""
    return Annotated[
        int,
        Path(ge=1, le=maximum, description=description),
        BeforeValidator(functools.partial(parse_id, maximum=maximum)),
    ]


class BadJSON(ValueError):
    """A body that is not JSON in UTF-8; ``pos`` is where reading it failed."""

    def __init__(self, message: str, pos: int = 0) -> None:
        super().__init__(message)
        self.message, self.pos = message, pos


def strict_json(body: bytes) -> Any:
    """The JSON document in ``body``: UTF-8 only (RFC 8259 section 8.1), without a byte order
    mark, no NaN or Infinity, no lone surrogates, numbers a double can hold. Python's
    ``json.loads`` takes UTF-16 and UTF-32 and skips a BOM; a reader that took what another
    refused would let the two disagree on the same request."""
    if body.startswith(b"\xef\xbb\xbf"):
        raise BadJSON("the body starts with a byte order mark: send JSON in UTF-8 without one")
    if body[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in body[:4]:
        raise BadJSON("the body is UTF-16 or UTF-32: send JSON in UTF-8")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadJSON(f"the body is not valid JSON in UTF-8: {e.msg}", e.pos) from None


def json_invalid(e: BadJSON) -> list[dict]:
    """The 422 detail FastAPI gives for a body it cannot read, so the gate's answer and the
    route's are the same."""
    return [
        {
            "type": "json_invalid",
            "loc": ["body", e.pos],
            "msg": "JSON decode error",
            "input": {},
            "ctx": {"error": e.message},
        }
    ]


def id_invalid(where: str, name: str, raw: str, e: ValueError) -> list[dict]:
    """The 422 detail of a path id the gate cannot read (the shape of FastAPI's own)."""
    return [
        {
            "type": "value_error",
            "loc": [where, name],
            "msg": f"Value error, {e}",
            "input": raw,
            "ctx": {"error": str(e)},
        }
    ]
