"""Alembic environment: migrations always run on a connection the caller hands in."""

from __future__ import annotations

from alembic import context

from vivarium.api.db.schema import metadata

connection = context.config.attributes["connection"]
# render_as_batch: SQLite alters tables by copying them; Alembic does that in batch mode.
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
