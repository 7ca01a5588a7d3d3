"""Alembic migrations, installed as ``personalize.migrations`` (package data: a wheel migrates its own database)."""
