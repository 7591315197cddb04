"""``Store.overview``: the dashboard's reads, behind the store (both databases)."""

from __future__ import annotations

import math

import pytest

from stethoscope_server.alerting import Alerting
from stethoscope_server.store import NotFound, SeriesBatch, migrate
from stethoscope_server.store.db import make_engine


@pytest.fixture
def store(settings):
    migrate.upgrade(settings.database_url)
    engine = make_engine(settings)
    yield Alerting(settings).make_store(engine)  # the detectors run in each ingest, as in the app
    engine.dispose()


def _batch(name: str, values: list[float]) -> SeriesBatch:
    return SeriesBatch(name, list(range(len(values))), values, [0.0] * len(values))


def test_overview_reads_alerts_health_names_and_last_values(store):
    store.upsert_run("r1", "p", name="sick")
    store.upsert_run("r2", "q", name="well")
    store.ingest("r1", [_batch("loss", [2.0, 1.9, math.nan]), _batch("lr", [0.1, 0.1, 0.1])])
    store.ingest("r2", [_batch("loss", [2.0, 1.5, 1.25])])
    ov = store.overview

    alerts = ov.alerts(project="p")
    assert alerts and {a["run_id"] for a in alerts} == {"r1"}
    a = alerts[0]
    assert (a["project"], a["run_name"], a["status"], a["severity"]) == ("p", "sick", "open", "critical")
    assert a["opened_at"].tzinfo is not None  # the API's shape: aware times, formatted by the pages
    assert ov.alerts(project="q") == [] and ov.alerts(run_id="r2") == []
    assert ov.alerts(project="p", status="resolved") == []

    assert ov.run_health(["r1", "r2"]) == {"r1": {"severity": "critical", "open": len(alerts)}}
    assert ov.run_health([]) == {}
    assert ov.series_names("r1") == ["loss", "lr"]
    assert ov.series_names_of_runs(["r1", "r2"]) == ["loss", "lr"] and ov.series_names_of_runs([]) == []

    last = ov.last_values(["r1", "r2"], ("loss", "grad/norm"))
    assert set(last) == {"r1", "r2"} and math.isnan(last["r1"]["loss"]) and last["r2"] == {"loss": 1.25}


def test_the_continual_summary_the_dashboard_reads_is_the_apis(store):
    store.upsert_run("r1", "p")
    store.ingest("r1", [_batch("eval/acc/0", [0.5, 0.9])])
    body = store.continual_summary("r1", max_points=100)
    assert body["run_id"] == "r1" and "series" in body
    with pytest.raises(NotFound):
        store.continual_summary("ghost")
