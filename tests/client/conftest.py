"""Client test fixtures: SQLite-only servers, a private spool, and no swallowed errors.

The hook swallows its own failures so that training never stops because of it; here every
swallowed internal error fails the test that caused it (sentry-python's autouse fixture).
"""

from __future__ import annotations

import pytest

from stethoscope import _attach, _errors


@pytest.fixture
def db_url(tmp_path):
    # The store's own tests cover PostgreSQL; the hook's tests need one real server, not two.
    return f"sqlite:///{tmp_path / 'stethoscope.db'}"


@pytest.fixture(autouse=True)
def internal_errors():
    """Collects internal errors swallowed during the test; any of them fails it."""
    seen: list = []

    def listener(where, exc):
        seen.append((where, exc))

    _errors.add_listener(listener)
    yield seen
    _errors.remove_listener(listener)
    if seen and not getattr(seen, "expected", False):
        where, exc = seen[0]
        pytest.fail(f"{len(seen)} internal error(s) swallowed by the hook; first in {where}: {exc!r}")


@pytest.fixture(autouse=True)
def private_dirs(tmp_path, monkeypatch):
    """Spool under the test's directory; no server or kill switch from the environment."""
    monkeypatch.setenv("STETHOSCOPE_DIR", str(tmp_path / "home"))
    monkeypatch.delenv("STETHOSCOPE_SERVER", raising=False)
    monkeypatch.delenv("STETHOSCOPE_DISABLED", raising=False)
    monkeypatch.delenv("STETHOSCOPE_TOKEN", raising=False)
    yield tmp_path / "home"
    for mon in list(_attach._open):  # a test that failed half-way leaves its monitor open
        mon.close(timeout=2.0)
