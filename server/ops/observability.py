"""The server's own health in numbers: counters and histograms, and their Prometheus text.

Hand-written rather than ``prometheus_client``: a handful of metrics, one process-wide set,
no dependency. Increments are a lock and an add (about 0.1 us); the ingest hot path does
three of them per request, next to milliseconds of parsing and SQL.

    from stethoscope_server.ops.observability import METRICS
    METRICS.points_inserted.inc(123)
    with METRICS.detector_seconds.time():
        ...
    text = render(METRICS.families())     # GET /metrics adds the gauges read from the database

Each uvicorn worker process has its own values (they live in its memory), like
``prometheus_client`` without its multiprocess mode: with ``--workers N`` a scrape of the
shared port reaches one worker at random, so scrape each worker (or run one worker per
port) and sum in the query (``sum by (status) (rate(stethoscope_ingest_requests_total[5m]))``).
Values that live in the database (the outbox depth) are the same whichever worker answers.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from contextlib import contextmanager
from typing import Iterable, Iterator

from starlette.requests import ClientDisconnect

#: Content type of the Prometheus text exposition format, version 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: The label of a request whose client went away before the reply (nginx logs it as 499):
#: not an error of the server, so counted apart from 5xx.
CLIENT_CLOSED = "client_closed"
#: Reply status classes the ingest counters are split by.
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", CLIENT_CLOSED)

#: Seconds. Prometheus' default buckets: an ingest reply of a 1,000-point batch takes a few ms
#: on an idle server; the load target is p99 under 0.25 s, so 0.1/0.25/0.5 bracket it.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Seconds in the detectors per ingest batch: tens of us for a few points, ms for thousands.
DETECTOR_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

#: Webhook delivery attempts, by what the attempt led to.
WEBHOOK_OUTCOMES = ("delivered", "retrying", "failed")


class Counter:
    """A monotonically increasing count, optionally split by one label.

    >>> c = Counter("jobs_total", "Jobs done.", label="status", values=("ok", "error"))
    >>> c.inc(2, "ok"); c.get("ok")
    2
    """

    kind = "counter"

    def __init__(self, name: str, help: str, label: str | None = None, values: Iterable[str] = ("",)) -> None:
        self.name, self.help, self.label = name, help, label
        self._values: dict[str, float] = {v: 0 for v in values}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1, value: str = "") -> None:
        # ``+=`` on a dict item is a read and a write: two threads could interleave and lose
        # one increment. The lock is uncontended almost always, and cheap then.
        with self._lock:
            self._values[value] = self._values.get(value, 0) + amount

    def get(self, value: str = "") -> float:
        return self._values.get(value, 0)

    def samples(self) -> Iterator[tuple[str, dict, float]]:
        with self._lock:
            items = list(self._values.items())
        for v, n in items:
            yield self.name, ({self.label: v} if self.label else {}), n


class Histogram:
    """Observations counted in cumulative buckets, with their sum and count.

    >>> h = Histogram("work_seconds", "Time spent working.", buckets=(0.1, 1.0))
    >>> h.observe(0.3)
    >>> with h.time():
    ...     pass
    """

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float]) -> None:
        self.name, self.help = name, help
        self.bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect_left(self.bounds, value)  # first bound >= value: "le" is inclusive
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    @contextmanager
    def time(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.observe(time.perf_counter() - t0)

    @property
    def count(self) -> int:
        return sum(self._counts)

    def samples(self) -> Iterator[tuple[str, dict, float]]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        running = 0
        for bound, n in zip((*self.bounds, math.inf), counts):
            running += n
            yield self.name + "_bucket", {"le": _number(bound)}, running
        yield self.name + "_sum", {}, total
        yield self.name + "_count", {}, running


class Gauge:
    """A value read at scrape time (``render`` builds these from the store and the app)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, value: float, kind: str = "gauge", labels: dict | None = None) -> None:
        self.name, self.help, self.value, self.kind, self.labels = name, help, value, kind, labels or {}

    def samples(self) -> Iterator[tuple[str, dict, float]]:
        yield self.name, self.labels, self.value


