"""alerts.change_seq: the change number webhook deliveries carry; an index for their order

Revision ID: 0005
Revises: 0004

Deliveries of one alert reach a webhook in the order the alert changed, and each says which
change it is ("sequence"). The number lives on the alert (1 when opened, +1 per escalation
and at resolution). Existing alerts start at 1, or 2 when already resolved (escalations
before this migration were not counted). The index serves the claim's "is an earlier
delivery of this (alert, webhook) still pending?" probe.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD / DROP COLUMN (SQLite has both): a batch rebuild of the table would have to
    # carry the partial unique index of migration 0002 over by hand.
    op.add_column("alerts", sa.Column("change_seq", sa.Integer(), nullable=False, server_default=sa.text("1")))
    op.execute("UPDATE alerts SET change_seq = 2 WHERE status = 'resolved'")
    op.create_index("ix_deliveries_alert", "webhook_deliveries", ["alert_id", "webhook_id", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_deliveries_alert", table_name="webhook_deliveries")
    op.drop_column("alerts", "change_seq")
