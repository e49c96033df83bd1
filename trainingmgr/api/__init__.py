"""Blueprints, one per resource."""
from __future__ import annotations

from flask import Flask

from . import console, docs, event_stream, feature_groups, health, models, notifications, pipelines, training_jobs
from .access import authorize
from .common import refuse_control_characters


def register_blueprints(app: Flask) -> None:
    # Who may call comes first: a caller who may not is told so before anything of the request is read.
    app.before_request(authorize)
    app.before_request(refuse_control_characters)
    for module in (health, docs, feature_groups, pipelines, training_jobs, notifications, models, event_stream,
                   console):
        app.register_blueprint(module.bp)
