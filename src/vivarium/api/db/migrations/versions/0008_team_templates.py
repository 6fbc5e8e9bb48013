"""templates teams build with the SDK, their builds and tags

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "team_templates",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "team_id", sa.String(36), sa.ForeignKey("teams.id", ondelete="CASCADE"), nullable=False
        ),  # fmt: skip
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("build_id", sa.String(64), nullable=True),
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("cpu_count", sa.Integer(), nullable=False),
        sa.Column("memory_mb", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.UniqueConstraint("team_id", "name", name="uq_team_templates_team_name"),
    )
    template = sa.ForeignKey("team_templates.id", ondelete="CASCADE")
    op.create_table(
        "template_builds",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("template_id", sa.String(64), template, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("step", sa.String(32), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
    )
    op.create_table(
        "template_tags",
        sa.Column(
            "template_id",
            sa.String(64),
            sa.ForeignKey("team_templates.id", ondelete="CASCADE"),
            primary_key=True,
        ),  # fmt: skip
        sa.Column("tag", sa.String(128), primary_key=True),
        sa.Column("build_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("template_tags")
    op.drop_table("template_builds")
    op.drop_table("team_templates")
