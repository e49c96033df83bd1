"""trainingmgr: the Training Manager of an O-RAN AI/ML framework.

Importing the package imports nothing else: the gunicorn master and the command line load Flask and SQLAlchemy only
in the processes that build an app (`create_app` is looked up on first use).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS_DIR = PROJECT_ROOT / "migrations"
SWAGGER_FILE = PROJECT_ROOT / "api" / "swagger.yaml"

__all__ = ["create_app", "Settings"]
_LAZY = {"create_app": ".app", "PING_AFTER_IDLE_SECONDS": ".app", "Settings": ".config"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
