"""Strict marshmallow fields shared by the schemas."""
from __future__ import annotations

import re
from typing import Any

from marshmallow import ValidationError, fields

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_]{3,63}$")
NAME_RULE = "must be 3 to 63 letters, digits or underscores"
_PORT_PATTERN = re.compile(r"0*([0-9]{1,5})")


class StrictBoolean(fields.Field):
    """JSON true/false only: "yes", 1 or "true" are type errors, not booleans."""

    default_error_messages = {"invalid": "Not a valid boolean: use true or false."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class Port(fields.Field):
    """A TCP port, sent as a string of digits (the spec's type) or as a JSON integer; kept as a string."""

    default_error_messages = {"invalid": "Not a valid port: use a number from 1 to 65535."}

    def __init__(self, *, empty_as_none: bool = False, **kwargs: Any):
        # An optional port answered as "" when absent must be accepted back as absent.
        self.empty_as_none = empty_as_none
        super().__init__(**kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str | None:
        if self.empty_as_none and isinstance(value, str) and not value.strip():
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise self.make_error("invalid")
        text = str(value).strip()
        # ASCII digits only: str.isdigit() also passes "²" (int() then fails) and other scripts' digits.
        match = _PORT_PATTERN.fullmatch(text)
        if match is None or not 0 < int(match.group(1)) < 65536:
            raise self.make_error("invalid")
        return str(int(match.group(1)))


class TrimmedString(fields.String):
    """A string with surrounding white space removed."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        return super()._deserialize(value, attr, data, **kwargs).strip()


def parse_small_int(text: str, max_digits: int) -> int | None:
    """An ASCII decimal of at most max_digits digits, or None (str.isdigit() also passes "²")."""
    if text.isascii() and text.isdigit() and len(text) <= max_digits:
        return int(text)
    return None


def validate_name(value: str) -> None:
    if not NAME_PATTERN.fullmatch(value):
        raise ValidationError(f"Invalid name {value!r}: {NAME_RULE}.")
