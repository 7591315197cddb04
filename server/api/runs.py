"""Routes: projects and runs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from ..auth.gate import visible_project, visible_projects
from .deps import StoreDep, StrictJSONRoute
from .schemas import NO_NUL, Name, ProjectOut, RunCreate, RunOut, RunStatus, RunUpdate

router = APIRouter(tags=["runs"], route_class=StrictJSONRoute)

#: The longest run id (``api.points.IngestRoute`` checks run ids as ``RunId`` does).
RUN_ID_MAX_LENGTH = 200
RunId = Annotated[
    str, Path(min_length=1, max_length=RUN_ID_MAX_LENGTH, pattern=NO_NUL, description="client-chosen run id")
]


@router.get("/projects", response_model=list[ProjectOut])
def list_projects(store: StoreDep, request: Request):
    return visible_projects(request, store.list_projects())


@router.put(
    "/runs/{run_id}",
    response_model=RunOut,
    responses={
        201: {"model": RunOut, "description": "created"},
        409: {"description": "the run belongs to another project"},
    },
)
def create_or_resume_run(run_id: RunId, body: RunCreate, store: StoreDep, response: Response):
    """Create the run with this id, or resume it (status back to ``running``). Safe to repeat."""
    run, created = store.upsert_run(run_id, body.project, body.name, body.config, body.tags)
    response.status_code = 201 if created else 200
    return run


@router.patch("/runs/{run_id}", response_model=RunOut, responses={404: {"description": "no such run"}})
def update_run(run_id: RunId, body: RunUpdate, store: StoreDep):
    return store.update_run(run_id, status=body.status, name=body.name, tags=body.tags)


@router.get("/runs/{run_id}", response_model=RunOut, responses={404: {"description": "no such run"}})
def get_run(run_id: RunId, store: StoreDep):
    return store.get_run(run_id)


@router.get("/runs", response_model=list[RunOut])
def list_runs(
    store: StoreDep,
    request: Request,
    project: Name | None = None,
    status: RunStatus | None = None,
    tag: Name | None = None,
    q: Annotated[
        str | None, Query(max_length=200, pattern=NO_NUL, description="substring of the run's name or id")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
):
    project = visible_project(request, project)  # a project's token sees its project only
    return store.list_runs(project=project, status=status, tag=tag, q=q, limit=limit, offset=offset)
