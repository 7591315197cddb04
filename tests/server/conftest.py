"""Fixtures of the server tests."""

from __future__ import annotations

import pytest

from stethoscope_server.alerting import Alerting
from stethoscope_server.store import migrate
from stethoscope_server.store.db import make_engine


@pytest.fixture
def detecting_store(settings):
    """A migrated store whose ingest runs the detectors, as in the server; no detector may
    have failed by the end of the test."""
    migrate.upgrade(settings.database_url)
    engine = make_engine(settings)
    alerting = Alerting(settings)
    store = alerting.make_store(engine)
    yield store
    assert alerting.runner.errors == 0
    engine.dispose()
