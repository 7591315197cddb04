"""Webhook targets (SSRF): loopback, link-local, private and reserved addresses refused at
creation and at every delivery unless STETHOSCOPE_WEBHOOK_ALLOW_PRIVATE; the connection made
to the checked address (DNS rebinding); no redirect followed; nothing the receiver answered,
and no OS error text, shown to clients. On both databases.

No test here sends a packet off this machine: host names are answered by a fake resolver
(names ending in ``.test``, which real DNS never answers), and every connection the webhook
code opens is checked to go to loopback before it is made.
"""

from __future__ import annotations

import ipaddress
import socket
import threading

import pytest
from _alert_helpers import loss_curve, make_run, no_internal_errors, post_batches, wait_until  # noqa: F401
from live_servers import free_port
from webhook_receiver import Receiver

from stethoscope_server.alerting import webhook_targets as T
from stethoscope_server.settings import Settings

SECRET = "s3cret-for-tests"
BANNER = b"SECRET-BANNER internal admin console v1.2; session=abc123"
#: A global address (example.com's) that names in the fake DNS may stand for. Nothing ever
#: connects to it: ``guard`` fails any connection off loopback.
PUBLIC = "93.184.215.14"

REFUSED_URLS = [
    "http://127.0.0.1/hook",
    "http://localhost:8080/hook",
    "http://[::1]/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/hook",
    "http://192.168.1.1/hook",
    "http://2130706433/hook",
    "http://0x7f000001/hook",
    "http://0x7f.1/hook",
    "http://0177.0.0.1/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://[::ffff:a9fe:a9fe]/hook",  # 169.254.169.254, IPv4-mapped
    "http://100.64.0.1/hook",
    "http://0.0.0.0/hook",
    "http://224.0.0.1/hook",
    "http://240.0.0.1/hook",
    "https://[fe80::1]/hook",
    "https://[fd00::1]:8443/hook",
    "http://intranet.test/hook",  # resolves to 10.1.2.3
    "http://mixed.test/hook",  # resolves to a public address and to loopback
]


@pytest.fixture
def settings(db_url, request):
    over = dict(getattr(request, "param", {}))
    return Settings(
        database_url=db_url, outbox_poll_s=0.2, stall_check_s=0.2, webhook_max_attempts=1, webhook_timeout_s=5, **over
    )


@pytest.fixture(autouse=True)
def guard(monkeypatch):
    """A fake DNS for ``*.test`` names (``dns``: name -> addresses; change it mid-test), the
    real resolver refused them (so nothing asks real DNS), and every webhook connection
    recorded and refused unless it goes to loopback."""
    dns: dict[str, list[str]] = {
        "intranet.test": ["10.1.2.3"],
        "mixed.test": [PUBLIC, "127.0.0.1"],
        "public.test": [PUBLIC],
    }
    connects: list[tuple[str, int]] = []
    lookups: list[str] = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, T._connect

    def fake_getaddrinfo(host, port, *a, **k):
        lookups.append(host)
        if host not in dns:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in dns[host]
        ]

    def system_getaddrinfo(host, *a, **k):
        if isinstance(host, str) and host.rstrip(".").endswith(".test"):
            raise AssertionError(f"{host} resolved by the system resolver, not the checked one")
        return real_getaddrinfo(host, *a, **k)

    def connect(ip, port, timeout):
        connects.append((str(ip), port))
        if not ipaddress.ip_address(ip).is_loopback:
            raise AssertionError(f"a webhook connected to {ip}, off loopback")
        return real_connect(ip, port, timeout)

    monkeypatch.setattr(
        T,
        "_getaddrinfo",
        lambda host, port: (
            fake_getaddrinfo(host, port)
            if host.endswith(".test")
            else real_getaddrinfo(host, port, type=socket.SOCK_STREAM)
        ),
    )
    monkeypatch.setattr(socket, "getaddrinfo", system_getaddrinfo)
    monkeypatch.setattr(T, "_connect", connect)

    class Guard:
        pass

    g = Guard()
    g.dns, g.connects, g.lookups = dns, connects, lookups
    return g


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def _create(client, url, **body):
    return client.post("/projects/p/webhooks", json={"url": url, "secret": SECRET, **body})


def _hook(client, url, **body):
    r = _create(client, url, **body)
    assert r.status_code == 201, r.text
    return r.json()


def _deliveries(client, hook_id):
    r = client.get(f"/webhooks/{hook_id}/deliveries")
    assert r.status_code == 200, r.text
    return r


def _failed(client, hook_id, n):
    """The delivery log once it holds ``n`` deliveries, all failed; else None."""
    log = _deliveries(client, hook_id).json()
    return log if len(log) == n and all(x["status"] == "failed" for x in log) else None


