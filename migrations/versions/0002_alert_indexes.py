"""alerts: one open alert per episode; webhook delivery log index

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_OPEN = sa.text("status = 'open'")


def upgrade() -> None:
    # A partial unique index: at most one open alert per (run, detector, key). The detector
    # runner keeps this true by itself (state and alerts commit together); the index makes a
    # bug or a race fail loudly instead of doubling an alert.
    op.create_index(
        "uq_alerts_open_episode",
        "alerts",
        ["run_id", "detector", "key"],
        unique=True,
        sqlite_where=_OPEN,
        postgresql_where=_OPEN,
    )
    op.create_index("ix_deliveries_webhook", "webhook_deliveries", ["webhook_id", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_deliveries_webhook", table_name="webhook_deliveries")
    op.drop_index("uq_alerts_open_episode", table_name="alerts")
