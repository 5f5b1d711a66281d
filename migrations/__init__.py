"""Alembic migrations for the comfywatch database (shipped as ``comfywatch.migrations``)."""
