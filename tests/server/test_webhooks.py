"""Webhooks against a real HTTP receiver on loopback, on both databases: signed JSON and Slack
bodies, a receiver that fails then recovers, give-up after the last attempt, test-send, the
delivery log, a restart with deliveries pending, and two outbox workers never double-sending."""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest
from _alert_helpers import loss_curve, make_run, no_internal_errors, post, post_batches, wait_until  # noqa: F401
from webhook_receiver import Receiver

from stethoscope_server.settings import Settings

SECRET = "s3cret-for-tests"


@pytest.fixture
def settings(db_url):
    # Quick retries (0.1-0.2 s, doubling to at most 1 s) and four attempts, so the retry
    # tests take a second or two. The receiver is on loopback: private targets allowed.
    return Settings(
        database_url=db_url,
        outbox_poll_s=0.2,
        stall_check_s=0.2,
        webhook_backoff_s=0.2,
        webhook_backoff_max_s=1.0,
        webhook_max_attempts=4,
        webhook_timeout_s=5,
        webhook_allow_private=True,
    )


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def _hook(client, url, **body):
    r = client.post("/projects/p/webhooks", json={"url": url, "secret": SECRET, **body})
    assert r.status_code == 201, r.text
    return r.json()


def _spike(client, run="r"):
    """A spike episode that opens and resolves: two alert events."""
    make_run(client, run)
    (alert,) = post_batches(client, run, loss_curve(160, spikes=(137,)))
    return alert


