"""Dependencies injected into routes, as ``Annotated`` aliases."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute

from ..parsing import BadJSON, strict_json
from ..settings import Settings
from ..store import Store


# ``async``: FastAPI runs a plain ``def`` dependency in its thread pool, two thread hops per
# request for two attribute reads (on the ingest path, ~0.1 ms of server CPU a batch).
async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


class StrictJSONRequest(Request):
    """A request whose JSON body is read by ``parsing.strict_json``, the gate's reader."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = strict_json(await self.body())
            except BadJSON as e:  # FastAPI answers this one with its 422 "json_invalid"
                raise json.JSONDecodeError(e.message, "", e.pos) from None
        return self._json


class StrictJSONRoute(APIRoute):
    """Every API router's route class: ``APIRouter(route_class=StrictJSONRoute)``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.methods & {"POST", "PUT", "PATCH", "DELETE"}:  # the gate's answer, in the schema
            self.responses.setdefault(
                415, {"description": "not sent as application/json (required while authentication is off)"}
            )

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict
