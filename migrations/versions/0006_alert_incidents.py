"""alerts.first_detection and alerts.cause_alert_id: an episode's first detection, and incidents

Revision ID: 0006
Revises: 0005

An alert keeps what it said when it was raised (``first_detection``: step, severity,
message, evidence) beside its peak, and names the root alert of its incident
(``cause_alert_id``, NULL for a root): alerts that a root cause explains are shown under it and
not paged on their own. Deleting a root leaves its consequences as roots (ON DELETE SET NULL).
The index serves "the consequences of these alerts". Existing alerts get NULL in both: roots
whose first detection was not recorded.

PostgreSQL adds the columns and the foreign key in place. SQLite has no ADD CONSTRAINT; its
ADD COLUMN takes a REFERENCES clause, but a column-level foreign key reads back without its ON
DELETE rule, and its DROP COLUMN refuses a column that a table-level one names. So on SQLite
the table is rebuilt both ways (as 0004 rebuilds points), rows and ids copied, its indexes
(the partial unique index of 0002 included) made again.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

#: PostgreSQL's own name for a column's foreign key (the models leave it unnamed).
FK_NAME = "alerts_cause_alert_id_fkey"
INDEX_NAME = "ix_alerts_cause_alert_id"
#: The columns of alerts as 0005 left them, in order; 0006 appends its two.
COLUMNS_0005 = (
    "id, run_id, project_id, detector, key, severity, status, start_step, peak_step, end_step, "
    "message, evidence, opened_at, resolved_at, acknowledged_at, change_seq"
)
COLUMNS_0006 = COLUMNS_0005 + ", first_detection, cause_alert_id"


def _alerts(name: str, incidents: bool) -> None:
    """Create the alerts table as 0005 had it, with 0006's columns when ``incidents``."""
    extra = (
        [
            sa.Column("first_detection", sa.JSON(), nullable=True),
            sa.Column("cause_alert_id", sa.BigInteger(), nullable=True),
            sa.ForeignKeyConstraint(["cause_alert_id"], ["alerts.id"], ondelete="SET NULL"),
        ]
        if incidents
        else []
    )
    op.create_table(
        name,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=200), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("detector", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("start_step", sa.BigInteger(), nullable=True),
        sa.Column("peak_step", sa.BigInteger(), nullable=True),
        sa.Column("end_step", sa.BigInteger(), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("change_seq", sa.Integer(), nullable=False, server_default=sa.text("1")),
        *extra,
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )


def _rebuild_sqlite(incidents: bool) -> None:
    bind = op.get_bind()
    if bind.exec_driver_sql("PRAGMA foreign_keys").scalar():
        # Dropping the old table would then delete every webhook delivery (ON DELETE CASCADE).
        # Migrations run on a connection of their own, where SQLite's default (off) holds.
        raise RuntimeError("migration 0006 rebuilds the alerts table on SQLite: run it with PRAGMA foreign_keys=OFF")
    _alerts("_new_alerts", incidents)
    copied = COLUMNS_0005  # what both shapes have
    op.execute(f"INSERT INTO _new_alerts ({copied}) SELECT {copied} FROM alerts ORDER BY id")
    op.drop_table("alerts")  # its indexes go with it
    op.rename_table("_new_alerts", "alerts")
    op.create_index("ix_alerts_project_opened", "alerts", ["project_id", "opened_at"], unique=False)
    op.create_index("ix_alerts_run_status", "alerts", ["run_id", "status"], unique=False)
    op.create_index(
        "uq_alerts_open_episode",
        "alerts",
        ["run_id", "detector", "key"],
        unique=True,
        sqlite_where=sa.text("status = 'open'"),
    )


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite(incidents=True)
    else:
        op.add_column("alerts", sa.Column("first_detection", sa.JSON(), nullable=True))
        op.add_column("alerts", sa.Column("cause_alert_id", sa.BigInteger(), nullable=True))
        op.create_foreign_key(FK_NAME, "alerts", "alerts", ["cause_alert_id"], ["id"], ondelete="SET NULL")
    op.create_index(INDEX_NAME, "alerts", ["cause_alert_id"], unique=False)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite(incidents=False)  # the new index goes with the old table
    else:
        op.drop_index(INDEX_NAME, table_name="alerts")
        op.drop_column("alerts", "cause_alert_id")  # its foreign key goes with it
        op.drop_column("alerts", "first_detection")
