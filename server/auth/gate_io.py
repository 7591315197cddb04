"""What the gate (``security``) reads of a request besides its token: the body, within a size
and a time limit, the Host it was sent to, and its content type.

    body = await read_body(receive, limit=16 << 20, timeout_s=60.0)   # Denied 413 / 408
    receive = replay(body, receive)                                  # the route reads it again
"""

from __future__ import annotations

import asyncio
import email.message
import functools
import ipaddress
from urllib.parse import urlsplit

import anyio

from ..settings import Settings, is_loopback

#: ``asyncio.timeout`` (Python 3.11+), else None.
_asyncio_timeout = getattr(asyncio, "timeout", None)


class Denied(Exception):
    """A refusal: ``detail`` is the JSON reply's ``detail`` (text, or FastAPI's list of errors)."""

    def __init__(self, status: int, detail, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


async def read_body(receive, limit: int, timeout_s: float) -> bytes:
    """The whole body, or 413 past ``limit`` bytes, or 408 when it has not all come within
    ``timeout_s`` (the connection is then closed: a trickle must not hold it).

    On asyncio (what uvicorn runs) the time limit is asyncio's own ``timeout``, a timer on the
    loop; anyio's cancel scope, which any other event loop gets, cost ~0.05 ms on every
    request with a body (``benchmarks/ingest_profile.py``)."""
    body: bytes | None = None
    if _asyncio_timeout is not None and _on_asyncio():
        try:
            async with _asyncio_timeout(timeout_s) as deadline:
                body = await _read(receive, limit)
        except TimeoutError:
            if not deadline.expired():  # not ours
                raise
    else:
        with anyio.move_on_after(timeout_s):
            body = await _read(receive, limit)
    if body is None:
        raise Denied(
            408, f"the body did not arrive within {timeout_s:g} s (STETHOSCOPE_BODY_TIMEOUT_S)", {"Connection": "close"}
        )
    return body


async def _read(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Denied(413, f"body is larger than the limit of {limit} bytes (STETHOSCOPE_MAX_BODY_BYTES)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # another event loop (trio)
        return False
    return True


def replay(body: bytes | None, upstream):
    """A ``receive`` that hands the app the body read already, then the client's disconnect."""
    if body is None:
        return upstream
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await upstream()

    return receive


def has_body(headers) -> bool:
    """Whether the client says it sends a body (which the gate may refuse before reading)."""
    declared = headers.get("content-length")
    return "transfer-encoding" in headers or (declared is not None and declared != "0")


@functools.lru_cache(maxsize=1024)  # pure, and asked on every request (email's parser: ~10 us)
def is_json(content_type: str | None) -> bool:
    """``application/json`` or ``application/<anything>+json``, parameters aside: the types a web
    page cannot send to another site without the browser asking that site first (CORS)."""
    if not content_type:
        return False
    m = email.message.Message()
    m["content-type"] = content_type
    subtype = m.get_content_subtype()
    return m.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def require_json(method: str, content_type: str | None) -> None:
    if not is_json(content_type):
        raise Denied(
            415,
            f"{method} needs 'Content-Type: application/json' (got {content_type or 'none'}): with "
            f"authentication off, a state change must be a request no other web site can send",
        )


@functools.lru_cache(maxsize=1024)  # pure, and asked on every request with authentication off
def _host_name(host: str) -> str:
    """``[::1]:8765`` -> ``::1``, ``Example.COM:80`` -> ``example.com``."""
    return (urlsplit(f"//{host}").hostname or "").lower()


def allowed_hosts(settings: Settings) -> set[str]:
    """Host names a server with authentication off answers to, beyond loopback ones."""
    out = {h if h == "*" else _host_name(h) for h in settings.allowed_hosts}  # a name, any port
    try:
        if not ipaddress.ip_address(settings.host.strip("[]")).is_unspecified:
            out.add(settings.host.strip("[]").lower())
    except ValueError:  # a name: it is what clients put in Host
        out.add(settings.host.lower())
    if settings.public_url:
        out.add(_host_name(urlsplit(settings.public_url).netloc))
    return out - {""}


def check_host(host: str | None, allowed: set[str]) -> None:
    """With authentication off, refuse a Host that is not this machine's: a page on
    evil.example that re-points its name at 127.0.0.1 (DNS rebinding) still sends
    ``Host: evil.example``."""
    name = _host_name(host) if host and not any(c in host for c in "@/\\?#") else ""
    if name and ("*" in allowed or name in allowed or is_loopback(name)):
        return
    raise Denied(
        403,
        f"Host {host!r} is not a name this server answers to while authentication is off (a defence "
        f"against DNS rebinding): use a loopback address such as 127.0.0.1, or list the name in "
        f"STETHOSCOPE_ALLOWED_HOSTS",
    )
