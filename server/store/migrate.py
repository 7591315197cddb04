"""Apply, undo and show the Alembic migrations (``stethoscope db upgrade|downgrade|current``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from .db import make_null_engine

#: Key of the PostgreSQL advisory lock that lets one of several starting workers migrate.
_PG_LOCK_KEY = 0x5737E7


def _script_location() -> str:
    import stethoscope_server.migrations as m

    return str(Path(m.__file__).parent)


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", _script_location())
    return cfg


def _with_connection(engine: Engine, fn) -> None:
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
            conn.commit()
        try:
            cfg = _config()
            cfg.attributes["connection"] = conn
            fn(cfg)
            conn.commit()
        finally:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                conn.commit()


def upgrade(url: str, revision: str = "head") -> None:
    engine = make_null_engine(url)
    try:
        _with_connection(engine, lambda cfg: command.upgrade(cfg, revision))
    finally:
        engine.dispose()


def downgrade(url: str, revision: str = "base") -> None:
    engine = make_null_engine(url)
    try:
        _with_connection(engine, lambda cfg: command.downgrade(cfg, revision))
    finally:
        engine.dispose()


def current(url: str) -> str | None:
    engine = make_null_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head() -> str | None:
    return ScriptDirectory.from_config(_config()).get_current_head()
