"""Incidents through real ingest, on both databases, with a real webhook receiver: one incident
is one page (its root's), consequences point at their root and nest under it in
``/incidents``; a root that opens later adopts an alert; an episode that comes back soon
reopens its row (``alert.reopened``, only to webhooks that heard of it); an alert keeps its
first detection while its peak moves."""

from __future__ import annotations

import math
import re

import pytest
from _alert_helpers import loss_curve, make_run, no_internal_errors, post, post_batches, wait_until  # noqa: F401
from webhook_receiver import Receiver

from stethoscope.core.wire import encode_values
from stethoscope_server.settings import Settings

SECRET = "s3cret-for-incidents"
#: Steps of the incident runs, posted in batches of 20 as a hook ships them.
N, BATCH = 320, 20


@pytest.fixture
def settings(db_url):
    # The receiver is on loopback: private targets allowed.
    return Settings(database_url=db_url, outbox_poll_s=0.2, stall_check_s=0.2, webhook_allow_private=True)


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def _hook(client, url, **body):
    r = client.post("/projects/p/webhooks", json={"url": url, "secret": SECRET, **body})
    assert r.status_code == 201, r.text
    return r.json()


def _deliveries(client, hook_id) -> list[dict]:
    """The webhook's delivery log, oldest first. Deliveries are written in the transaction that
    changes the alert, so once an ingest has replied, its deliveries are all here."""
    r = client.get(f"/webhooks/{hook_id}/deliveries")
    assert r.status_code == 200, r.text
    return r.json()[::-1]


def _get(client, path):
    r = client.get(path)
    assert r.status_code == 200, r.text
    return r.json()


def _run(loss_nan: range, sc_high: range, spikes: tuple = ()) -> dict[str, list[float]]:
    """A run's series: a noisy falling loss (NaN over ``loss_nan``, 40 at ``spikes``), a calm
    gradient norm, and the Softmax Collapse fraction at 0.9 over ``sc_high``."""
    loss = loss_curve(N, spikes=spikes, nans=tuple(loss_nan))
    return {
        "loss": loss,
        "grad/norm": [1.0] * N,
        "logits/sc_fraction": [0.9 if s in sc_high else 0.0 for s in range(N)],
    }


def _post(client, series: dict[str, list[float]], first: int, last: int) -> list[list[dict]]:
    """Post steps [first, last) of every series, a batch at a time; the alerts of each reply."""
    replies = []
    for a in range(first, last, BATCH):
        b = min(a + BATCH, last)
        body = {
            "series": [
                {"name": name, "steps": list(range(a, b)), "values": encode_values(vs[a:b])}
                for name, vs in series.items()
            ]
        }
        r = client.post("/runs/r/points", json=body)
        assert r.status_code == 200, r.text
        replies.append(r.json()["alerts"])
    return replies


def test_an_incident_is_paged_once_by_its_root_and_nests_its_consequences(client, receiver):
    """A loss spike, then the loss goes NaN while 90% of the samples are in Softmax Collapse:
    three alerts, one incident, one page (the divergence), which names the other two."""
    hook = _hook(client, receiver.url)
    slack = _hook(client, receiver.url + "?slack", format="slack")
    make_run(client)
    series = _run(loss_nan=range(206, 260), sc_high=range(170, 240), spikes=(203, 204))
    replies = _post(client, series, 0, 220)
    assert replies[:-1] == [[]] * 10  # steps 0-199: healthy
    div, spike, sc = replies[-1]  # the reply of steps 200-219 lists the three, each with its cause
    assert [(a["detector"], a["severity"], a["cause_alert_id"]) for a in (div, spike, sc)] == [
        ("divergence", "critical", None),
        ("loss_spike", "warning", div["id"]),
        ("softmax_collapse", "critical", div["id"]),
    ]
    # Softmax Collapse shows from 170 and is an alert once it held 30 steps (min_steps).
    assert div["first_detection"]["step"] == 206 and sc["first_detection"]["step"] == 200

    alerts = {a["id"]: a for a in _get(client, "/runs/r/alerts")}
    assert {i: a["cause_alert_id"] for i, a in alerts.items()} == {
        div["id"]: None,
        spike["id"]: div["id"],
        sc["id"]: div["id"],
    }
    (incident,) = _get(client, "/runs/r/incidents")
    assert incident["id"] == div["id"] and incident["detector"] == "divergence"
    assert incident["consequences"] == [alerts[spike["id"]], alerts[sc["id"]]]

    # One page per webhook: the root's, listing what it explains.
    (opened,) = _deliveries(client, hook["id"])
    assert (opened["event"], opened["alert_id"]) == ("alert.opened", div["id"])
    body = opened["body"]
    assert body["alert"]["first_detection"]["step"] == 206
    assert [(c["id"], c["detector"], c["severity"]) for c in body["consequences"]] == [
        (spike["id"], "loss_spike", "warning"),
        (sc["id"], "softmax_collapse", "critical"),
    ]
    (slack_opened,) = _deliveries(client, slack["id"])
    text = slack_opened["body"]["text"]
    assert text.startswith("Training diverged at step 206: loss is NaN.")
    assert f"Also explains 2 alerts: loss_spike #{spike['id']}, softmax_collapse #{sc['id']}" in text

    # Everything clears: only the root's resolution is sent.
    _post(client, series, 220, N)
    assert {a["status"] for a in _get(client, "/runs/r/alerts")} == {"resolved"}
    for h in (hook, slack):
        assert [(d["event"], d["alert_id"]) for d in _deliveries(client, h["id"])] == [
            ("alert.opened", div["id"]),
            ("alert.resolved", div["id"]),
        ]
    got = receiver.wait_for(lambda rs: len(rs) >= 4)
    assert sorted((r.path, r.headers["x-stethoscope-event"]) for r in got) == [
        ("/hook", "alert.opened"),
        ("/hook", "alert.resolved"),
        ("/hook?slack", "alert.opened"),
        ("/hook?slack", "alert.resolved"),
    ]
    assert all(r.signature_ok(SECRET) for r in got)
    assert _get(client, "/runs/r/incidents?status=open") == []
    assert [i["id"] for i in _get(client, "/runs/r/incidents?status=resolved")] == [div["id"]]
    assert client.get("/runs/nope/incidents").status_code == 404


