"""Alembic environment. The URL comes from the settings (STETHOSCOPE_DATABASE_URL) unless the
caller hands over a connection (``stethoscope_server.store.migrate`` does)."""

from __future__ import annotations

from alembic import context

from stethoscope_server.store.models import Base, is_partition

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
        compare_type=True,
        include_name=include_name,
    )
    with context.begin_transaction():
        context.run_migrations()


def include_name(name, type_, parent_names) -> bool:
    """What autogenerate compares: everything but the partitions of ``points``."""
    return not (type_ == "table" and name is not None and is_partition(name))


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from stethoscope_server.settings import Settings
    from stethoscope_server.store.db import make_null_engine

    engine = make_null_engine(Settings().database_url)
    with engine.connect() as conn:
        _run(conn)


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
