"""Alembic environment: labmetal passes its own connection (see labmetal.db.migrate)."""
from alembic import context

from labmetal.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
