"""Liveness and readiness."""
from __future__ import annotations

from flask import Blueprint

from ..errors import ServiceUnavailable
from .common import services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    checks = services().readiness()
    if any(state != "ok" for state in checks.values()):
        failing = ", ".join(name for name, state in checks.items() if state != "ok")
        raise ServiceUnavailable(f"Not ready: {failing} unreachable", extra={"checks": checks})
    return {"status": "ready", "checks": checks}
