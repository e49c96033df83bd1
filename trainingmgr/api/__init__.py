"""Blueprints, one per resource."""
from __future__ import annotations

from flask import Flask

from . import docs, feature_groups, health, models, notifications, pipelines, training_jobs


def register_blueprints(app: Flask) -> None:
    for module in (health, docs, feature_groups, pipelines, training_jobs, notifications, models):
        app.register_blueprint(module.bp)
