"""Routes: API tokens (admin scope). The plaintext is in the creation reply and nowhere else."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from ..auth.gate import visible_project
from ..parsing import TOKEN_ID_MAX, id_path
from .deps import StoreDep, StrictJSONRoute
from .schemas import Name, Strict

router = APIRouter(tags=["tokens"], route_class=StrictJSONRoute)

TokenId = id_path(TOKEN_ID_MAX, "the token's id")
Scope = Literal["ingest", "read", "admin"]


class TokenCreate(Strict):
    name: Name
    project: Name | None = Field(
        default=None, description="the token's project; none: every project (admin tokens only may make these)"
    )
    scopes: list[Scope] = Field(
        min_length=1,
        max_length=3,
        description="ingest: create runs and send points and events; read: GET; admin: everything",
    )


class TokenOut(BaseModel):
    id: int
    name: str
    project: str | None
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None


class TokenCreated(TokenOut):
    token: str = Field(description="the token itself: shown this once, stored only as a hash")


@router.post("/tokens", response_model=TokenCreated, status_code=201)
def create_token(body: TokenCreate, store: StoreDep):
    """Make a token (and its project, if new). The reply holds the token: the only time it is shown."""
    token, row = store.tokens.create(body.name, body.project, body.scopes)
    return {**row, "token": token}


@router.get("/tokens", response_model=list[TokenOut])
def list_tokens(store: StoreDep, request: Request, project: Name | None = None, include_revoked: bool = True):
    """Tokens (never the tokens themselves): all of them, or one project's."""
    project = visible_project(request, project)
    return store.tokens.list(project, include_revoked)


@router.delete("/tokens/{token_id}", status_code=204, responses={404: {"description": "no such token"}})
def revoke_token(token_id: TokenId, store: StoreDep, request: Request):
    """Revoke a token: it fails from now on (other workers: within ``token_cache_s``). Safe to repeat."""
    store.tokens.revoke(token_id)
    gate = getattr(request.state, "gate", None)
    if gate is not None:
        gate.forget(token_id)
    return Response(status_code=204)
