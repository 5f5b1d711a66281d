"""Alembic environment.

The daemon runs migrations itself (``comfywatch migrate`` and at start) and hands its own
connection in ``config.attributes["connection"]``. Developers creating a revision run
``alembic revision --autogenerate -m "..."`` from the repository root with
``COMFYWATCH_DATABASE_URL`` pointing at a scratch database (``[tool.alembic]`` in
pyproject.toml names this folder).
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection, create_engine

from comfywatch.store.models import Base, render_type

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        render_item=render_type,
    )
    with context.begin_transaction():
        context.run_migrations()


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    url = os.environ.get("COMFYWATCH_DATABASE_URL")
    if not url:
        raise SystemExit("set COMFYWATCH_DATABASE_URL to a scratch database to run alembic")
    engine = create_engine(url)
    with engine.connect() as conn:
        _configure(conn)
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported")
run()
