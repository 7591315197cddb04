"""Where a webhook may send, and one POST to it: the target's addresses are checked after
name resolution, the connection goes to the address that was checked, and a failure is told
as a status class, never as the receiver's reply or the socket's error text.

Webhooks are set up by project admins, and the server sits inside a network: without these
checks a webhook is a way to make the server POST to its own loopback services, the cloud
metadata endpoint (169.254.169.254) or any private host, and read back what answered. So,
unless the operator allows it (``STETHOSCOPE_WEBHOOK_ALLOW_PRIVATE``), every address a target
resolves to must be global: not loopback, link-local, private (RFC 1918, fc00::/7, ...),
carrier-grade NAT (100.64.0.0/10), unspecified, multicast or reserved, judged by
:mod:`ipaddress` on the address itself (so ``2130706433``, ``0x7f.1`` and
``[::ffff:127.0.0.1]`` are 127.0.0.1 like any other spelling). A target with any such
address is refused whole: a name that answers with a public and a private address is the
usual DNS-rebinding trick. The check runs when a webhook is created and again before every
delivery, and the connection is made to the checked address itself, with the original
``Host`` header and, over https, the host name for SNI and the certificate check; a DNS
answer that changes between the check and the connection therefore changes nothing.
Redirects are never followed (``http.client`` does not): a 3xx is a failed delivery.

    post("https://hooks.example.com/x", body, headers, timeout=10, allow_private=False)
    # -> (200, None, None), or (None, None, "target refused: loopback address"), ...
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import logging
import re
import socket
import ssl
import time
from urllib.parse import unquote, urlsplit

log = logging.getLogger("stethoscope.server.webhooks")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: What ``last_error`` may say (besides ``HTTP 4xx``-style classes and refusals): a class,
#: so that nothing the target answered, and no OS error text, reaches a client.
CONNECTION_FAILED = "connection failed"
TIMED_OUT = "timed out"
TLS_FAILED = "TLS failed"
NOT_RESOLVED = "name not resolved"
BAD_REPLY = "invalid HTTP reply"
REFUSED = "target refused"
_CLASSES = {CONNECTION_FAILED, TIMED_OUT, TLS_FAILED, NOT_RESOLVED, BAD_REPLY}
_HTTP_CLASS = re.compile(r"HTTP [1-5]xx")
_REASONS = (
    "loopback address",
    "link-local address",
    "unspecified address",
    "multicast address",
    "carrier-grade NAT address",
    "private address",
    "reserved address",
    "non-global address",
)

#: Shared address space (RFC 6598): not ``is_private`` in Python 3.11, yet inside a provider's network.
CGNAT = ipaddress.ip_network("100.64.0.0/10")
#: NAT64 prefixes (RFC 6052, RFC 8215): the IPv4 address inside is the one reached.
NAT64 = (ipaddress.ip_network("64:ff9b::/96"),)


class TargetRefused(Exception):
    """The target resolves to an address webhooks may not reach; ``reason`` names its kind."""

    def __init__(self, reason: str, address: IPAddress) -> None:
        super().__init__(reason)
        self.reason = reason
        self.address = address


class NotResolved(Exception):
    """The target's host name has no address (now)."""


def _embedded(ip: IPAddress) -> list[IPAddress]:
    """The addresses ``ip`` actually reaches: the IPv4 address inside an IPv4-mapped, NAT64 or
    6to4 IPv6 address as well (judged as IPv4, since Python 3.11 calls all of ::/8 reserved)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return [ip.ipv4_mapped]
        if any(ip in n for n in NAT64):
            return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
        if ip.sixtofour is not None:
            return [ip, ip.sixtofour]
    return [ip]


def disallowed(ip: IPAddress) -> str | None:
    """Why a webhook may not reach ``ip`` without the operator's leave, or None if it may."""
    for a in _embedded(ip):
        if a.is_loopback:
            return "loopback address"
        if a.is_link_local:  # 169.254.169.254, the cloud metadata service, is one
            return "link-local address"
        if a.is_unspecified:
            return "unspecified address"
        if a.is_multicast:
            return "multicast address"
        if a.version == 4 and a in CGNAT:
            return "carrier-grade NAT address"
        if a.is_private:
            return "private address"
        if a.is_reserved:
            return "reserved address"
        if not a.is_global:
            return "non-global address"
    return None


def literal_ip(host: str) -> IPAddress | None:
    """``host`` as an address if it is one, in any spelling the C library would connect to:
    ``::1``, ``127.0.0.1``, and the old inet_aton forms ``2130706433``, ``0x7f.1``, ``0177.0.0.1``."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError, UnicodeError):
        return None


def _getaddrinfo(host: str, port: int) -> list:
    """The resolver (one place, so tests can stand in for DNS)."""
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` stands for, in the resolver's order, without repeats."""
    ip = literal_ip(host)
    if ip is not None:
        return [ip]
    try:
        infos = _getaddrinfo(host, port)
    except (OSError, UnicodeError) as e:
        raise NotResolved(host) from e
    out: list[IPAddress] = []
    for *_, sockaddr in infos:
        a = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if a not in out:
            out.append(a)
    if not out:
        raise NotResolved(host)
    return out


