"""One error hierarchy, turned into ProblemDetails in one place.

Services raise ApiError subclasses; werkzeug's HTTP errors (404 of unknown routes, 405, 413 ...) and anything
unexpected are mapped here too, so every error leaves the service as
`{"title", "status", "detail"}` (plus `errors` for validation failures). Routes outside the R1AP prefix also carry
the older `Exception` key that their clients read.
"""
from __future__ import annotations

import logging
import sys
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

R1AP_PREFIX = "/ai-ml-model-training/"
PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_SECONDS = 5  # what a 503 asks clients to wait before they try again


class ApiError(Exception):
    status = 500
    title = "Internal Server Error"
    log_level = logging.ERROR  # how a 5xx of this kind is logged

    def __init__(self, detail: str, *, errors: dict[str, Any] | None = None, extra: dict[str, Any] | None = None):
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.extra = extra or {}
        self.headers: dict[str, str] = {}  # response headers the answer carries


class BadRequest(ApiError):
    status = 400
    title = "Bad Request"


class ValidationFailed(BadRequest):
    """Invalid input; `errors` maps each bad field (dotted path) to its messages."""

    def __init__(self, errors: dict[str, Any], detail: str | None = None):
        flat = flatten_errors(errors)
        if detail is None:
            detail = "Invalid request: " + "; ".join(f"{k}: {' '.join(v)}" for k, v in flat.items())
        super().__init__(detail, errors=flat)


class Unauthorized(ApiError):
    """No credential, or one that is not valid (RFC 6750: the challenge says which)."""

    status = 401
    title = "Unauthorized"

    def __init__(self, detail: str, *, invalid_token: bool = False):
        super().__init__(detail)
        challenge = 'Bearer realm="trainingmgr"'
        if invalid_token:
            challenge += ', error="invalid_token"'
        self.headers = {"WWW-Authenticate": challenge}


class Forbidden(ApiError):
    """A valid credential without the role the operation needs, or a caller from a network that may not call."""

    status = 403
    title = "Forbidden"


class NotFound(ApiError):
    status = 404
    title = "Not Found"


class Conflict(ApiError):
    status = 409
    title = "Conflict"


class PayloadTooLarge(ApiError):
    """A body within the byte limit that breaks another limit (a form of too many parts ...); a body over the byte
    limit is werkzeug's RequestEntityTooLarge, answered below with the limit in bytes."""

    status = 413
    title = "Request Entity Too Large"


class UnsupportedMediaType(ApiError):
    status = 415
    title = "Unsupported Media Type"


class BadGateway(ApiError):
    """A peer the request depends on (DME, MME ...) failed; nothing was changed."""

    status = 502
    title = "Bad Gateway"


class ServiceUnavailable(ApiError):
    status = 503
    title = "Service Unavailable"
    retry_after: int | None = RETRY_AFTER_SECONDS  # seconds, sent as Retry-After


class NotReady(ServiceUnavailable):
    """/readyz's answer while something it checks is not fine: a state it reports (probed every few seconds), not a
    failure of the request; the check that failed has said why. Logged as a warning."""

    log_level = logging.WARNING


class AtCapacity(ServiceUnavailable):
    """The process serves as many of something (event streams ...) as it may: load shed on purpose, not a
    failure, so it is logged as a warning."""

    log_level = logging.WARNING


class DatabaseUnavailable(ServiceUnavailable):
    """The database cannot be reached (down, restarting, refusing connections) or no pooled connection came free in
    TM_DB_POOL_TIMEOUT: a passing state, not the request's fault and not a bug."""

    def __init__(self) -> None:
        super().__init__("The database is unreachable at the moment; try again later.")


# SQLSTATEs of a PostgreSQL server that is away or cannot take a session now: connection exceptions (class 08),
# shutting down or starting up (57P01, 57P02, 57P03), too many connections (53300).
_UNAVAILABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300")