def test_a_root_that_opens_later_adopts_an_alert_that_was_paged(client, receiver):
    """Softmax Collapse opens alone (a root, paged); the loss goes NaN a batch later: the
    divergence adopts it. Its later changes are not paged; its resolution reaches the webhook
    that heard of its opening, so nothing stays open there."""
    hook = _hook(client, receiver.url)
    make_run(client)
    series = _run(loss_nan=range(225, 260), sc_high=range(170, 250))  # an alert from 200 (min_steps)
    (sc,) = _post(client, series, 0, 220)[-1]
    assert (sc["detector"], sc["cause_alert_id"]) == ("softmax_collapse", None)
    (div,) = _post(client, series, 220, 240)[0]
    assert (div["detector"], div["cause_alert_id"]) == ("divergence", None)
    adopted = {a["id"]: a for a in _get(client, "/runs/r/alerts")}[sc["id"]]
    assert adopted["cause_alert_id"] == div["id"] and adopted["status"] == "open"
    (incident,) = _get(client, "/runs/r/incidents")
    assert (incident["id"], [c["id"] for c in incident["consequences"]]) == (div["id"], [sc["id"]])

    log = _deliveries(client, hook["id"])
    assert [(d["event"], d["alert_id"]) for d in log] == [("alert.opened", sc["id"]), ("alert.opened", div["id"])]
    assert "consequences" not in log[0]["body"]
    assert [c["id"] for c in log[1]["body"]["consequences"]] == [sc["id"]]

    _post(client, series, 240, N)
    assert [(d["event"], d["alert_id"], d["body"]["sequence"]) for d in _deliveries(client, hook["id"])[2:]] == [
        ("alert.resolved", sc["id"], 2),
        ("alert.resolved", div["id"], 2),
    ]


def test_an_episode_that_comes_back_soon_reopens_its_alert(client, receiver):
    """A NaN loss at steps 40-41 resolves at 46; +inf in the gradient norm at step 81 (within
    the divergence's rejoin_steps) continues the episode: the same row, reopened, and an
    ``alert.reopened`` delivery to the webhook that heard of it, in order, numbered. A webhook
    created after that alert opened does not hear of the reopening."""
    early = _hook(client, receiver.url)
    make_run(client)
    (opened,) = post_batches(client, "r", loss_curve(80, nans=(40, 41)))
    late = _hook(client, receiver.url + "?late", severities=["critical"])
    (back,) = post(client, "r", 80, [1.0, math.inf], name="grad/norm")["alerts"]
    assert (back["id"], back["status"], back["start_step"], back["cause_alert_id"]) == (opened["id"], "open", 40, None)
    (alert,) = _get(client, "/runs/r/alerts")
    assert alert["id"] == opened["id"] and alert["resolved_at"] is None and alert["end_step"] == 81

    assert [(d["event"], d["body"]["sequence"]) for d in _deliveries(client, early["id"])] == [
        ("alert.opened", 1),
        ("alert.resolved", 2),
        ("alert.reopened", 3),
    ]
    assert _deliveries(client, late["id"]) == []
    got = receiver.wait_for(lambda rs: len(rs) >= 3)
    assert [(r.path, r.json["event"], r.headers["x-stethoscope-sequence"]) for r in got] == [
        ("/hook", "alert.opened", "1"),
        ("/hook", "alert.resolved", "2"),
        ("/hook", "alert.reopened", "3"),
    ]
    assert got[2].json["alert"]["status"] == "open" and got[2].json["alert"]["id"] == opened["id"]


