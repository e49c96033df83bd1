"""What every blueprint needs at the edge: the JSON body, schema loading, the services, Link headers."""
from __future__ import annotations

import json
import math
import re
from typing import Any

from flask import current_app, request, url_for
from marshmallow import Schema, ValidationError

from ..errors import BadRequest, UnsupportedMediaType, ValidationFailed
from ..services.pagination import Page


def json_body() -> dict[str, Any]:
    """The request body as a JSON object, or a 4xx ProblemDetails saying what is wrong with it."""
    mimetype = request.mimetype or ""
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {request.content_type or 'absent'}"
        )
    raw = request.get_data(cache=True)  # reading enforces MAX_CONTENT_LENGTH (413)
    try:
        # Strict UTF-8 (json.loads(bytes) would let encoded surrogates through); a leading BOM is ignored.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadRequest("Request body is not valid UTF-8") from None
    try:
        # NaN, Infinity and numbers beyond a double (1e999) are not JSON: Python would take them, and no database
        # column, JSON encoder or client could store or read them back.
        body = json.loads(text, parse_constant=_not_json_number, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise BadRequest(f"Request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except NonFiniteNumber as e:
        raise BadRequest(f"Request body is not valid JSON: {e}") from None
    except ValueError:  # e.g. an integer literal longer than Python's int-digit limit
        raise BadRequest("Request body is not valid JSON: a number is too long") from None
    except RecursionError:
        raise BadRequest("Request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(body):
        # "\ud800" alone decodes to a string no encoder, cipher or database driver accepts.
        raise BadRequest("Request body is not valid JSON: it holds an unpaired surrogate escape (\\uD800-\\uDFFF)")
    return body


class NonFiniteNumber(ValueError):
    """NaN, Infinity or a number too large for a double in a request body."""


def _not_json_number(name: str) -> float:
    raise NonFiniteNumber(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NonFiniteNumber(f"the number {text[:40]} is too large")
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(body: Any) -> bool:
    stack = [body]  # iterative: the body may be nested as deep as the parser allows
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


def load(schema: Schema, data: Any) -> Any:
    try:
        return schema.load(data)
    except ValidationError as e:
        raise ValidationFailed(e.messages) from None


def services() -> Any:
    """The app's service container (built in create_app)."""
    return current_app.extensions["trainingmgr"]


def next_link(page: Page[Any], limit: int) -> dict[str, str]:
    """A `Link: <...>; rel="next"` header when the page has a successor."""
    cursor = page.next_cursor
    if cursor is None:
        return {}
    url = url_for(request.endpoint, **(request.view_args or {}), limit=limit, cursor=cursor)
    return {"Link": f'<{url}>; rel="next"'}
