"""The database schema: Alembic migrations (Flask-Migrate) under migrations/.

Only processes that manage the schema load this (the CLI, tests, benchmarks): Alembic and what it imports cost
each serving process about 11 MB, and `serve` migrates in a child process before gunicorn starts its workers.
"""
from __future__ import annotations

import logging

from flask import Flask

from . import MIGRATIONS_DIR
from .extensions import db


def enable_migrations(app: Flask) -> None:
    """Register Flask-Migrate on the app: the `db` commands (upgrade, current, history, ...)."""
    # One INFO line per Alembic plugin, logged when alembic is imported, says nothing to an operator.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    from flask_migrate import Migrate

    if "migrate" not in app.extensions:
        Migrate(app, db, directory=str(MIGRATIONS_DIR), render_as_batch=True, compare_type=True)


def upgrade(app: Flask) -> None:
    """Bring the app's database to the newest revision."""
    from flask_migrate import upgrade as alembic_upgrade

    enable_migrations(app)
    with app.app_context():
        alembic_upgrade()
