"""What the store's plain-SQL statements (``exec_driver_sql``, the hot paths) share."""

from __future__ import annotations


def placeholder(dialect: str) -> str:
    """The DB-API parameter marker of a SQLAlchemy dialect name: psycopg's ``%s`` on
    ``postgresql``, ``?`` (sqlite3's qmark style) on ``sqlite``.

    >>> placeholder("postgresql"), placeholder("sqlite")
    ('%s', '?')
    """
    return "%s" if dialect == "postgresql" else "?"
