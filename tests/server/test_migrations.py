"""Migrations upgrade an empty database to head and back down, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import inspect

from stethoscope_server.settings import Settings
from stethoscope_server.store import migrate
from stethoscope_server.store.db import make_null_engine
from stethoscope_server.store.models import Base, is_partition

TABLES = set(Base.metadata.tables)


def _tables(url: str) -> set[str]:
    engine = make_null_engine(url)
    try:
        return {t for t in inspect(engine).get_table_names() if not is_partition(t)} - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_from_empty_to_head_and_back(db_url):
    url = Settings(database_url=db_url).database_url
    assert _tables(url) == set()
    migrate.upgrade(url)
    assert _tables(url) == TABLES
    assert migrate.current(url) == migrate.head()
    migrate.downgrade(url, "base")
    assert _tables(url) == set()
    assert migrate.current(url) is None
    migrate.upgrade(url)  # and up again: downgrade left nothing behind that blocks it
    assert _tables(url) == TABLES


def test_models_match_migrations(db_url):
    """The schema changes only through migrations: head must equal the models."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    url = Settings(database_url=db_url).database_url
    migrate.upgrade(url)
    engine = make_null_engine(url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"include_name": lambda name, type_, parent: not (type_ == "table" and is_partition(name or ""))}
        )
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    assert diff == []


def test_cli_db_commands(db_url):
    url = Settings(database_url=db_url).database_url

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "stethoscope_server.cli", "db", *args, "--db", url],
            capture_output=True,
            text=True,
            timeout=120,
        )

    r = cli("upgrade")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(migrate.head())
    r = cli("current")
    assert r.stdout.startswith(migrate.head()), r.stdout
    r = cli("downgrade")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("base (empty)")
    assert _tables(url) == set()


def test_points_are_hash_partitioned_on_postgres(db_url):
    url = Settings(database_url=db_url).database_url
    migrate.upgrade(url)
    engine = make_null_engine(url)
    try:
        with engine.connect() as conn:
            if conn.dialect.name != "postgresql":
                return
            from sqlalchemy import text

            parts = conn.execute(
                text("SELECT count(*) FROM pg_inherits i WHERE i.inhparent = 'points'::regclass")
            ).scalar()
            assert parts == 16
            conn.execute(text("INSERT INTO points VALUES (1, 1, 0.5, 0), (2, 1, 'NaN', 0), (17, 1, 'Infinity', 0)"))
            conn.execute(text("INSERT INTO points VALUES (1, 1, 9.0, 0) ON CONFLICT DO NOTHING"))
            # a read of one series is pruned to one partition
            plan = "\n".join(
                conn.execute(text("EXPLAIN SELECT step, value FROM points WHERE series_id = 1 AND step >= 0")).scalars()
            )
            import re

            assert len(set(re.findall(r"points_p\d+\b", plan))) == 1, plan
            conn.commit()
        migrate.downgrade(url, "0002")  # and back: the data survives both ways
        with engine.connect() as conn:
            from sqlalchemy import text

            assert conn.execute(text("SELECT count(*) FROM points")).scalar() == 3
            assert conn.execute(text("SELECT value FROM points WHERE series_id = 1")).scalar() == 0.5
        migrate.upgrade(url)
        with engine.connect() as conn:
            from sqlalchemy import text

            assert conn.execute(text("SELECT count(*) FROM points")).scalar() == 3
    finally:
        engine.dispose()


