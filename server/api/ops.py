"""Operations endpoints: readiness (``/readyz``) and the server's own metrics (``/metrics``).

``/healthz`` (in the app factory) says the process answers; ``/readyz`` says it can serve:
the database answers and its schema is at the migrations' head. A load balancer or
Kubernetes sends traffic on ``/readyz`` and restarts on ``/healthz``.
"""

from __future__ import annotations

import functools
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..ops.observability import CONTENT_TYPE, METRICS, Gauge, render
from ..store import migrate
from .errors import DATABASE_RETRY_AFTER_S

log = logging.getLogger("stethoscope.server")

router = APIRouter(include_in_schema=False)


@functools.cache
def _head() -> str | None:
    # Read from the migration scripts once: they do not change under a running process.
    return migrate.head()


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


@router.get("/readyz")
def readyz(request: Request):
    """200 when the database answers and is migrated to head; 503 with the reason otherwise
    ("database unavailable", or the schema's revision against the migrations' head)."""
    store = getattr(request.app.state, "store", None)
    if store is None:
        return JSONResponse({"status": "unavailable", "reason": "starting"}, status_code=503)
    head = _head()
    try:
        current = store.schema_revision()
    except Exception as exc:  # noqa: BLE001 - any failure to ask the database is "not ready"
        # /readyz is public: the driver's message (host, port, user, file path) goes to the log.
        log.warning("readyz: database unavailable: %s", _reason(exc))
        return JSONResponse(
            {"status": "unavailable", "reason": "database unavailable"},
            status_code=503,
            headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
        )
    if current != head:
        return JSONResponse(
            {
                "status": "unavailable",
                "reason": f"database schema at {current or 'base (empty)'}, migrations' head is {head}: "
                f"run `stethoscope db upgrade`",
                "revision": current,
                "head": head,
            },
            status_code=503,
        )
    return {"status": "ready", "revision": current}


@router.get("/metrics")
def metrics(request: Request):
    """Prometheus text exposition (0.0.4) of this worker process's counters, plus what is read
    at scrape time: the webhook outbox depth (one indexed count) and internal error counts."""
    state = request.app.state
    extra = []
    store = getattr(state, "store", None)
    if store is not None:
        try:
            pending = store.webhooks.pending_count()
            extra.append(
                Gauge(
                    "stethoscope_webhook_outbox_pending",
                    "Webhook deliveries waiting to be sent (all workers).",
                    pending,
                )
            )
        except Exception as exc:  # noqa: BLE001 - the sample is left out; /readyz says why
            log.debug("metrics: outbox depth not readable: %s", _reason(exc))
    alerting = getattr(state, "alerting", None)
    if alerting is not None:
        extra.append(
            Gauge(
                "stethoscope_detector_errors_total",
                "Detector runner internal failures (the batch's points were stored without detection).",
                alerting.runner.errors,
                kind="counter",
            )
        )
        jobs = (
            ("webhook-outbox", alerting.outbox),
            ("stalled-run-check", alerting.stall_check),
            ("sqlite-checkpoint", getattr(state, "checkpoints", None)),
        )
        for job, worker in jobs:
            if worker is not None:
                extra.append(
                    Gauge(
                        "stethoscope_background_errors_total",
                        "Failures of a background job (logged; it goes on).",
                        worker.errors,
                        kind="counter",
                        labels={"job": job},
                    )
                )
    return Response(render(_merge([*METRICS.families(), *extra])), media_type=CONTENT_TYPE)


def _merge(families: list) -> list:
    """One HELP/TYPE block per name: samples of families with the same name go together."""
    out: dict[str, _Family] = {}
    for f in families:
        out.setdefault(f.name, _Family(f)).parts.append(f)
    return list(out.values())


class _Family:
    def __init__(self, first) -> None:
        self.name, self.help, self.kind = first.name, first.help, first.kind
        self.parts: list = []

    def samples(self):
        for p in self.parts:
            yield from p.samples()