class ServerMetrics:
    """Everything one server process counts about itself; one instance, ``METRICS``."""

    def __init__(self) -> None:
        self.ingest_requests = Counter(
            "stethoscope_ingest_requests_total",
            "Ingest requests (POST /api/v1/runs/{id}/points), by reply status class.",
            "status",
            STATUS_CLASSES,
        )
        self.ingest_points = Counter(
            "stethoscope_ingest_points_total",
            "Points in ingest batches that parsed, by reply status class (a batch refused before parsing counts none).",
            "status",
            STATUS_CLASSES,
        )
        self.ingest_seconds = Histogram(
            "stethoscope_ingest_request_duration_seconds",
            "Ingest request time in the server, body read to reply.",
            LATENCY_BUCKETS,
        )
        self.points_inserted = Counter(
            "stethoscope_points_inserted_total", "Points newly stored (a resent point is not counted again)."
        )
        self.detector_seconds = Histogram(
            "stethoscope_detector_duration_seconds",
            "Time in the detector runner per ingest batch that fed a detector.",
            DETECTOR_BUCKETS,
        )
        self.webhook_deliveries = Counter(
            "stethoscope_webhook_deliveries_total",
            "Webhook delivery attempts by result: delivered, retrying (failed, will be retried), "
            "failed (failed, given up).",
            "outcome",
            WEBHOOK_OUTCOMES,
        )

    def families(self) -> list:
        return [
            self.ingest_requests,
            self.ingest_points,
            self.ingest_seconds,
            self.points_inserted,
            self.detector_seconds,
            self.webhook_deliveries,
        ]


#: The process-wide metrics (each worker process has its own, see the module docstring).
METRICS = ServerMetrics()


def status_class(code: int) -> str:
    return f"{code // 100}xx" if 100 <= code < 600 else "5xx"


# -- the ingest route's numbers, measured around it -----------------------------------------
#: Key in the ASGI scope where the ingest route leaves the number of points it parsed.
POINTS_KEY = "stethoscope.ingest_points"


def note_batch_points(scope: dict, points: int) -> None:
    """Called by the ingest route once the batch parsed: the middleware counts these points
    under the reply's status class when the reply has gone."""
    scope[POINTS_KEY] = points


class IngestMetricsMiddleware:
    """Pure ASGI middleware: counts ingest requests and points by reply status class and times
    them. It sees the final status of every outcome (handled errors such as 404 or 413, and
    unhandled ones, which become a 500 outside it); a client that went away before its reply
    counts as ``client_closed``, not as an error. Other paths pass straight through."""

    def __init__(self, app, prefix: str, metrics: ServerMetrics = METRICS) -> None:
        self.app = app
        self.runs_prefix = prefix.rstrip("/") + "/runs/"
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or not path.endswith("/points")
            or not path.startswith(self.runs_prefix)
        ):
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500
        started = closed = False

        async def send_and_note(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        async def receive_and_note():
            nonlocal closed
            message = await receive()
            if message["type"] == "http.disconnect" and not started:
                closed = True  # gone before its reply: whatever the app makes of it now
            return message

        try:
            await self.app(scope, receive_and_note, send_and_note)
        except ClientDisconnect:
            closed = True  # the body stopped halfway; nobody is left to answer, nothing to log
        except BaseException:
            status = 500
            raise
        finally:
            m = self.metrics
            cls = CLIENT_CLOSED if closed else status_class(status)
            m.ingest_seconds.observe(time.perf_counter() - t0)
            m.ingest_requests.inc(1, cls)
            points = scope.get(POINTS_KEY)
            if points:
                m.ingest_points.inc(points, cls)


# -- the exposition format -------------------------------------------------------------------
def _number(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if v == -math.inf:
        return "-Inf"
    if v != v:
        return "NaN"
    if float(v).is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(float(v))


def _escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def render(families: Iterable) -> str:
    """The Prometheus text exposition format (0.0.4) of ``families``."""
    lines: list[str] = []
    for f in families:
        lines.append(f"# HELP {f.name} {_escape_help(f.help)}")
        lines.append(f"# TYPE {f.name} {f.kind}")
        for name, labels, value in f.samples():
            if labels:
                inner = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items())
                lines.append(f"{name}{{{inner}}} {_number(value)}")
            else:
                lines.append(f"{name} {_number(value)}")
    return "\n".join(lines) + "\n"