def test_0004_keeps_every_point_and_rollup_and_lets_minus_zero_keep_its_sign(db_url):
    """On SQLite, 0004 rebuilds points and rollups with value columns of no affinity: what
    was stored before survives the rebuild (both ways), and after it -0.0 is -0.0."""
    import math

    url = Settings(database_url=db_url).database_url
    migrate.upgrade(url, "0003")
    engine = make_null_engine(url)
    rows = [(1, 0, 1.5, 10.0), (1, 1, None, 11.0), (1, 2, math.inf, 12.0), (2, 0, -math.inf, 13.0), (2, 7, 2.0, 14.0)]
    rollup = (1, 6, 0, -1.25, 3, 8.0, 4, 1, 0, 63)

    def points():
        with engine.connect() as conn:
            return [
                tuple(r) for r in conn.exec_driver_sql("SELECT series_id, step, value, wall FROM points ORDER BY 1, 2")
            ]

    def rollups():
        with engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql("SELECT * FROM rollups")]

    try:
        with engine.begin() as conn:
            ph = ", ".join(["%s" if engine.dialect.name == "postgresql" else "?"] * 4)
            conn.exec_driver_sql(f"INSERT INTO points (series_id, step, value, wall) VALUES ({ph})", rows)
            conn.exec_driver_sql(f"INSERT INTO rollups VALUES ({', '.join([ph.split(', ')[0]] * 10)})", rollup)
        migrate.upgrade(url)
        assert points() == rows and rollups() == [rollup]
        with engine.begin() as conn:
            # bound as a float (an SQL literal -0.0 is numeric, whose zero has no sign)
            conn.exec_driver_sql(
                f"UPDATE points SET value = {ph.split(', ')[0]} WHERE series_id = 2 AND step = 7", (-0.0,)
            )
        assert math.copysign(1.0, points()[-1][2]) == -1.0
        if engine.dialect.name == "sqlite":
            with engine.connect() as conn:
                assert {r[1]: r[2] for r in conn.exec_driver_sql("PRAGMA table_info(points)")}["value"] == "BLOB"
                # still WITHOUT ROWID: the key is the storage order
                assert (
                    "WITHOUT ROWID"
                    in conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'points'").scalar()
                )
        migrate.downgrade(url, "0003")
        assert points()[:-1] == rows[:-1] and rollups() == [rollup]
    finally:
        engine.dispose()


