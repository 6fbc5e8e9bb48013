"""nodes: where the cluster's proxy reaches a node's sandbox proxy; its cluster secret's check

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("proxy_address", sa.String(255), nullable=False,
                                   server_default=""))  # fmt: skip
        batch.add_column(sa.Column("secret_check", sa.String(64), nullable=False,
                                   server_default=""))  # fmt: skip


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("secret_check")
        batch.drop_column("proxy_address")
