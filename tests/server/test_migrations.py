"""Migrations upgrade an empty database to head and back down, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys

from sqlalchemy import inspect

from stethoscope_server import migrate
from stethoscope_server.db import make_null_engine
from stethoscope_server.models import Base, is_partition
from stethoscope_server.settings import Settings

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
        ctx = MigrationContext.configure(conn, opts={"include_name": lambda name, type_, parent: not (type_ == "table" and is_partition(name or ""))})
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    assert diff == []


def test_cli_db_commands(db_url):
    url = Settings(database_url=db_url).database_url

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "stethoscope_server.cli", "db", *args, "--db", url], capture_output=True, text=True, timeout=120)

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

            parts = conn.execute(text("SELECT count(*) FROM pg_inherits i WHERE i.inhparent = 'points'::regclass")).scalar()
            assert parts == 16
            conn.execute(text("INSERT INTO points VALUES (1, 1, 0.5, 0), (2, 1, 'NaN', 0), (17, 1, 'Infinity', 0)"))
            conn.execute(text("INSERT INTO points VALUES (1, 1, 9.0, 0) ON CONFLICT DO NOTHING"))
            # a read of one series is pruned to one partition
            plan = "\n".join(conn.execute(text("EXPLAIN SELECT step, value FROM points WHERE series_id = 1 AND step >= 0")).scalars())
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
