"""Issue 15: the store owns every SQL statement, and the detector runner routes each point once.

The boundary test reads the server's source (no database): outside ``server/store/`` no module
may build a SQLAlchemy statement, run one, import Alembic, or hold SQL text. The routing test
runs a real ingest through the detector runner on both databases.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[2] / "server"
STORE = SERVER / "store"

#: What code outside the store may take from SQLAlchemy: types to annotate with, and the
#: pool's event hook (the outbox wakes when a connection that enqueued deliveries is returned).
ALLOWED_SQLALCHEMY = {"Connection", "Engine", "event"}
#: Calls that run a statement.
RUNNERS = {"execute", "exec_driver_sql", "scalar", "scalars"}
SQL_TEXT = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|DROP|WITH)\s", re.MULTILINE)


def _outside_store() -> list[Path]:
    return sorted(p for p in SERVER.rglob("*.py") if STORE not in p.parents)


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(SERVER.parent)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            out += [
                f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in ("sqlalchemy", "alembic")
            ]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            root = node.module.split(".")[0]
            names = {a.name for a in node.names}
            if root == "alembic" or (
                root == "sqlalchemy" and (node.module != "sqlalchemy" or names - ALLOWED_SQLALCHEMY)
            ):
                out.append(f"{where}: from {node.module} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in RUNNERS:
            out.append(f"{where}: .{node.func.attr}(...)")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL_TEXT.search(node.value):
            out.append(f"{where}: SQL text {node.value[:40]!r}")
    return out


def test_no_sql_outside_the_store():
    files = _outside_store()
    assert SERVER / "auth" / "access.py" in files and SERVER / "alerting" / "detector_runner.py" in files
    found = [v for p in files for v in _violations(p)]
    assert found == [], "SQL outside server/store/ (put it behind Store):\n" + "\n".join(found)


def test_the_boundary_check_sees_sql(tmp_path):
    """The checker itself: each kind of statement it must catch, caught."""
    src = tmp_path / "bad.py"
    src.write_text(
        "from sqlalchemy import Connection, select\n"
        "import sqlalchemy\n"
        "from alembic.runtime.migration import MigrationContext\n"
        "def f(conn: Connection):\n"
        "    conn.execute(select(1))\n"
        "    conn.exec_driver_sql('SELECT 1')\n"
    )
    global SERVER
    old, SERVER = SERVER, tmp_path
    try:
        kinds = [v.split(": ", 1)[1] for v in _violations(src)]
    finally:
        SERVER = old
    assert kinds == [
        "from sqlalchemy import Connection, select",
        "import sqlalchemy",
        "from alembic.runtime.migration import MigrationContext",
        ".execute(...)",
        ".exec_driver_sql(...)",
        "SQL text 'SELECT 1'",
    ]


# -- each point routed once ----------------------------------------------------------------------


@pytest.fixture
def store(settings):
    from stethoscope_server.alerting.detector_runner import DetectorRunner
    from stethoscope_server.store import Store, migrate
    from stethoscope_server.store.db import make_engine

    migrate.upgrade(settings.database_url)
    engine = make_engine(settings)
    runner = DetectorRunner(settings)
    yield Store(engine, on_points=runner), runner
    engine.dispose()


def test_ingest_routes_each_series_once(store, monkeypatch):
    """Which detectors a series feeds is decided once per series, in ``DetectorSet.route``: the
    runner does not route again (it did, and ``DetectorSet.update`` then routed every point)."""
    from stethoscope.core.detectors import DETECTORS, DetectorSet
    from stethoscope_server.store import SeriesBatch

    store, runner = store
    names = ["loss", "grad/norm", "metric/unrouted"]
    steps = list(range(50))
    # Points each detector should get: 50 per series it takes (asked before counting starts).
    expected = {d.name: 50 * sum(d.accepts(n) for n in names) for d in DetectorSet().detectors}
    expected = {d: n for d, n in expected.items() if n}
    assert expected and "metric/unrouted" not in str(expected)

    asked: Counter = Counter()
    for cls in DETECTORS.values():
        original = cls.accepts

        def accepts(self, series, _original=original):
            asked[(self.name, series)] += 1
            return _original(self, series)

        monkeypatch.setattr(cls, "accepts", accepts)
    routes: list[list[str]] = []
    fed: list[dict[str, int]] = []
    route, feed = DetectorSet.route, DetectorSet.feed

    def counting_route(self, series):
        series = list(series)
        routes.append([name for name, _, _ in series])
        return route(self, series)

    def counting_feed(self, state, routed):
        fed.append({d: len(pts) for d, pts in routed.items()})
        return feed(self, state, routed)

    monkeypatch.setattr(DetectorSet, "route", counting_route)
    monkeypatch.setattr(DetectorSet, "feed", counting_feed)

    store.upsert_run("r", "p")
    result = store.ingest("r", [SeriesBatch(n, steps, [1.0 + 0.01 * s for s in steps], [0.0] * 50) for n in names])
    assert result.inserted == 150 and runner.errors == 0
    assert routes == [names]  # the batch routed once
    enabled = {d.name for d in DetectorSet().detectors}
    assert asked == Counter({(d, n): 1 for d in enabled for n in names})  # each detector asked of each series once
    assert fed == [expected]  # and the routed points fed once, each to the detectors that take it

    # A second batch of the same series: routes are remembered, no detector is asked again.
    asked.clear()
    store.ingest("r", [SeriesBatch(n, [50], [1.0], [0.0]) for n in names])
    assert asked == Counter() and len(routes) == 2 and len(fed) == 2
