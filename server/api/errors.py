"""The reply to a request that fails validation: FastAPI's 422, made safe to render.

FastAPI's own handler echoes each bad input back. Python's JSON reader accepts inputs that
cannot be written out again: NaN and 1e999 (infinity), which strict JSON has no word for,
and lone surrogates (a ``"\\udc00"`` escape), which are not UTF-8. Echoing those made the
reply itself fail, and the client got a 500 for its own mistake.
"""

from __future__ import annotations

import json
import logging

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from ..store.db import is_unavailable

log = logging.getLogger("stethoscope.server")

#: Seconds a client is asked to wait when the database is unavailable. The pool reconnects
#: on the next request once it is back; a PostgreSQL restart or failover takes seconds, and
#: the hook's backoff waits at least this long before it resends.
DATABASE_RETRY_AFTER_S = 5
#: What clients are told; the cause (host, port, driver message) goes to the log only.
DATABASE_UNAVAILABLE = "database unavailable; try again shortly"


async def validation_error(_: Request, exc: RequestValidationError) -> Response:
    errors = jsonable_encoder(exc.errors())
    try:
        body = json.dumps({"detail": errors}, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except ValueError:  # an echoed input is NaN, infinite or a lone surrogate: show its repr
        for e in errors:
            if "input" in e:
                e["input"] = repr(e["input"])
        body = json.dumps({"detail": errors}, default=repr, ensure_ascii=True).encode()
    return Response(body, status_code=422, media_type="application/json")


class DatabaseUnavailableMiddleware:
    """Pure ASGI middleware: a request that fails because the database cannot be reached or
    used (``db.is_unavailable``) gets a 503 with ``Retry-After`` instead of a bare 500, from
    the routes and from the gate's token look-ups alike. Other errors pass on unchanged."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_and_note(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception as exc:
            if started or not is_unavailable(exc):
                raise
            log.warning(
                "database unavailable (%s %s answered 503): %s",
                scope.get("method"),
                scope.get("path"),
                _first_line(exc),
            )
            await Response(
                json.dumps({"detail": DATABASE_UNAVAILABLE}),
                status_code=503,
                media_type="application/json",
                headers={"Retry-After": str(DATABASE_RETRY_AFTER_S), "Cache-Control": "no-store"},
            )(scope, receive, send)


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]
