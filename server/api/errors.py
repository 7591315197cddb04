"""The reply to a request that fails validation: FastAPI's 422, made safe to render.

FastAPI's own handler echoes each bad input back. Python's JSON reader accepts inputs that
cannot be written out again: NaN and 1e999 (infinity), which strict JSON has no word for,
and lone surrogates (a ``"\\udc00"`` escape), which are not UTF-8. Echoing those made the
reply itself fail, and the client got a 500 for its own mistake.
"""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response


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