# -- the address check itself (no database) ---------------------------------------------
@pytest.mark.parametrize(
    "address, reason",
    [
        ("127.0.0.1", "loopback address"),
        ("127.255.0.9", "loopback address"),
        ("::1", "loopback address"),
        ("::ffff:127.0.0.1", "loopback address"),
        ("2002:7f00:1::", "loopback address"),  # 6to4 of 127.0.0.1
        ("64:ff9b::7f00:1", "loopback address"),  # NAT64 of 127.0.0.1
        ("169.254.169.254", "link-local address"),
        ("fe80::1", "link-local address"),
        ("::ffff:169.254.169.254", "link-local address"),
        ("10.0.0.1", "private address"),
        ("172.16.5.4", "private address"),
        ("192.168.1.1", "private address"),
        ("fc00::1", "private address"),
        ("fd12:3456::1", "private address"),
        ("::ffff:10.0.0.1", "private address"),
        ("100.64.0.1", "carrier-grade NAT address"),
        ("100.127.255.254", "carrier-grade NAT address"),
        ("0.0.0.0", "unspecified address"),
        ("::", "unspecified address"),
        ("224.0.0.1", "multicast address"),
        ("ff02::1", "multicast address"),
        ("240.0.0.1", "private address"),
        ("255.255.255.255", "private address"),
        ("198.18.0.1", "private address"),
        ("::127.0.0.1", "reserved address"),
        ("8.8.8.8", None),
        ("93.184.215.14", None),
        ("2001:4860:4860::8888", None),
        ("::ffff:8.8.8.8", None),
        ("64:ff9b::808:808", None),
    ],
)
def test_disallowed_addresses(address, reason):
    assert T.disallowed(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "host, address",
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
        ("example.test", None),
    ],
)
def test_every_spelling_of_an_address_is_that_address(host, address):
    assert T.literal_ip(host) == (None if address is None else ipaddress.ip_address(address))


def test_stored_error_texts_are_shown_as_classes():
    """Rows written before this change held the reply's first bytes or the OS error text."""
    assert T.public_error("HTTP 500: " + BANNER.decode(), 500) == "HTTP 5xx"
    assert T.public_error("HTTP 302: <a href=...>", 302) == "HTTP 3xx"
    assert T.public_error("ConnectionRefusedError: [Errno 111] Connection refused", None) == "connection failed"
    assert T.public_error("TimeoutError: timed out", None) == "timed out"
    assert T.public_error("target refused: loopback address", None) == "target refused: loopback address"
    assert T.public_error("target refused: " + BANNER.decode(), None) == "connection failed"
    assert T.public_error(None, 200) is None


# -- at creation ---------------------------------------------------------------------------
def test_private_targets_are_refused_at_creation(client, guard):
    for url in REFUSED_URLS:
        r = _create(client, url)
        assert r.status_code == 422, (url, r.text)
        assert "STETHOSCOPE_WEBHOOK_ALLOW_PRIVATE" in r.json()["detail"], url
    # A name's refusal does not tell its address (no window on the internal DNS).
    detail = _create(client, "http://intranet.test/hook").json()["detail"]
    assert "intranet.test resolves to a private address" in detail and "10.1.2.3" not in detail
    assert client.get("/projects/p/webhooks").status_code == 404  # nothing created, not even the project

    # Public addresses and names, and a name that does not resolve (yet), are accepted.
    for url in (f"http://{PUBLIC}/hook", "https://public.test/hook", "https://nowhere.test/hook"):
        _hook(client, url)
    assert guard.connects == []  # creating never connects


@pytest.mark.parametrize("settings", [{"webhook_allow_private": True}], indirect=True)
def test_private_targets_are_accepted_when_the_operator_allows_them(client, guard):
    for url in REFUSED_URLS:
        _hook(client, url)
    assert len(client.get("/projects/p/webhooks").json()) == len(REFUSED_URLS)
    assert guard.connects == []


# -- at delivery ---------------------------------------------------------------------------
def test_a_name_that_turns_to_loopback_after_creation_is_not_delivered(client, guard, receiver):
    """DNS rebinding: public when the webhook is created, loopback when an alert is sent."""
    guard.dns["hooks.test"] = [PUBLIC]
    hook = _hook(client, f"http://hooks.test:{receiver.server.server_address[1]}/hook")
    guard.dns["hooks.test"] = ["127.0.0.1"]

    r = client.post(f"/webhooks/{hook['id']}/test")
    assert r.status_code == 200, r.text
    d = r.json()
    assert (d["status"], d["last_status_code"], d["last_error"]) == ("failed", None, "target refused: loopback address")

    guard.dns["hooks.test"] = [PUBLIC, "127.0.0.1"]  # a mixed answer is refused whole
    make_run(client)
    post_batches(client, "r", loss_curve(160, spikes=(139,)))  # opens and resolves: two deliveries
    log = wait_until(lambda: _failed(client, hook["id"], 3), what="both alert deliveries failed")
    assert {x["last_error"] for x in log} == {"target refused: loopback address"}
    assert receiver.requests == [] and guard.connects == []  # refused before any connection


