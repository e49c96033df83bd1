"""Liveness and readiness."""
from __future__ import annotations

from flask import Blueprint

from ..errors import NotReady
from .common import services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    checks, failing = services().readiness()
    if failing:
        said = ", ".join(f"{name} {checks[name]}" for name in failing)
        raise NotReady(f"Not ready: {said}", extra={"checks": checks})
    return {"status": "ready", "checks": checks}
