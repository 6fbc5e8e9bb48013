"""sandboxes' lifecycle events, and sandboxes whose ports need their traffic token

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sandbox_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "team_id",
            sa.String(36),
            sa.ForeignKey("teams.id", ondelete="CASCADE"),
            nullable=False,
        ),  # fmt: skip
        sa.Column("sandbox_id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("at", sa.Float(), nullable=False),
    )
    op.create_index("ix_sandbox_events_team_at", "sandbox_events", ["team_id", "at"])
    op.create_index("ix_sandbox_events_sandbox_at", "sandbox_events", ["sandbox_id", "at"])
    with op.batch_alter_table("sandboxes") as batch:
        batch.add_column(sa.Column("public_traffic", sa.Boolean(), nullable=False,
                                   server_default=sa.true()))  # fmt: skip


def downgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:
        batch.drop_column("public_traffic")
    op.drop_table("sandbox_events")
