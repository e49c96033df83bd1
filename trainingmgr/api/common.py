"""What every blueprint needs at the edge: the JSON body, schema loading, the services, Link headers."""
from __future__ import annotations

import json
import math
import re
from typing import Any

from flask import current_app, g, request, url_for
from marshmallow import Schema, ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from ..errors import BadRequest, PayloadTooLarge, UnsupportedMediaType, ValidationFailed
from ..services.pagination import Page


def json_body() -> dict[str, Any]:
    """The request body as a JSON object, or a 4xx ProblemDetails saying what is wrong with it."""
    mimetype = request.mimetype or ""
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {request.content_type or 'absent'}"
        )
    # JSON bodies are bounded by TM_MAX_JSON_BYTES as well as by the route's own limit (TM_MAX_BODY_BYTES, or
    # TM_MAX_METRICS_BYTES set by the metrics routes): parsing is what costs, and no JSON body needs megabytes.
    # The smaller limit becomes the request's, so that a 413 (errors.py) names the limit that applied.
    limit = bounded_limit(request.max_content_length, services().settings.max_json_bytes)
    request.max_content_length = limit
    if request.content_length is not None and request.content_length > limit:
        raise RequestEntityTooLarge()  # announced: refused before a byte is read
    raw = request.get_data(cache=True)
    if request.content_length is None and len(raw) >= limit:
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


def bounded_limit(current: int | None, bound: int) -> int:
    """The smaller of a request's body limit (None: none) and `bound`."""
    return bound if current is None else min(current, bound)


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
    if request.routing_exception is not None:
        return  # no route (404) or not this method (405): that is the answer, the body is never read
    if request.mimetype == "application/x-www-form-urlencoded":
        # No route takes such a form; parsing one costs like JSON does (it is read at once), so it is bounded alike.
        request.max_content_length = bounded_limit(request.max_content_length, services().settings.max_json_bytes)
    elif request.mimetype != "multipart/form-data":
        return
    try:
        request.form  # noqa: B018 - parses the form (and files)
    except RequestEntityTooLarge as e:
        # Answered by the route that reads the form (form_limit_error); werkzeug would parse the rest of the body
        # as a new form if it were read again. Other routes answer as they would (415, 405 ...).
        g.form_limit_error = _form_too_large(e)
        return
    for key, value in request.form.items(multi=True):
        if key is None:
            continue  # a part without a name (werkzeug keeps it under None): no route reads it
        rule = _CONTROL_BUT_LINE_BREAKS if key in MULTI_LINE_FIELDS else CONTROL_CHARACTER
        if CONTROL_CHARACTER.search(key) or rule.search(value):
            raise _control_character_error(f"form.{key}")
    for key, upload in request.files.items(multi=True):
        if key is None:
            continue
        if CONTROL_CHARACTER.search(key) or CONTROL_CHARACTER.search(upload.filename or ""):
            raise _control_character_error(f"form.{key}")


def refuse_form_over_limits() -> None:
    """For a route that reads a multipart form: a form over a limit (refuse_control_characters parsed it) is a 413
    saying which: the body's bytes, the number of parts or a text field's size."""
    error = g.get("form_limit_error")
    if error is not None:
        raise error


def _form_too_large(error: RequestEntityTooLarge) -> Exception:
    """What a RequestEntityTooLarge of form parsing says: werkzeug raises it for a body over the limit, for more
    than max_form_parts parts and for a text field over max_form_memory_size alike. The last two are told apart
    by where it was raised (MultipartDecoder.next_event counts parts); a body over the limit keeps the 413 that
    names the byte limit (errors.py)."""
    from werkzeug.formparser import MultiPartParser
    from werkzeug.sansio.multipart import MultipartDecoder

    content_length = request.content_length
    limit = request.max_content_length
    if limit is not None and content_length is not None and content_length > limit:
        return error.with_traceback(None)
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    frame = tb.tb_frame if tb is not None else None
    raiser = frame.f_locals.get("self") if frame is not None else None
    if isinstance(raiser, MultipartDecoder) and frame.f_code.co_name == "next_event":
        return PayloadTooLarge(f"The form has too many parts: more than the limit of {request.max_form_parts}")
    if isinstance(raiser, (MultipartDecoder, MultiPartParser)):
        return PayloadTooLarge(
            f"A form field other than a file is larger than the limit of {request.max_form_memory_size} bytes"
        )
    return error.with_traceback(None)  # the body ran over the byte limit while it was read (unannounced length)


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
