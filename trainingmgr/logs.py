"""Structured logging: one JSON object per line, carrying the request id (and a training job id when given).

Request bodies are never logged, so secrets such as feature-group tokens cannot reach a log line.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from datetime import datetime, timezone

from flask import Flask, Response, g, has_request_context, request

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if has_request_context() and "request_id" in g:
            entry["request_id"] = g.request_id
        # Extra fields passed with `extra={...}` (trainingjob_id, status, duration_ms ...).
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    """Install the JSON handler on the root logger once per process."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)


READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ANONYMOUS = "anonymous"


def audit_fields(response: Response) -> dict[str, object]:
    """The audit line of a write: who (the principal authentication set on `g`, else anonymous), which route and
    object (the path's parameters, or the Location of what was created), and the outcome. Never a body, so never a
    token or another secret; values are bounded so that a client cannot make the line long."""
    rule = request.url_rule.rule if request.url_rule is not None else None
    target = {name: str(value)[:64] for name, value in (request.view_args or {}).items()}
    created = response.headers.get("Location")
    if created:
        target["created"] = created[:200]
    status = response.status_code
    return {
        "principal": str(g.get("principal") or ANONYMOUS)[:128],
        "method": request.method,
        "route": rule,
        "object": target,
        "status": status,
        "outcome": "done" if status < 400 else ("refused" if status < 500 else "failed"),
    }


def install_request_logging(app: Flask) -> None:
    access = logging.getLogger("trainingmgr.access")
    audit = logging.getLogger("trainingmgr.audit")

    @app.before_request
    def _start() -> None:
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        # Accept a caller's id only if it is 1 to 64 of [A-Za-z0-9._:-], so it can forge neither log lines nor
        # markup where it is shown (no quotes, no <>, no bytes beyond ASCII); else one is made, as when none came.
        g.request_id = incoming if REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        g.request_started = time.perf_counter()

    @app.after_request
    def _finish(response: Response) -> Response:
        response.headers[REQUEST_ID_HEADER] = g.get("request_id", "")
        started = g.get("request_started")
        if started is not None:
            access.info(
                "request",
                extra={
                    "method": request.method,
                    "path": request.path,
                    "status": response.status_code,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )
        if request.method not in READ_METHODS:
            audit.info("write", extra=audit_fields(response))
        return response