def _host_port(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    return u.hostname or "", u.port or (443 if u.scheme == "https" else 80)


def check_target(url: str, allow_private: bool) -> list[IPAddress]:
    """The addresses ``url`` may be sent to; ``TargetRefused`` if any of them is disallowed
    (unless ``allow_private``), ``NotResolved`` if it has none."""
    host, port = _host_port(url)
    ips = resolve(host, port)
    if not allow_private:
        for ip in ips:
            reason = disallowed(ip)
            if reason is not None:
                raise TargetRefused(reason, ip)
    return ips


def creation_error(url: str, allow_private: bool) -> str | None:
    """Why a webhook may not be created at ``url``, or None. A name that does not resolve now
    is accepted (its DNS record may come later); every delivery checks it again anyway."""
    host, _ = _host_port(url)
    try:
        check_target(url, allow_private)
    except NotResolved:
        return None
    except TargetRefused as e:
        # The address is named only when the URL spells it: a refusal must not turn the
        # server into a way to read its internal DNS.
        where = f"{host} is a {e.reason}" if literal_ip(host) is not None else f"{host} resolves to a {e.reason}"
        return (
            f"webhook url refused: {where}. Webhooks may not reach loopback, link-local, private, "
            f"carrier-grade NAT, multicast or reserved addresses unless the server's operator sets "
            f"STETHOSCOPE_WEBHOOK_ALLOW_PRIVATE=1"
        )
    return None


def http_class(code: int) -> str:
    return f"HTTP {code // 100}xx"


def public_error(error: str | None, status_code: int | None) -> str | None:
    """``last_error`` as clients may see it: a class. Rows written before the classes (they
    held the reply's first bytes or the OS error text) are mapped on the way out."""
    if error is None:
        return None
    if error in _CLASSES or _HTTP_CLASS.fullmatch(error) or error in {f"{REFUSED}: {r}" for r in _REASONS}:
        return error
    if status_code is not None:
        return http_class(status_code)
    return TIMED_OUT if "timed out" in error.lower() or "timeout" in error.lower() else CONNECTION_FAILED


def _connect(ip: IPAddress, port: int, timeout: float) -> socket.socket:
    """A TCP connection to the checked address itself (one place, so tests can watch it)."""
    return socket.create_connection((str(ip), port), timeout=timeout)


def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def _pinned(ips: list[IPAddress], port: int, timeout: float):
    """A ``_create_connection`` for http.client that tries the checked addresses in turn,
    all within one ``timeout``, and never resolves the host name again."""

    def create(_address, _timeout=None, _source=None) -> socket.socket:
        deadline = time.monotonic() + timeout
        last: OSError = OSError("no address")
        for ip in ips:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            try:
                sock = _connect(ip, port, left)
            except OSError as e:
                last = e
                continue
            sock.settimeout(timeout)  # for the request and the reply
            return sock
        raise last

    return create


def _failure_class(e: BaseException) -> str:
    if isinstance(e, (TimeoutError, socket.timeout)):
        return TIMED_OUT
    if isinstance(e, ssl.SSLError | ssl.CertificateError):
        return TLS_FAILED
    if isinstance(e, http.client.HTTPException):
        return BAD_REPLY
    return CONNECTION_FAILED


def post(
    url: str, body: bytes, headers: dict[str, str], timeout: float, allow_private: bool
) -> tuple[int | None, str | None, str | None]:
    """POST once to a checked address, following no redirect. Returns (status code,
    Retry-After, error class); the error class is None for a 2xx."""
    u = urlsplit(url)
    try:
        host, port = _host_port(url)
        ips = check_target(url, allow_private)
    except ValueError:  # a bad port in a row stored before the URL was validated
        return None, None, CONNECTION_FAILED
    except TargetRefused as e:
        log.debug("webhook target %s refused: %s %s", host, e.reason, e.address)
        return None, None, f"{REFUSED}: {e.reason}"
    except NotResolved as e:
        log.debug("webhook target %s not resolved: %s", host, e.__cause__)
        return None, None, NOT_RESOLVED
    try:
        if u.scheme == "https":
            # Host name for SNI and the certificate check; the socket is the pinned one.
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=_tls_context()
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn._create_connection = _pinned(ips, port, timeout)  # type: ignore[attr-defined]
        headers = dict(headers)
        if u.username is not None:
            cred = f"{unquote(u.username)}:{unquote(u.password or '')}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(cred).decode()
        try:
            conn.request("POST", (u.path or "/") + (f"?{u.query}" if u.query else ""), body=body, headers=headers)
            r = conn.getresponse()
            r.read(0)  # the reply's body is never read, kept or shown
        finally:
            conn.close()
    except (OSError, http.client.HTTPException, ValueError) as e:
        log.debug("webhook POST to %s failed: %s: %s", host, type(e).__name__, e)
        return None, None, _failure_class(e)
    if 200 <= r.status < 300:
        return r.status, None, None
    return r.status, r.getheader("Retry-After"), http_class(r.status)
