"""Routes: ingest of point batches, series listing and downsampled reads, events."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from starlette._utils import get_route_path
from starlette.routing import BaseRoute, Match, compile_path

from stethoscope.core.wire import encode_values

from ..auth.gate import body_read
from ..ops.observability import METRICS, note_batch_points
from .deps import StoreDep, StrictJSONRoute
from .ingest_parse import decode_body, parse_batch
from .runs import RUN_ID_MAX_LENGTH, RunId
from .schemas import NO_NUL, EventBatch, EventOut, EventsReply, IngestBatch, IngestReply, SeriesData, SeriesInfo

router = APIRouter(tags=["points"], route_class=StrictJSONRoute)

_NO_RUN = {404: {"description": "no such run"}}


def _inline_schema(model) -> dict:
    """The model's JSON schema with its ``$defs`` inlined: it is placed inside the OpenAPI
    document, where a ``#/$defs/...`` reference would point at the document's root."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref is not None and ref.startswith("#/$defs/"):
                return inline(defs[ref.rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


_INGEST_BODY = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": _inline_schema(IngestBatch)}}}
}


@router.post(
    "/runs/{run_id}/points",
    response_model=IngestReply,
    openapi_extra=_INGEST_BODY,
    responses={
        404: {"description": "no such run"},
        413: {"description": "too many points or bytes"},
        422: {"description": "malformed batch"},
    },
)
async def ingest(run_id: RunId, request: Request):
    """Store a batch of points of one run. A 2xx reply means they are committed; resending stores nothing twice."""
    return await _ingest(run_id, request)


async def _ingest(run_id: str, request: Request) -> Response:
    """The ingest route's work, whichever way the request came in (``IngestRoute`` or FastAPI's route)."""
    # The store and settings straight from the app: as dependencies, FastAPI would solve two
    # more sub-dependencies on every batch (~30 us of the hottest route's time).
    state = request.app.state
    store, settings = state.store, state.settings
    # The gate has read the body already, within STETHOSCOPE_MAX_BODY_BYTES (its one check of
    # the size on the wire); decoding holds the decompressed body to the same limit.
    raw = body_read(request.scope)  # the gate's bytes, not a second trip through ``receive``
    if raw is None:
        raw = await request.body()
    body = decode_body(raw, request.headers.get("content-encoding"), settings.max_body_bytes)
    batches = parse_batch(body, settings.max_points_per_batch)
    note_batch_points(request.scope, sum(len(b.steps) for b in batches))
    result = await state.run_in_thread(store.ingest, run_id, batches)
    METRICS.points_inserted.inc(result.inserted)
    return Response(
        orjson.dumps({"points": result.points, "inserted": result.inserted, "alerts": result.alerts}, default=str),
        media_type="application/json",
    )


class IngestRoute(BaseRoute):
    """``POST {prefix}/runs/{run_id}/points`` with a valid run id, matched ahead of every other
    route (``app.router.routes.insert(0, IngestRoute(prefix))``) and handed to ``_ingest``.

    FastAPI's own route for it stays (the API document shows it, and it answers whatever this
    one does not match: another method, a run id ``RunId`` refuses, with its own 405 or 422),
    but its routing and dependency solving cost ~0.1 ms a batch: the included routers are
    matched twice over, and the path parameter goes through pydantic. Here: the template's
    regex and ``RunId``'s checks (1 to 200 characters, no NUL). Errors are raised as from the
    FastAPI route, to the same exception handlers and middlewares."""

    methods = frozenset({"POST"})

    def __init__(self, prefix: str) -> None:
        self.path = self.path_format = f"{prefix}/runs/{{run_id}}/points"
        # Starlette's own compiler, as FastAPI's route and the gate's rule (auth.access) use on
        # the same template: the run id read here is the one the gate authorized.
        self._regex = compile_path(self.path)[0]

    def matches(self, scope) -> tuple[Match, dict]:
        if scope["type"] == "http" and scope["method"] == "POST":
            found = self._regex.match(get_route_path(scope))
            if found is not None:
                run_id = found["run_id"]
                if len(run_id) <= RUN_ID_MAX_LENGTH and "\x00" not in run_id:
                    return Match.FULL, {"path_params": {**scope.get("path_params", {}), "run_id": run_id}}
        return Match.NONE, {}

    async def handle(self, scope, receive, send) -> None:
        response = await _ingest(scope["path_params"]["run_id"], Request(scope, receive))
        await response(scope, receive, send)


@router.get("/runs/{run_id}/series", response_model=list[SeriesInfo], responses=_NO_RUN)
def list_series(run_id: RunId, store: StoreDep):
    out = store.list_series(run_id)
    for s in out:
        if s["last_value"] is not None:
            s["last_value"] = encode_values([s["last_value"]])[0]
    return out


@router.get("/runs/{run_id}/series/{name:path}", response_model=SeriesData, responses=_NO_RUN)
def read_series(
    run_id: RunId,
    name: Annotated[str, Path(pattern=NO_NUL, description="series name")],
    store: StoreDep,
    start: Annotated[int | None, Query(ge=-(2**63), le=2**63 - 1, description="first step, inclusive")] = None,
    end: Annotated[int | None, Query(ge=-(2**63), le=2**63 - 1, description="last step, inclusive")] = None,
    max_points: Annotated[
        int,
        Query(ge=3, le=1_000_000, description="at most this many points; each bucket keeps its min, max and first NaN"),
    ] = 2000,
):
    r = store.read_series(run_id, name, start, end, max_points)
    # orjson straight to bytes: a 2,000-point reply would spend longer in pydantic than in the database.
    return Response(
        orjson.dumps({"name": name, "steps": r.steps, "values": encode_values(r.values), "downsampled": r.downsampled}),
        media_type="application/json",
    )


@router.post("/runs/{run_id}/events", response_model=EventsReply, responses=_NO_RUN)
def add_events(run_id: RunId, body: EventBatch, store: StoreDep):
    """Task switches, restarts, checkpoints, notes, on the step axis. Resending an event (same key) stores it once."""
    events = [e.model_dump() for e in body.events]
    return {"received": len(events), "inserted": store.add_events(run_id, events)}


@router.get("/runs/{run_id}/events", response_model=list[EventOut], responses=_NO_RUN)
def list_events(
    run_id: RunId, store: StoreDep, kind: Annotated[str | None, Query(max_length=200, pattern=NO_NUL)] = None
):
    return store.list_events(run_id, kind)
