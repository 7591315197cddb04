"""A real HTTP receiver for webhook tests: http.server on a loopback port, in a thread.

Shared by the server, dashboard and end-to-end tests (import it as ``webhook_receiver``)."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Received:
    path: str
    headers: dict
    body: bytes
    replied: int

    @property
    def json(self) -> dict:
        return json.loads(self.body)

    def signature_ok(self, secret: str) -> bool:
        want = "sha256=" + hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(want, self.headers.get("x-stethoscope-signature", ""))


@dataclass
class Receiver:
    """Records every POST; replies with ``statuses`` in turn, then ``default_status``, with
    ``reply_body`` (default ``ok``/``no``) and ``reply_headers``. ``port`` 0 takes a free one;
    a fixed port lets a test bring a receiver up where an earlier one was down."""

    statuses: list = field(default_factory=list)
    default_status: int = 200
    reply_body: bytes | None = None
    reply_headers: dict = field(default_factory=dict)
    requests: list = field(default_factory=list)
    url: str = ""
    port: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        rec = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with rec._cond:
                    status = rec.statuses.pop(0) if rec.statuses else rec.default_status
                    rec.requests.append(
                        Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, status)
                    )
                    rec._cond.notify_all()
                data = rec.reply_body if rec.reply_body is not None else (b"ok" if status < 300 else b"no")
                self.send_response(status)
                for k, v in rec.reply_headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def delivered(self) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if 200 <= r.replied < 300]

    def wait_for(self, predicate, timeout: float = 30.0) -> list[Received]:
        """Wait until ``predicate(requests so far)`` is true; returns the requests."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(list(self.requests)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"receiver: condition not met in {timeout} s; got {len(self.requests)} requests: "
                        f"{[(r.replied, r.body[:120]) for r in self.requests]}"
                    )
                self._cond.wait(min(left, 0.2))
            return list(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
