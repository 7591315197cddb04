"""HTTP to the Stethoscope server with the standard library: one keep-alive connection.

Modelled on sentry-python's ``HttpTransport``: the sender thread owns one connection,
bodies above ``GZIP_MIN_BYTES`` are gzip-compressed, and a failed connection is dropped and
made again on the next request. Errors are sorted into "try again later" (the network, 5xx,
429 with its Retry-After) and "the server will never take this" (other 4xx).
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import random
import ssl
import urllib.parse

from . import __version__

#: Below this many bytes compression costs more than it saves on a LAN.
GZIP_MIN_BYTES = 1024
#: Seconds to wait for a connection or a reply; a slow server only slows the sender thread.
REQUEST_TIMEOUT_S = 10.0
#: Retry backoff: doubles from the first delay up to the cap, with full jitter (AWS, 2015).
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0


class TryLater(Exception):
    """The request may succeed later (network down, 5xx, 429)."""

    def __init__(self, message: str, retry_after: float | None = None, reason: str | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        #: What went wrong, for people: the error class and its text, or the HTTP status.
        self.reason = reason or message


class Rejected(Exception):
    """The server refused the request for good (4xx other than 404/408/429)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


class NotFound(Exception):
    """404: the run does not exist (yet) on the server."""


class Backoff:
    """Exponential backoff with full jitter; ``reset`` after a success."""

    def __init__(self, first: float = BACKOFF_FIRST_S, cap: float = BACKOFF_MAX_S):
        self.first, self.cap, self.attempt = first, cap, 0

    def next_delay(self, retry_after: float | None = None) -> float:
        # The exponent stops growing past the cap: 2**attempt as a float overflows after ~1,000
        # failures (an outage of hours at the 30 s cap, or a job flushing every step).
        delay = random.uniform(0, min(self.cap, self.first * 2.0 ** min(self.attempt, 64)))
        self.attempt += 1
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.cap * 4))
        return delay

    def reset(self) -> None:
        self.attempt = 0


def check_server_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"server must be an http(s) URL like 'http://host:8765' or 'offline', not {url!r}")
    return url.rstrip("/")


class HttpTransport:
    """JSON requests to one server over a reused connection."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = REQUEST_TIMEOUT_S):
        self.base_url = check_server_url(base_url)
        parts = urllib.parse.urlsplit(self.base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self._aborted = False
        self._headers = {"User-Agent": f"stethoscope-python/{__version__}", "Accept": "application/json"}
        token = token if token is not None else os.environ.get("STETHOSCOPE_TOKEN")
        if token:
            self._headers["Authorization"] = f"Bearer {token}"

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout, context=ssl.create_default_context()
                )
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - closing a broken socket may fail in many ways
                pass
            self._conn = None

    def abort(self) -> None:
        """From another thread: wake a request blocked on a silent server (it fails at once)."""
        self._aborted = True
        conn = self._conn
        sock = getattr(conn, "sock", None) if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(2)  # socket.SHUT_RDWR
            except OSError:
                pass

    def request(self, method: str, path: str, payload=None, compress: bool = False):
        """Send ``payload`` as JSON; return the decoded reply, or raise one of the errors above.

        ``compress``: gzip a large body (the ingest endpoint accepts ``Content-Encoding: gzip``).
        """
        headers = dict(self._headers)
        body = None
        if payload is not None:
            body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
            headers["Content-Type"] = "application/json"
            if compress and len(body) >= GZIP_MIN_BYTES:
                body = gzip.compress(body, compresslevel=5)
                headers["Content-Encoding"] = "gzip"
        reused = self._conn is not None
        try:
            conn = self._connection()
            conn.request(method, self._prefix + path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            if reused and isinstance(exc, _STALE) and not self._aborted:
                # The server closed the kept-alive connection while it was idle: not an
                # outage. Once more on a new connection (every request here is idempotent).
                return self.request(method, path, payload, compress)
            raise TryLater(f"{method} {path}: {exc!r}", reason=f"{type(exc).__name__}: {exc}") from None
        status = resp.status
        if resp.getheader("Connection", "").lower() == "close":
            self.close()
        if 200 <= status < 300:
            try:
                return json.loads(data) if data else None
            except ValueError:
                return None
        text = data[:300].decode("utf-8", "replace")
        if status == 404:
            raise NotFound(text)
        if status in (408, 429) or status >= 500:
            raise TryLater(
                f"{method} {path}: HTTP {status} {text}",
                _retry_after(resp.getheader("Retry-After")),
                reason=f"HTTP {status}",
            )
        raise Rejected(status, text)


#: How a kept-alive connection the server has closed fails on its next request.
_STALE = (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date; the backoff applies instead
