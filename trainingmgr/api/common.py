"""What every blueprint needs at the edge: the JSON body, schema loading, the services, Link headers."""
from __future__ import annotations

import json
import math
import re
from typing import Any

from flask import current_app, request, url_for
from marshmallow import Schema, ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from ..errors import BadRequest, UnsupportedMediaType, ValidationFailed
from ..services.pagination import Page


def json_body() -> dict[str, Any]:
    """The request body as a JSON object, or a 4xx ProblemDetails saying what is wrong with it."""
    mimetype = request.mimetype or ""
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {request.content_type or 'absent'}"
        )
    raw = request.get_data(cache=True)  # reading enforces MAX_CONTENT_LENGTH (413) of an announced length
    limit = request.max_content_length
    if limit is not None and request.content_length is None and len(raw) >= limit:
        # A body of unannounced length (chunked) is read up to the limit and cut there without an error: had it
        # ended below the limit, fewer bytes would have come.
        raise RequestEntityTooLarge()
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
    # JSON carries control characters in strings only as escapes: without one, there is nothing to look for.
    if _CONTROL_ESCAPE.search(text):
        field = _field_with_control_character(body)
        if field is not None:
            raise _control_character_error(field)
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


# Control characters (C0) are refused in every string a client sends, in bodies, paths, query strings and forms:
# PostgreSQL's text type cannot hold NUL (a 500 before), and no name, host or URL has a use for the others. Tab,
# line feed and carriage return are allowed in the free-text fields below, which document them.
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f]")
_CONTROL_BUT_LINE_BREAKS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
MULTI_LINE_FIELDS = frozenset({"description", "query_filter", "queryFilter"})
_CONTROL_ESCAPE = re.compile(r"\\(?:u00[01][0-9a-fA-F]|[bfnrt])")


def _field_with_control_character(body: Any) -> str | None:
    """The dotted path of the first key or string value holding a control character it may not hold, or None."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            name = path.rsplit(".", 1)[-1]
            rule = _CONTROL_BUT_LINE_BREAKS if name in MULTI_LINE_FIELDS else CONTROL_CHARACTER
            if rule.search(value):
                return path or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else str(key)
                if CONTROL_CHARACTER.search(key):
                    return child
                stack.append((child, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


def _control_character_error(field: str) -> ValidationFailed:
    shown = CONTROL_CHARACTER.sub(lambda m: f"\\x{ord(m.group()):02x}", field)
    return ValidationFailed({shown: ["must not contain control characters (U+0000 to U+001F)"]})


def refuse_control_characters() -> None:
    """A before_request hook: a path, query parameter or form field with a control character is a 400 naming it."""
    if CONTROL_CHARACTER.search(request.path):
        raise ValidationFailed({"path": ["must not contain control characters (U+0000 to U+001F)"]})
    for key, value in request.args.items(multi=True):
        if CONTROL_CHARACTER.search(key) or CONTROL_CHARACTER.search(value):
            raise _control_character_error(f"query.{key}")
    if request.mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            request.form  # noqa: B018 - parses the form (and files)
        except RequestEntityTooLarge:
            return  # the route reads the body again and answers the 413 in its own words
        for key, value in request.form.items(multi=True):
            rule = _CONTROL_BUT_LINE_BREAKS if key in MULTI_LINE_FIELDS else CONTROL_CHARACTER
            if CONTROL_CHARACTER.search(key) or rule.search(value):
                raise _control_character_error(f"form.{key}")
        for key, upload in request.files.items(multi=True):
            if CONTROL_CHARACTER.search(key) or CONTROL_CHARACTER.search(upload.filename or ""):
                raise _control_character_error(f"form.{key}")


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
