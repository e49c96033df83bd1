"""JSON on the hot paths with orjson (answers, and the JSON columns read from the database), as the standard
library would have it: what orjson refuses (an integer beyond 64 bits, which a client's metrics may hold) falls
back to the standard library, never to an error."""
from __future__ import annotations

import json
from typing import Any

import orjson
from flask import Response
from flask.json.provider import DefaultJSONProvider

# Datetimes go to Flask's default (an HTTP date, as Flask writes them), keys that are not strings become strings.
_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS
_COMPACT = {"separators": (",", ":")}


def load_json(text: str | bytes) -> Any:
    """A stored JSON value (the database's JSON columns)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:  # valid JSON orjson does not take (an integer beyond 64 bits)
        return json.loads(text)


class FastJSONProvider(DefaultJSONProvider):
    """Flask's JSON provider, serialising answers with orjson (about 5x the standard library). Request bodies are
    parsed by the standard library still: it takes every valid JSON document a client may send."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        # Flask's answers ask for compact separators, which is what orjson writes; other options: as Flask does it.
        if self.sort_keys or any(value != _COMPACT.get(key) for key, value in kwargs.items()):
            return super().dumps(obj, **kwargs)
        return self.compact_bytes(obj).decode()

    def response(self, *args: Any, **kwargs: Any) -> Response:
        """Flask's JSON answer (compact unless debugging, a trailing newline), with the bytes orjson writes as the
        body: a 200 KB job list is not decoded to a str and encoded back."""
        if self.sort_keys or self.compact is False or (self.compact is None and self._app.debug):
            return super().response(*args, **kwargs)
        body = self.compact_bytes(self._prepare_response_obj(args, kwargs), orjson.OPT_APPEND_NEWLINE)
        return self._app.response_class(body, mimetype=self.mimetype)

    def compact_bytes(self, obj: Any, option: int = 0) -> bytes:
        """`obj` as compact JSON in UTF-8, as the answers have it."""
        try:
            return orjson.dumps(obj, default=self.default, option=_OPTIONS | option)
        except TypeError:  # beyond orjson (an integer beyond 64 bits ...): the standard library's answer
            text = super().dumps(obj, **_COMPACT)
            return (text + "\n" if option & orjson.OPT_APPEND_NEWLINE else text).encode()
