"""Migrations upgrade an empty database to head and back down, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys

from sqlalchemy import inspect

from stethoscope_server import migrate
from stethoscope_server.db import make_null_engine
from stethoscope_server.models import Base
from stethoscope_server.settings import Settings

TABLES = set(Base.metadata.tables)


def _tables(url: str) -> set[str]:
    engine = make_null_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
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
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
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
