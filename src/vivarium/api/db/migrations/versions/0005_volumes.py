"""volumes, and the volumes each sandbox (and each snapshot's sandboxes) mount

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "volumes",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "team_id",
            sa.String(36),
            sa.ForeignKey("teams.id", ondelete="CASCADE"),
            nullable=False,
        ),  # fmt: skip
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.UniqueConstraint("team_id", "name", name="uq_volumes_team_name"),
    )
    for table in ("sandboxes", "team_snapshots"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("volume_mounts", sa.JSON(), nullable=False,
                                       server_default=sa.text("'[]'")))  # fmt: skip


def downgrade() -> None:
    for table in ("sandboxes", "team_snapshots"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("volume_mounts")
    op.drop_table("volumes")
