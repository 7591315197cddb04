"""The app factory and the one composition root: settings in; the store, alerting, the gate, the
API routes and the dashboard wired together; a FastAPI app out. Nothing heavy happens at import."""

from __future__ import annotations

import asyncio
import gc
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from contextvars import copy_context

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from . import __version__
from .alerting import Alerting
from .api import alerts as alerts_api
from .api import continual as continual_api
from .api import docs as docs_api
from .api import errors as errors_api
from .api import ops as ops_api
from .api import points as points_api
from .api import runs as runs_api
from .api import tokens as tokens_api
from .api import webhooks as webhooks_api
from .api.ingest_parse import BadBatch
from .auth import gate as security
from .ops.background import Periodic
from .ops.observability import IngestMetricsMiddleware
from .settings import Settings
from .store import Conflict, LimitExceeded, NotFound, migrate
from .store.db import CHECKPOINT_INTERVAL_S, checkpoint_wal, is_sqlite, make_engine

log = logging.getLogger("stethoscope.server")

API_PREFIX = "/api/v1"


#: Threads that run ingest transactions (as many as anyio's default limiter lets every other
#: blocking call have).
INGEST_THREADS = 40


def _runner(executor: ThreadPoolExecutor):
    """``await run(fn, *args)``: ``fn(*args)`` in one of ``executor``'s threads, in a copy of
    the caller's context (as anyio's ``to_thread`` runs it)."""

    async def run(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(executor, copy_context().run, fn, *args)

    return run


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service. ``uvicorn --factory stethoscope_server.app:create_app`` serves it."""
    settings = settings or Settings()
    settings.check_exposure()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.migrate_on_start:
            await run_in_threadpool(migrate.upgrade, settings.database_url)
        app.state.engine = make_engine(settings)
        # Ingest's thread hop, on a pool of its own: ``loop.run_in_executor`` is one trip through
        # the event loop; anyio's ``to_thread`` (``run_in_threadpool``) adds a checkpoint and
        # its limiter's, ~0.03 ms of the server's CPU on every batch.
        ingest_threads = ThreadPoolExecutor(INGEST_THREADS, thread_name_prefix="stethoscope-ingest")
        app.state.run_in_thread = _runner(ingest_threads)
        # Detectors run inside each ingest transaction; webhooks and the stalled-run check in
        # background threads of this worker.
        alerting = app.state.alerting = Alerting(settings)
        app.state.store = alerting.make_store(app.state.engine)
        app.state.detector_runner, app.state.outbox = alerting.runner, alerting.outbox
        await run_in_threadpool(security.on_start, app.state.store, settings)  # admin token, limits
        alerting.start()
        checkpoints = app.state.checkpoints = None
        if is_sqlite(app.state.engine):
            engine = app.state.engine

            def checkpoint() -> bool:
                checkpoint_wal(engine)
                return False

            checkpoints = app.state.checkpoints = Periodic("sqlite-checkpoint", CHECKPOINT_INTERVAL_S, checkpoint)
            checkpoints.start()
        # Everything built so far (modules, routes, schemas, the engine) lives as long as the
        # worker: out of the collector's sight, a full collection scans only what requests
        # leave behind. Unfrozen, one took ~100 ms under load and stalled every request.
        gc.collect()
        gc.freeze()
        log.info(
            "stethoscope server ready on %s (database %s)",
            settings.base_url,
            app.state.engine.url.render_as_string(hide_password=True),
        )
        try:
            yield
        finally:
            if checkpoints is not None:
                checkpoints.stop()
            gc.unfreeze()
            alerting.stop()
            ingest_threads.shutdown(wait=True)  # batches in flight commit before the engine goes
            app.state.engine.dispose()

    app = FastAPI(
        title="Stethoscope",
        version=__version__,
        description="Training-health monitoring: runs, metric series, events and alerts.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's own pages load their scripts from a CDN: see api/docs.py
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.run_in_thread = run_in_threadpool
    app.include_router(runs_api.router, prefix=API_PREFIX)
    app.include_router(points_api.router, prefix=API_PREFIX)
    app.include_router(alerts_api.router, prefix=API_PREFIX)
    app.include_router(webhooks_api.router, prefix=API_PREFIX)
    app.include_router(continual_api.router, prefix=API_PREFIX)
    app.include_router(tokens_api.router, prefix=API_PREFIX)
    app.include_router(ops_api.router)  # /readyz, /metrics
    # The hottest route, matched first and without FastAPI's routing (see IngestRoute).
    app.router.routes.insert(0, points_api.IngestRoute(API_PREFIX))
    docs_api.mount_docs(app)  # /docs and /redoc, with their files served from here
    # Tokens, scopes, rate and size limits; inside the metrics middleware, which counts its refusals.
    app.add_middleware(security.SecurityMiddleware, settings=settings)
    # A database outage: 503 with Retry-After, for the routes and the gate's look-ups.
    app.add_middleware(errors_api.DatabaseUnavailableMiddleware)
    app.add_middleware(IngestMetricsMiddleware, prefix=API_PREFIX)

    app.add_exception_handler(RequestValidationError, errors_api.validation_error)

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, exc: Conflict):
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(LimitExceeded)
    async def _limit(_: Request, exc: LimitExceeded):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(BadBatch)
    async def _bad_batch(_: Request, exc: BadBatch):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.get("/healthz", include_in_schema=False)
    def healthz():
        return {"status": "ok"}

    # The one place the server meets the dashboard: it reads app.state.store and settings (above)
    # through their public names; nothing else in stethoscope_server imports it.
    from stethoscope_dashboard import mount as mount_dashboard

    mount_dashboard(app)  # pages at /, chart JSON at /ui/api, static files at /static
    return app
