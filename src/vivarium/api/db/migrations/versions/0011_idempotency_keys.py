"""sandboxes: the Idempotency-Key a create came with (a retried create gets the same sandbox)

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(255), nullable=True))
        batch.create_index("ix_sandboxes_team_key", ["team_id", "idempotency_key"])


def downgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:
        batch.drop_index("ix_sandboxes_team_key")
        batch.drop_column("idempotency_key")
