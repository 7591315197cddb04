"""points: hash-partitioned by series on PostgreSQL (built for 10^9 rows)

A series lives in exactly one of ``POINT_PARTITIONS`` partitions, so a read or a run's
deletion touches one partition (pruning on ``series_id = ...``), each partition's primary-key
index stays ~1/16 of the whole, and vacuum works partition by partition. SQLite keeps its
single WITHOUT ROWID table: it is the embedded default, not the 10^9-row store.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

#: Partitions of ``points`` (PostgreSQL): 10^9 points give ~6 x 10^7 rows each.
POINT_PARTITIONS = 16


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE points RENAME TO points_unpartitioned")
    op.execute("ALTER TABLE points_unpartitioned RENAME CONSTRAINT points_pkey TO points_unpartitioned_pkey")
    op.execute(
        "CREATE TABLE points (series_id BIGINT NOT NULL, step BIGINT NOT NULL, value DOUBLE PRECISION, "
        "wall DOUBLE PRECISION NOT NULL, CONSTRAINT points_pkey PRIMARY KEY (series_id, step)) "
        "PARTITION BY HASH (series_id)"
    )
    for i in range(POINT_PARTITIONS):
        op.execute(
            f"CREATE TABLE points_p{i} PARTITION OF points FOR VALUES WITH (MODULUS {POINT_PARTITIONS}, REMAINDER {i})"
        )
    op.execute("INSERT INTO points SELECT series_id, step, value, wall FROM points_unpartitioned")
    op.execute("DROP TABLE points_unpartitioned")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE points RENAME TO points_partitioned")
    op.execute("ALTER TABLE points_partitioned RENAME CONSTRAINT points_pkey TO points_partitioned_pkey")
    op.execute(
        "CREATE TABLE points (series_id BIGINT NOT NULL, step BIGINT NOT NULL, value DOUBLE PRECISION, "
        "wall DOUBLE PRECISION NOT NULL, CONSTRAINT points_pkey PRIMARY KEY (series_id, step))"
    )
    op.execute("INSERT INTO points SELECT series_id, step, value, wall FROM points_partitioned")
    op.execute("DROP TABLE points_partitioned")  # drops its partitions with it