def test_0005_numbers_existing_alerts_and_keeps_the_open_episode_index(db_url):
    """0005 adds alerts.change_seq (1 for an open alert, 2 for a resolved one: opened and
    resolved) and the delivery-order index; downgrading drops both and nothing else."""
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    url = Settings(database_url=db_url).database_url
    migrate.upgrade(url, "0004")
    engine = make_null_engine(url)
    alert = (
        "INSERT INTO alerts (id, run_id, project_id, detector, key, severity, status, message, evidence, opened_at) "
        "VALUES (:id, 'r', 1, 'loss_spike', 'loss', 'warning', :status, 'm', '{}', CURRENT_TIMESTAMP)"
    )

    def indexes():
        return {i["name"] for i in inspect(engine).get_indexes("alerts")} | {
            i["name"] for i in inspect(engine).get_indexes("webhook_deliveries")
        }

    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO projects (id, name, created_at) VALUES (1, 'p', CURRENT_TIMESTAMP)"))
            conn.execute(
                text(
                    "INSERT INTO runs (id, project_id, name, status, config, tags, created_at, updated_at) "
                    "VALUES ('r', 1, 'r', 'running', '{}', '[]', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
            conn.execute(text(alert), [{"id": 1, "status": "resolved"}, {"id": 2, "status": "open"}])
        before = indexes()
        migrate.upgrade(url, "0005")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT id, change_seq FROM alerts ORDER BY id")).all() == [(1, 2), (2, 1)]
        assert indexes() == before | {"ix_deliveries_alert"}
        migrate.downgrade(url, "0004")
        assert indexes() == before
        assert "change_seq" not in {c["name"] for c in inspect(engine).get_columns("alerts")}
        with engine.begin() as conn, pytest.raises(IntegrityError):  # one open alert per episode, still
            conn.execute(text(alert), [{"id": 3, "status": "open"}])
    finally:
        engine.dispose()


def test_0006_adds_first_detection_and_cause_keeping_alerts_deliveries_and_indexes(db_url):
    """0006 adds alerts.first_detection and alerts.cause_alert_id (a foreign key to alerts, ON
    DELETE SET NULL, indexed). SQLite rebuilds the table both ways: alert rows and ids, the
    webhook deliveries that point at them, the other indexes and the one-open-alert-per-episode
    rule all survive the upgrade and the downgrade."""
    import json

    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    url = Settings(database_url=db_url).database_url
    migrate.upgrade(url, "0005")
    engine = make_null_engine(url)
    alert = (
        "INSERT INTO alerts (id, run_id, project_id, detector, key, severity, status, message, evidence, opened_at, "
        "change_seq) VALUES (:id, 'r', 1, :detector, 'loss', 'warning', :status, 'm', '{}', CURRENT_TIMESTAMP, :seq)"
    )

    def indexes():
        return {i["name"] for i in inspect(engine).get_indexes("alerts")}

    def rows():
        with engine.connect() as conn:
            alerts = conn.execute(text("SELECT id, detector, status, change_seq FROM alerts ORDER BY id")).all()
            deliveries = conn.execute(text("SELECT id, alert_id FROM webhook_deliveries ORDER BY id")).all()
            return alerts, deliveries

    def enforcing(conn):
        if conn.dialect.name == "sqlite":  # the server's connections turn foreign keys on; this one is plain
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")
        return conn

    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO projects (id, name, created_at) VALUES (1, 'p', CURRENT_TIMESTAMP)"))
            conn.execute(
                text(
                    "INSERT INTO runs (id, project_id, name, status, config, tags, created_at, updated_at) "
                    "VALUES ('r', 1, 'r', 'running', '{}', '[]', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
            conn.execute(
                text(alert),
                [
                    {"id": 1, "detector": "divergence", "status": "resolved", "seq": 2},
                    {"id": 2, "detector": "loss_spike", "status": "open", "seq": 1},
                    {"id": 3, "detector": "softmax_collapse", "status": "open", "seq": 1},
                ],
            )
            conn.execute(
                text(
                    "INSERT INTO webhooks (id, project_id, url, secret, severities, format, enabled, created_at) "
                    "VALUES (1, 1, 'http://127.0.0.1:9/h', 'secret', '[]', 'json', true, CURRENT_TIMESTAMP)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO webhook_deliveries (id, webhook_id, alert_id, payload, status, attempts, "
                    "next_attempt_at, created_at) VALUES (:id, 1, :alert, '{}', 'delivered', 1, "
                    "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                ),
                [{"id": 1, "alert": 1}, {"id": 2, "alert": 1}, {"id": 3, "alert": 2}],
            )
        before, before_rows = indexes(), rows()
        migrate.upgrade(url, "0006")
        assert rows() == before_rows
        assert indexes() == before | {"ix_alerts_cause_alert_id"}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT first_detection, cause_alert_id FROM alerts")).all() == [(None, None)] * 3
        with enforcing(engine.connect()) as conn:
            conn.execute(text("UPDATE alerts SET cause_alert_id = 1 WHERE id IN (2, 3)"))
            conn.execute(text("UPDATE alerts SET first_detection = '{\"step\": 5}' WHERE id = 2"))
            conn.commit()
            with pytest.raises(IntegrityError):  # a cause must be an alert
                conn.execute(text("UPDATE alerts SET cause_alert_id = 99 WHERE id = 3"))
            conn.rollback()
            conn.execute(text("DELETE FROM alerts WHERE id = 1"))  # a root goes: its consequences become roots
            conn.commit()
            assert conn.execute(text("SELECT id, cause_alert_id FROM alerts ORDER BY id")).all() == [
                (2, None),
                (3, None),
            ]
            first = conn.execute(text("SELECT first_detection FROM alerts WHERE id = 2")).scalar()
            assert (json.loads(first) if isinstance(first, str) else first) == {"step": 5}  # text on SQLite
            conn.execute(text("UPDATE alerts SET cause_alert_id = 2 WHERE id = 3"))
            conn.commit()
        with engine.begin() as conn, pytest.raises(IntegrityError):  # one open alert per episode, still
            conn.execute(text(alert), [{"id": 4, "detector": "loss_spike", "status": "open", "seq": 1}])

        kept = rows()
        migrate.downgrade(url, "0005")
        assert rows() == kept and len(kept[1]) == 1  # the deliveries of alert 1 went with it, the rest stayed
        assert indexes() == before
        assert {"first_detection", "cause_alert_id"}.isdisjoint(
            c["name"] for c in inspect(engine).get_columns("alerts")
        )
        with engine.begin() as conn, pytest.raises(IntegrityError):
            conn.execute(text(alert), [{"id": 4, "detector": "loss_spike", "status": "open", "seq": 1}])
        migrate.upgrade(url)  # and up again
        assert indexes() == before | {"ix_alerts_cause_alert_id"} and rows() == kept
    finally:
        engine.dispose()