def _deliveries(client, hook_id, **params):
    r = client.get(f"/webhooks/{hook_id}/deliveries", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_signed_json_delivery_with_link_and_severity_filter(client, live_server, receiver):
    hook = _hook(client, receiver.url)
    assert hook["secret"] == SECRET and hook["severities"] == ["warning", "critical"] and hook["format"] == "json"
    critical_only = _hook(client, receiver.url + "?only=critical", severities=["critical"])
    listed = client.get("/projects/p/webhooks").json()
    assert [h["id"] for h in listed] == [hook["id"], critical_only["id"]]
    assert all("secret" not in h for h in listed)

    alert = _spike(client)
    got = receiver.wait_for(lambda rs: len(rs) >= 2)
    assert [r.json["event"] for r in got] == ["alert.opened", "alert.resolved"]
    for r in got:
        assert r.path == "/hook" and r.signature_ok(SECRET)
        assert not r.signature_ok("another-secret")  # the check can fail
        body = r.json
        assert body["alert"]["id"] == alert["id"] and body["alert"]["detector"] == "loss_spike"
        assert body["run"] == {"id": "r", "name": "r", "project": "p"}
        assert body["link"] == f"{live_server.settings.base_url}/runs/r"
        assert r.headers["content-type"] == "application/json" and r.headers["x-stethoscope-event"] == body["event"]
    assert got[0].json["alert"]["status"] == "open" and got[1].json["alert"]["status"] == "resolved"
    assert got[0].headers["x-stethoscope-delivery"] != got[1].headers["x-stethoscope-delivery"]

    # The receiver has replied; the worker records that right after.
    log = wait_until(
        lambda: (lambda log: log if all(d["status"] != "pending" for d in log) else None)(
            _deliveries(client, hook["id"])
        )
    )
    assert [(d["event"], d["status"], d["attempts"], d["last_status_code"]) for d in log] == [
        ("alert.resolved", "delivered", 1, 200),
        ("alert.opened", "delivered", 1, 200),
    ]
    assert log[1]["alert_id"] == alert["id"] and log[1]["delivered_at"] is not None and log[1]["body"] == got[0].json
    assert _deliveries(client, critical_only["id"]) == []  # a warning is not for it

    # A NaN loss is critical: both webhooks hear of it.
    (crit,) = post(client, "r", 160, [float("nan")])["alerts"]
    got = receiver.wait_for(lambda rs: len(rs) >= 4)
    assert sorted(r.path for r in got[2:]) == ["/hook", "/hook?only=critical"]
    assert all(r.json["alert"]["id"] == crit["id"] and r.json["alert"]["severity"] == "critical" for r in got[2:])


def test_slack_format(client, live_server, receiver):
    hook = _hook(client, receiver.url, format="slack")
    _spike(client)
    first = receiver.wait_for(lambda rs: len(rs) >= 1)[0]
    assert first.signature_ok(SECRET)
    body = first.json
    assert set(body) == {"text", "blocks"}
    # What happened, in plain words and with the step, comes first; then who and the evidence.
    plain = re.match(r"Loss jumped [\d.]+x at step 137 \(from [\d.]+ to 40\)\.", body["text"]).group(0)
    assert body["text"].startswith(plain + " [WARNING] loss_spike opened on run r (p). ")
    assert "robust sigmas" in body["text"]
    section = body["blocks"][0]
    assert section["type"] == "section"
    first_line, *rest = section["text"]["text"].split("\n")
    assert first_line == f":warning: *{plain}*"
    assert "robust sigmas" in rest[0] and rest[1] == "_[WARNING] loss_spike opened on run r (p)_"
    assert body["blocks"][-1]["elements"][0]["url"] == f"{live_server.settings.base_url}/runs/r"
    assert _deliveries(client, hook["id"])[-1]["event"] == "alert.opened"


def test_an_episode_opened_and_resolved_in_one_batch_is_delivered_as_each_change_left_it(client, receiver):
    """A spike told and cleared within one ingest batch: the "opened" delivery shows the alert
    open (as it was when it opened), not the resolved row it is by the end of the batch."""
    _hook(client, receiver.url)
    make_run(client)
    (alert,) = post_batches(client, "r", loss_curve(160, spikes=(120,)), size=160)
    assert alert["status"] == "resolved"  # the reply: the row as the batch left it
    got = receiver.wait_for(lambda rs: len(rs) >= 2)
    opened, resolved = (r.json for r in got)
    assert (opened["event"], resolved["event"]) == ("alert.opened", "alert.resolved")
    assert opened["alert"]["status"] == "open" and opened["alert"]["resolved_at"] is None
    assert opened["alert"]["end_step"] < resolved["alert"]["end_step"] == alert["end_step"]
    assert resolved["alert"]["status"] == "resolved" and resolved["alert"]["resolved_at"] is not None
    assert opened["alert"]["id"] == resolved["alert"]["id"] == alert["id"]


def test_receiver_that_fails_then_recovers(client, receiver):
    receiver.statuses[:] = [500, 503]
    hook = _hook(client, receiver.url)
    make_run(client)
    post_batches(client, "r", loss_curve(140, spikes=(137,)))  # opens; stays open
    got = receiver.wait_for(lambda rs: len(rs) >= 3)
    assert [r.replied for r in got] == [500, 503, 200]
    assert len({r.body for r in got}) == 1 and len({r.headers["x-stethoscope-delivery"] for r in got}) == 1
    (d,) = wait_until(lambda: [d for d in _deliveries(client, hook["id"]) if d["status"] == "delivered"])
    assert d["attempts"] == 3 and d["last_status_code"] == 200 and d["last_error"] is None


def test_gives_up_after_the_last_attempt(client, receiver):
    receiver.default_status = 500
    hook = _hook(client, receiver.url)
    make_run(client)
    post_batches(client, "r", loss_curve(140, spikes=(137,)))
    (d,) = wait_until(
        lambda: [d for d in _deliveries(client, hook["id"]) if d["status"] == "failed"], what="failed delivery"
    )
    assert d["attempts"] == 4 and d["last_status_code"] == 500 and d["last_error"] == "HTTP 5xx"
    time.sleep(1.5)  # longer than the largest backoff: no fifth attempt
    assert len(receiver.requests) == 4


def test_webhook_validation_delete_and_test_send(client, receiver):
    bad = [
        {"url": "ftp://example.com/hook"},
        {"url": "example.com/hook"},
        {"url": "http:///nohost"},
        {"url": receiver.url, "severities": ["urgent"]},
        {"url": receiver.url, "severities": []},
        {"url": receiver.url, "format": "teams"},
        {"url": receiver.url, "secret": "short"},
        {"url": receiver.url, "colour": "red"},
    ]
    for body in bad:
        r = client.post("/projects/p/webhooks", json=body)
        assert r.status_code == 422, (body, r.text)
    assert client.get("/projects/p/webhooks").status_code == 404  # nothing created, not even the project

    generated = client.post("/projects/p/webhooks", json={"url": receiver.url}).json()
    assert len(generated["secret"]) == 64  # 256 random bits, shown once

    ok = client.post(f"/webhooks/{generated['id']}/test")
    assert ok.status_code == 200, ok.text
    assert ok.json()["status"] == "delivered" and ok.json()["event"] == "test" and ok.json()["attempts"] == 1
    (req,) = receiver.requests
    assert req.signature_ok(generated["secret"]) and req.json["event"] == "test"

    dead = _hook(client, "http://127.0.0.1:9/nothing-listens")
    r = client.post(f"/webhooks/{dead['id']}/test").json()
    assert r["status"] == "failed" and r["last_status_code"] is None and r["last_error"] == "connection failed"

    assert client.delete(f"/webhooks/{dead['id']}").status_code == 204
    assert client.delete(f"/webhooks/{dead['id']}").status_code == 404
    assert client.get(f"/webhooks/{dead['id']}/deliveries").status_code == 404
    assert client.post(f"/webhooks/{dead['id']}/test").status_code == 404
    assert [h["id"] for h in client.get("/projects/p/webhooks").json()] == [generated["id"]]


def test_a_disabled_webhook_gets_nothing_until_enabled_again(client, receiver):
    """PATCH /webhooks/{id} pauses a webhook (kept, with its secret and log) and resumes it."""
    quiet = _hook(client, receiver.url + "?quiet")
    loud = _hook(client, receiver.url + "?loud")
    r = client.patch(f"/webhooks/{quiet['id']}", json={"enabled": False})
    assert r.status_code == 200 and r.json()["enabled"] is False and "secret" not in r.json()
    assert {h["id"]: h["enabled"] for h in client.get("/projects/p/webhooks").json()} == {
        quiet["id"]: False,
        loud["id"]: True,
    }
    # Only a JSON boolean: "no" and 0 were read as False (pydantic's lax mode), quietly.
    for bad in ({"enabled": "no"}, {"enabled": 0}, {}, {"enabled": False, "url": "http://x"}):
        assert client.patch(f"/webhooks/{quiet['id']}", json=bad).status_code == 422, bad
    assert client.post("/projects/p/webhooks", json={"url": receiver.url, "enabled": "yes"}).status_code == 422
    assert client.patch("/webhooks/987654", json={"enabled": True}).status_code == 404

    make_run(client)
    post_batches(client, "r", loss_curve(140, spikes=(137,)))  # one alert opens
    receiver.wait_for(lambda rs: len(rs) >= 1)
    assert [r.path for r in receiver.requests] == ["/hook?loud"] and _deliveries(client, quiet["id"]) == []

    assert client.patch(f"/webhooks/{quiet['id']}", json={"enabled": True}).json()["enabled"] is True
    post(client, "r", 140, [float("nan")])  # a critical alert: both hear of it now
    got = receiver.wait_for(lambda rs: len(rs) >= 3)
    assert sorted(r.path for r in got[1:]) == ["/hook?loud", "/hook?quiet"]
    assert all(r.json["alert"]["detector"] == "divergence" for r in got[1:])


@pytest.mark.slow
def test_restart_with_pending_deliveries(server_process, receiver, monkeypatch):
    """The receiver is down while the server is killed and started again: the deliveries
    wait in the store and reach the receiver once both are back."""
    monkeypatch.setenv("STETHOSCOPE_WEBHOOK_BACKOFF_S", "2")
    monkeypatch.setenv("STETHOSCOPE_WEBHOOK_BACKOFF_MAX_S", "2")
    monkeypatch.setenv("STETHOSCOPE_WEBHOOK_TIMEOUT_S", "3")
    monkeypatch.setenv("STETHOSCOPE_OUTBOX_POLL_S", "0.2")
    monkeypatch.setenv("STETHOSCOPE_WEBHOOK_ALLOW_PRIVATE", "1")  # the receiver is on loopback
    receiver.default_status = 500
    sp = server_process().start()
    with httpx.Client(base_url=sp.url + "/api/v1", timeout=30) as c:
        hook = _hook(c, receiver.url)
        alert = _spike(c)
        # "opened" failed once and waits for its retry (not mid-attempt); "resolved" waits
        # behind it (one alert's deliveries go in order), not yet tried.
        wait_until(
            lambda: (
                len([d for d in _deliveries(c, hook["id"]) if d["last_status_code"] == 500]) == 1
                and len(_deliveries(c, hook["id"])) == 2
            )
        )
    sp.kill()
    receiver.default_status = 200
    sp2 = server_process().start()
    got = receiver.wait_for(
        lambda rs: {r.json["event"] for r in rs if r.replied == 200} == {"alert.opened", "alert.resolved"}, timeout=60
    )
    assert all(r.json["alert"]["id"] == alert["id"] and r.signature_ok(SECRET) for r in got)
    with httpx.Client(base_url=sp2.url + "/api/v1", timeout=30) as c:

        def all_delivered():
            log = _deliveries(c, hook["id"])
            return log if all(d["status"] == "delivered" for d in log) else None

        log = wait_until(all_delivered, what="every delivery recorded as delivered")
        assert len(log) == 2 and sorted(d["attempts"] >= 2 for d in log) == [False, True]


def test_two_outbox_workers_never_send_a_delivery_twice(settings, receiver):
    """Two workers (separate engines, as two server processes have) drain one outbox."""
    from stethoscope_server.alerting.outbox import Outbox
    from stethoscope_server.store import Store, migrate
    from stethoscope_server.store import webhooks as W
    from stethoscope_server.store.db import make_engine

    migrate.upgrade(settings.database_url)
    stores = [Store(make_engine(settings)) for _ in range(2)]
    with stores[0].writing() as conn:
        hook = W.create(conn, "p", receiver.url, SECRET, ["warning"], "json", True)
        W.enqueue(
            conn,
            [
                {"webhook_id": hook["id"], "alert_id": None, "payload": {"event": "test", "body": {"n": i}}}
                for i in range(40)
            ],
        )
    outboxes = [Outbox(s, settings) for s in stores]

    def drain(outbox):
        while outbox.deliver_due():
            pass

    threads = [threading.Thread(target=drain, args=(o,)) for o in outboxes for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for o in outboxes:
        o.stop()
    ids = [r.headers["x-stethoscope-delivery"] for r in receiver.requests]
    assert len(ids) == 40 and len(set(ids)) == 40
    assert sorted(r.json["n"] for r in receiver.requests) == list(range(40))
    with stores[0].reading() as conn:
        assert W.pending_count(conn) == 0
    for s in stores:
        s.engine.dispose()


class TestOneAlertsDeliveriesInOrder:
    """A later change of an alert waits for the earlier delivery to the same webhook (delivered
    or finally failed), through retries with backoff and across workers; each says its number."""

    @pytest.fixture
    def settings(self, db_url):
        # A retry 1-2 s after a failure: long after a later change of the alert is due.
        return Settings(
            database_url=db_url,
            outbox_poll_s=0.2,
            stall_check_s=0.2,
            webhook_backoff_s=2.0,
            webhook_backoff_max_s=2.0,
            webhook_max_attempts=4,
            webhook_timeout_s=5,
            webhook_allow_private=True,
        )

    def test_a_receiver_that_fails_opened_once_still_gets_opened_before_resolved(self, client, receiver):
        receiver.statuses[:] = [500]  # the first delivery ("opened") fails once
        hook = _hook(client, receiver.url)
        make_run(client)
        values = loss_curve(160, spikes=(137,))
        (alert,) = post_batches(client, "r", values, last=140)  # opens
        receiver.wait_for(lambda rs: len(rs) >= 1)  # "opened" failed; its retry is 1-2 s away
        post_batches(client, "r", values, first=140)  # resolves: "resolved" is due at once
        got = receiver.wait_for(lambda rs: len([r for r in rs if r.replied == 200]) >= 2)
        assert [(r.json["event"], r.replied) for r in got] == [
            ("alert.opened", 500),
            ("alert.opened", 200),
            ("alert.resolved", 200),
        ]
        assert [r.json["sequence"] for r in got] == [1, 1, 2]
        assert [r.headers["x-stethoscope-sequence"] for r in got] == ["1", "1", "2"]
        assert all(r.json["alert"]["id"] == alert["id"] for r in got)
        log = wait_until(
            lambda: (lambda log: log if all(d["status"] == "delivered" for d in log) else None)(
                _deliveries(client, hook["id"])
            )
        )
        assert [(d["event"], d["attempts"]) for d in log] == [("alert.resolved", 1), ("alert.opened", 2)]

    def test_claims_wait_for_the_earlier_delivery_of_the_same_alert(self, settings, db_url):
        """The claim itself, with an injected clock: a retry waiting for its backoff, a lease held by
        another worker, a final failure; other alerts and webhooks are not held up."""
        from datetime import timedelta
        from types import SimpleNamespace

        from stethoscope_server.store import Store, migrate
        from stethoscope_server.store import alerts as A
        from stethoscope_server.store import runs as R
        from stethoscope_server.store import webhooks as W
        from stethoscope_server.store.db import make_engine
        from stethoscope_server.store.models import utcnow

        migrate.upgrade(settings.database_url)
        store = Store(make_engine(settings))
        t0 = utcnow()
        try:
            with store.writing() as conn:
                R.upsert_run(conn, "r", "p", None, None, None)
                pid = R.ensure_project(conn, "p")
                change = SimpleNamespace(
                    detector="loss_spike",
                    key="loss",
                    severity="warning",
                    start_step=1,
                    peak_step=1,
                    end_step=1,
                    message="m",
                    evidence={},
                    first=None,
                )
                a1, a2 = (
                    A.insert_alert(conn, "r", pid, change),
                    A.insert_alert(conn, "r", pid, SimpleNamespace(**{**vars(change), "key": "x"})),
                )
                h1 = W.create(conn, "p", "http://127.0.0.1:9/a", SECRET, ["warning"], "json", True)["id"]
                h2 = W.create(conn, "p", "http://127.0.0.1:9/b", SECRET, ["warning"], "json", True)["id"]
                rows = [
                    (h1, a1, "opened"),
                    (h2, a1, "opened"),
                    (h1, a2, "opened"),
                    (h1, a1, "resolved"),
                    (h2, a1, "resolved"),
                ]
                ids = W.enqueue(
                    conn, [{"webhook_id": h, "alert_id": a, "payload": {"event": e, "body": {}}} for h, a, e in rows]
                )
            opened1, opened1_h2, opened2, resolved1, resolved1_h2 = ids

            def claim(at):
                with store.writing() as conn:
                    return [r["id"] for r in W.claim_due(conn, t0 + timedelta(seconds=at), 10, lease_s=30)]

            def record(did, status, retry_at=None):
                with store.writing() as conn:
                    W.record(conn, did, status, 500, "HTTP 500", t0 + timedelta(seconds=retry_at) if retry_at else None)

            assert claim(1) == [opened1, opened1_h2, opened2]  # one row per (webhook, alert)
            assert claim(2) == []  # leased by "another worker": resolved still waits
            record(opened1, "pending", retry_at=10)  # failed; retry at t0 + 10 s
            record(opened1_h2, "delivered")
            assert claim(3) == [resolved1_h2]  # the other webhook's order is its own
            assert claim(5) == []  # resolved1 is due, but opened1's retry is not done
            assert claim(11) == [opened1]
            record(opened1, "failed")  # finally failed: the later change goes on
            assert claim(12) == [resolved1]
        finally:
            store.engine.dispose()
