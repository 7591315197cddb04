"""SQLite: metric value columns without type affinity, so -0.0 keeps its sign

Revision ID: 0004
Revises: 0003

A column of REAL affinity (points.value, rollups.min_value and max_value were DOUBLE) writes
an integral float as an integer: -0.0 came back as 0.0. SQLite cannot change a column's
type, so both tables are rebuilt with those columns declared BLOB (no affinity: a float is
kept as its 8 bytes) and their rows copied. PostgreSQL's DOUBLE PRECISION keeps the sign
already: nothing changes there.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _points(name: str, value) -> None:
    op.create_table(
        name,
        sa.Column("series_id", sa.BigInteger(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("value", value, nullable=True),
        sa.Column("wall", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("series_id", "step"),
        sqlite_with_rowid=False,
    )


def _rollups(name: str, value) -> None:
    op.create_table(
        name,
        sa.Column("series_id", sa.BigInteger(), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("min_value", value, nullable=True),
        sa.Column("min_step", sa.BigInteger(), nullable=True),
        sa.Column("max_value", value, nullable=True),
        sa.Column("max_step", sa.BigInteger(), nullable=True),
        sa.Column("nan_step", sa.BigInteger(), nullable=True),
        sa.Column("first_step", sa.BigInteger(), nullable=False),
        sa.Column("last_step", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("series_id", "level", "bucket"),
        sqlite_with_rowid=False,
    )


def _rebuild(value) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table, make in (("points", _points), ("rollups", _rollups)):
        make(f"_new_{table}", value)
        # Rows in key order: the new WITHOUT ROWID tree is filled front to back.
        op.execute(
            f"INSERT INTO _new_{table} SELECT * FROM {table} ORDER BY 1, 2, 3"
            if table == "rollups"
            else f"INSERT INTO _new_{table} SELECT * FROM {table} ORDER BY 1, 2"
        )
        op.drop_table(table)
        op.rename_table(f"_new_{table}", table)


class _Blob(sa.types.UserDefinedType):
    cache_ok = True

    def get_col_spec(self, **kw) -> str:
        return "BLOB"


def upgrade() -> None:
    _rebuild(_Blob())


def downgrade() -> None:
    _rebuild(sa.Double())