@pytest.mark.parametrize("settings", [{"webhook_allow_private": True}], indirect=True)
def test_delivery_connects_to_the_checked_address_with_the_original_host(client, guard, receiver):
    port = receiver.server.server_address[1]
    guard.dns["receiver.test"] = ["127.0.0.1"]
    hook = _hook(client, f"http://receiver.test:{port}/hook?x=1")
    guard.lookups.clear()
    assert client.post(f"/webhooks/{hook['id']}/test").json()["status"] == "delivered"
    (req,) = receiver.requests
    assert req.headers["host"] == f"receiver.test:{port}" and req.path == "/hook?x=1" and req.signature_ok(SECRET)
    assert guard.lookups == ["receiver.test"] and guard.connects == [("127.0.0.1", port)]  # resolved once, then pinned


@pytest.mark.parametrize("settings", [{"webhook_allow_private": True}], indirect=True)
def test_https_checks_the_certificate_of_the_host_name(client, guard, monkeypatch):
    """Over https the pinned socket is wrapped for the URL's host name (SNI and certificate);
    the listener answers the TLS hello in plain HTTP, so the handshake fails, as a class."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer_plain_http():
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            conn.recv(4096)

    threading.Thread(target=answer_plain_http, daemon=True).start()
    guard.dns["secure.test"] = ["127.0.0.1"]
    names = []
    make_context = T._tls_context

    def recording_context():
        ctx = make_context()
        wrap = ctx.wrap_socket

        def wrap_socket(sock, *a, server_hostname=None, **k):
            names.append(server_hostname)
            return wrap(sock, *a, server_hostname=server_hostname, **k)

        ctx.wrap_socket = wrap_socket
        return ctx

    monkeypatch.setattr(T, "_tls_context", recording_context)
    hook = _hook(client, f"https://secure.test:{port}/hook")
    try:
        d = client.post(f"/webhooks/{hook['id']}/test").json()
    finally:
        listener.close()
    assert (d["status"], d["last_error"]) == ("failed", "TLS failed")
    assert names == ["secure.test"] and guard.connects == [("127.0.0.1", port)]


@pytest.mark.parametrize("settings", [{"webhook_allow_private": True}], indirect=True)
def test_a_redirect_is_not_followed(client, guard, receiver):
    other = Receiver()
    try:
        receiver.default_status = 302
        receiver.reply_headers = {"Location": other.url}
        hook = _hook(client, receiver.url)
        d = client.post(f"/webhooks/{hook['id']}/test").json()
        assert (d["status"], d["last_status_code"], d["last_error"]) == ("failed", 302, "HTTP 3xx")
        assert len(receiver.requests) == 1 and other.requests == []
        assert guard.connects == [("127.0.0.1", receiver.server.server_address[1])]
    finally:
        other.close()


@pytest.mark.parametrize("settings", [{"webhook_allow_private": True}], indirect=True)
def test_the_reply_body_and_socket_errors_never_reach_clients(live_server, client, guard, receiver):
    receiver.default_status = 500
    receiver.reply_body = BANNER
    hook = _hook(client, receiver.url)
    r = client.post(f"/webhooks/{hook['id']}/test")
    assert r.status_code == 200 and b"SECRET-BANNER" not in r.content
    assert (r.json()["last_status_code"], r.json()["last_error"]) == (500, "HTTP 5xx")

    make_run(client)
    post_batches(client, "r", loss_curve(160, spikes=(139,)))
    wait_until(lambda: _failed(client, hook["id"], 3), what="both alert deliveries failed")
    log = _deliveries(client, hook["id"])
    assert b"SECRET-BANNER" not in log.content and {x["last_error"] for x in log.json()} == {"HTTP 5xx"}

    dead = _hook(client, f"http://127.0.0.1:{free_port()}/nothing-listens")
    r = client.post(f"/webhooks/{dead['id']}/test")
    assert r.json()["last_error"] == "connection failed" and "Errno" not in r.text and "refused" not in r.text.lower()

    # Rows stored before this change kept the reply's first bytes and the OS error text.
    from stethoscope_server.store import webhooks as W
    from stethoscope_server.store.models import utcnow

    with live_server.store.writing() as conn:
        (a, b) = (W.insert_claimed(conn, hook["id"], {"event": "test", "body": {}}, utcnow())["id"] for _ in range(2))
        W.record(conn, a, "failed", 500, "HTTP 500: " + BANNER.decode())
        W.record(conn, b, "failed", None, "ConnectionRefusedError: [Errno 111] Connection refused")
    log = _deliveries(client, hook["id"])
    assert b"SECRET-BANNER" not in log.content and b"Errno" not in log.content
    assert [x["last_error"] for x in log.json() if x["id"] in (a, b)] == ["connection failed", "HTTP 5xx"]
