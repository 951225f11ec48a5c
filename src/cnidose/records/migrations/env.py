"""Alembic environment: migrations run on the connection cnidose hands over (``cnidose.records.db.upgrade``)."""

from __future__ import annotations

from alembic import context

from cnidose.records.schema import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through cnidose.records.db.upgrade(), which supplies the connection")
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
with context.begin_transaction():
    context.run_migrations()