def database_unavailable(error: BaseException) -> bool:
    """True when `error` says the database cannot be reached, not that a statement failed: SQLAlchemy's pool
    timeout, a connection SQLAlchemy invalidated, and the driver's connection-level errors (psycopg2's
    OperationalError/InterfaceError without a SQLSTATE, as for a refused or lost connection, or with one of the
    SQLSTATEs above), wrapped by SQLAlchemy or raw. SQLite's errors (a locked or missing file) are not outages: they
    stay what they are."""
    from sqlalchemy import exc

    if isinstance(error, exc.TimeoutError):
        return True
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True
    psycopg2 = sys.modules.get("psycopg2")
    if psycopg2 is None:  # not loaded (SQLite): no error can be one of its
        return False
    # The driver's own error, as SQLAlchemy wrapped it, or as a raw connection (the work listener's) raised it.
    driver_error = error.orig if isinstance(error, exc.DBAPIError) else error
    if not isinstance(driver_error, (psycopg2.OperationalError, psycopg2.InterfaceError)):
        return False
    code = getattr(driver_error, "pgcode", None)
    return code is None or code.startswith(_UNAVAILABLE_SQLSTATES)


def describe_database_error(error: BaseException) -> str:
    """One short line for the log (the driver's first line, no traceback, no SQL)."""
    cause = getattr(error, "orig", None) or error
    first = (str(cause).strip().splitlines() or [""])[0]
    return f"{cause.__class__.__name__}: {first}"[:300]


def flatten_errors(errors: Any, prefix: str = "") -> dict[str, list[str]]:
    """marshmallow's nested error dict -> {"training_config.dataPipeline.query_filter": ["..."]}."""
    flat: dict[str, list[str]] = {}
    if isinstance(errors, dict):
        for key, value in errors.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if key == "_schema":
                name = prefix or "body"
            flat.update(flatten_errors(value, name))
    elif isinstance(errors, (list, tuple)):
        if all(isinstance(m, str) for m in errors):
            flat.setdefault(prefix or "body", []).extend(errors)
        else:
            for item in errors:
                flat.update(flatten_errors(item, prefix))
    else:
        flat.setdefault(prefix or "body", []).append(str(errors))
    return flat


def problem_response(status: int, title: str, detail: str, **members: Any) -> Response:
    body: dict[str, Any] = {"title": title, "status": status, "detail": detail}
    body.update({k: v for k, v in members.items() if v is not None})
    if not request.path.startswith(R1AP_PREFIX):
        body["Exception"] = detail
    if g.get("problem_result_key"):
        body["result"] = detail
    response = jsonify(body)
    response.status_code = status
    response.mimetype = PROBLEM_JSON
    return response


def _problem_of(error: ApiError) -> Response:
    response = problem_response(error.status, error.title, error.detail, errors=error.errors, **error.extra)
    response.headers.update(error.headers)
    retry_after = getattr(error, "retry_after", None)
    if retry_after:
        response.headers["Retry-After"] = str(int(retry_after))
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(error: ApiError) -> Response:
        if error.status >= 500:
            log.log(error.log_level, "request failed: %s", error.detail)
        return _problem_of(error)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        detail = error.description or error.name
        if status == 404:
            detail = f"No resource at {request.path}"
        elif status == 405:
            detail = f"Method {request.method} is not allowed on {request.path}"
        elif status == 413:
            detail = f"Request body is larger than the limit of {request.max_content_length} bytes"
        response = problem_response(status, error.name, detail)
        if status == 405 and getattr(error, "valid_methods", None):
            response.headers["Allow"] = ", ".join(error.valid_methods)
        return response

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        if database_unavailable(error):
            # One line per request, no traceback: an outage is not a bug, and /readyz says it too.
            log.error("request failed: database unavailable (%s)", describe_database_error(error))
            return _problem_of(DatabaseUnavailable())
        request_id = getattr(g, "request_id", "-")
        log.exception("unhandled error")
        return problem_response(
            500,
            "Internal Server Error",
            f"The server failed to handle the request; quote request id {request_id} to the operator.",
            request_id=request_id,
        )
