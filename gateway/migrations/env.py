"""Alembic's environment for the usage ledger: run on the connection ``ledger_db.migrate``
passes in (no alembic.ini, no URL of its own)."""

from __future__ import annotations

from alembic import context

from gateway.ledger_db import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
