"""The schema's version: Alembic migrations (shipped as ``comfywatch.migrations``) run on a
connection the store hands in."""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError as MigrationError
from sqlalchemy import Connection

__all__ = ["MigrationError", "current", "head", "upgrade"]


def _alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    location = resources.files("comfywatch.migrations")
    cfg.set_main_option("script_location", str(location))
    return cfg


def upgrade(connection: Connection) -> None:
    """Upgrade the database on ``connection`` to the newest migration (idempotent)."""
    cfg = _alembic_config()
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


def head() -> str:
    """The newest migration this version ships."""
    return ScriptDirectory.from_config(_alembic_config()).get_current_head() or ""


def current(connection: Connection) -> str | None:
    """The migration the database on ``connection`` is at (``None``: an empty database)."""
    return MigrationContext.configure(connection).get_current_revision()