def test_an_alert_keeps_its_first_detection_while_its_peak_moves(client, receiver):
    """A loss jump to 12 at step 137 opens the alert (told 2 steps later: loss_spike.delay_steps);
    a jump to 40 at step 140, in the same
    episode, moves its peak and message; the first detection stays, in the API and in the
    webhook payloads (Slack says it beside the peak)."""
    slack = _hook(client, receiver.url, format="slack")
    make_run(client)
    values = loss_curve(200)
    values[137], values[140] = 12.0, 40.0
    (alert,) = post_batches(client, "r", values, 0, 140)
    first = alert["first_detection"]
    assert first["step"] == 137 and first["severity"] == "warning" and first["message"] == alert["message"]
    assert first["evidence"]["value"] == 12.0 and alert["peak_step"] == 137

    post_batches(client, "r", values, 140, 141)
    (moved,) = _get(client, "/runs/r/alerts")
    assert moved["status"] == "open" and moved["peak_step"] == 140 and moved["evidence"]["value"] == 40.0
    assert "at step 140" in moved["message"] and moved["message"] != first["message"]
    assert moved["first_detection"] == first

    post_batches(client, "r", values, 141, 200)
    (done,) = _get(client, "/runs/r/alerts")
    assert done["status"] == "resolved" and done["first_detection"] == first and done["peak_step"] == 140
    opened, resolved = (d["body"] for d in _deliveries(client, slack["id"]))
    assert "First detected" not in opened["text"]  # the first detection is the peak then
    said = re.escape(first["message"].split(". ")[0])
    assert re.search(rf"First detected at step 137 \(warning\): {said}\.", resolved["text"]), resolved["text"]
    assert re.search(rf"First detected at step 137 \(warning\): {said}\.", resolved["blocks"][0]["text"]["text"])
    wait_until(lambda: len(receiver.requests) >= 2, what="both deliveries")


def test_the_incident_view_and_the_new_alert_fields_are_in_the_openapi_schema(live_server):
    import httpx

    schema = httpx.get(live_server.url + "/openapi.json").raise_for_status().json()
    op = schema["paths"]["/api/v1/runs/{run_id}/incidents"]["get"]
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["items"]["$ref"].endswith("/IncidentOut")
    parts = schema["components"]["schemas"]
    assert {"first_detection", "cause_alert_id"} <= set(parts["AlertOut"]["properties"])
    assert parts["IncidentOut"]["properties"]["consequences"]["items"]["$ref"].endswith("/AlertOut")
    assert {"step", "severity", "message", "evidence"} <= set(parts["FirstDetection"]["properties"])


def test_a_consequence_that_turns_critical_is_paged_as_its_own_root(client, receiver):
    """A real training whose one layer's gradient explodes alone (a max-norm constraint far below
    its norm): the layer is paged; the gradient norm running away after it is that layer's
    consequence (not paged). Then the loss goes NaN during the runaway: the divergence turns
    critical and stops being a consequence: it is paged as a root ("alert.opened" to a webhook
    that never heard of it), and the layer's alert becomes its consequence."""
    pytest.importorskip("torch")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "client"))
    import _corpus_runs_layers as LY

    pts = LY.layers(kind="maxnorm", init_scale=30.0, factor=0.001, steps=1000, seed=0)
    series: dict[str, dict[int, float]] = {}
    for name, step, v in pts:
        if step <= 434:
            series.setdefault(name, {})[step] = v
    series["loss"][435] = series["grad/norm"][435] = math.nan
    hook = _hook(client, receiver.url)
    make_run(client)
    # the runaway opens (step 432) in one batch, the NaN comes in the next
    cuts = [*range(0, 420, BATCH), 420, 434, 436]
    for a, b in zip(cuts, cuts[1:]):
        body = {"series": []}
        for name, vals in series.items():
            steps = [s for s in range(a, b) if s in vals]
            if steps:
                body["series"].append({"name": name, "steps": steps, "values": encode_values([vals[s] for s in steps])})
        r = client.post("/runs/r/points", json=body)
        assert r.status_code == 200, r.text
        if b == 434:  # the runaway is open, the layer's consequence
            now = {a["detector"]: a for a in _get(client, "/runs/r/alerts")}
            assert (now["divergence"]["severity"], now["divergence"]["cause_alert_id"]) == (
                "warning",
                now["layer_gradients"]["id"],
            )
    alerts = {a["detector"]: a for a in _get(client, "/runs/r/alerts")}
    layer, div = alerts["layer_gradients"], alerts["divergence"]
    # the run blowing up is now the incident: the layer's explosion is listed under it
    assert (div["severity"], div["cause_alert_id"], layer["cause_alert_id"]) == ("critical", None, div["id"])
    # the webhook never heard of the divergence while it was a consequence: it hears of it as opened
    log = _deliveries(client, hook["id"])
    assert [(d["event"], d["alert_id"]) for d in log] == [("alert.opened", layer["id"]), ("alert.opened", div["id"])]
    assert log[1]["body"]["alert"]["severity"] == "critical"
    assert [c["id"] for c in log[1]["body"]["consequences"]] == [layer["id"]]
