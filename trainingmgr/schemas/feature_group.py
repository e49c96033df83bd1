"""Feature group input validation and output shaping."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates, validates_schema

from ..secrets import MASK, TokenCipher
from .fields import Port, StrictBoolean, TrimmedString, validate_name

DATALAKE_SOURCES = ("InfluxSource", "CsvSource", "ParquetSource")
# What each source reads: the fields it needs not empty, those it needs present (an InfluxDB token may be "": a
# server without authentication; absent, a PUT would silently drop the stored one), and those it does not use
# (accepted, since clients such as the dashboard send every field, and stored as "": no secret is kept for a source
# that does not use it). `measurement` names the measurement or the file.
CONNECTION_FIELDS = ("host", "port", "bucket", "token", "db_org")
SOURCE_FIELDS = {
    "InfluxSource": {"required": ("host", "port", "bucket", "db_org", "measurement"), "present": ("token",),
                     "unused": ()},
    "CsvSource": {"required": ("measurement",), "present": (), "unused": CONNECTION_FIELDS},
    "ParquetSource": {"required": ("measurement",), "present": (), "unused": CONNECTION_FIELDS},
}
# An empty source_name is accepted, as the reference accepts it: the DME job then filters on no source name
# (`sourceNames: []`).
DME_REQUIRED = ("measured_obj_class", "dme_port")
# The columns of these text fields are VARCHAR(255): longer values are a 400, not a database error.
_MAX_255 = validate.Length(max=255)


def _validate_feature_list(value: str) -> None:
    parts = [f.strip() for f in value.split(",")]
    if not value.strip() or any(not p for p in parts):
        raise ValidationError("Must be a comma-separated list of feature names, none empty.")


class FeatureGroupConfigSchema(Schema):
    """FeatureGroupConfig as the spec defines it; unknown fields are rejected."""

    class Meta:
        unknown = RAISE

    featuregroup_name = TrimmedString(required=True, validate=validate_name)
    feature_list = fields.String(required=True, validate=_validate_feature_list)
    datalake_source = TrimmedString(
        required=True,
        validate=validate.OneOf(DATALAKE_SOURCES, error="Must be one of: {choices}."),
    )
    # Required or not by datalake_source (SOURCE_FIELDS); absent means "".
    host = TrimmedString(load_default="", validate=_MAX_255)
    port = Port(load_default="", allow_none=False, empty_as_none=True)
    bucket = TrimmedString(load_default="", validate=_MAX_255)
    token = fields.String(load_default=None)
    db_org = TrimmedString(load_default="", validate=_MAX_255)
    measurement = TrimmedString(required=True, validate=_MAX_255)
    enable_dme = StrictBoolean(required=True)
    measured_obj_class = TrimmedString(load_default=None, validate=_MAX_255)
    dme_port = Port(load_default=None, allow_none=True, empty_as_none=True)
    source_name = TrimmedString(load_default=None, validate=_MAX_255)

    @validates("token")
    def _not_the_mask(self, value: str, **kwargs: Any) -> None:
        # Only a PUT may send the mask back (meaning "keep the stored token"); FeatureGroupService checks that.
        if value == MASK and not self.context_allows_mask:
            raise ValidationError("Send the real token: \"****\" is how stored tokens are shown.")

    context_allows_mask = False

    @validates_schema
    def _source_rules(self, data: dict[str, Any], **kwargs: Any) -> None:
        errors: dict[str, list[str]] = {}
        source = data.get("datalake_source")
        rules = SOURCE_FIELDS.get(source or "")
        if rules is not None:
            article = "an" if source[0] in "AEIOU" else "a"
            for name in rules["required"]:
                if not data.get(name):
                    errors[name] = [f"Required, not empty, for {article} {source}."]
            for name in rules["present"]:
                if data.get(name) is None:
                    errors[name] = [f"Required for {article} {source} (it may be empty)."]
        if data.get("enable_dme"):
            for name in DME_REQUIRED:
                if not data.get(name):
                    errors[name] = ["Required when enable_dme is true."]
        if errors:
            raise ValidationError(errors)


class FeatureGroupUpdateSchema(FeatureGroupConfigSchema):
    """As FeatureGroupConfig, but a token of "****" means: keep the stored one, and the `id` GET answered may come
    back (what GET shows can be PUT back unchanged)."""

    context_allows_mask = True
    id = fields.Integer(load_default=None, strict=True)


class FeatureGroupRefSchema(Schema):
    class Meta:
        unknown = RAISE

    featureGroup_name = fields.String(required=True)


class FeatureGroupDeleteSchema(Schema):
    class Meta:
        unknown = RAISE

    featuregroups_list = fields.List(
        fields.Nested(FeatureGroupRefSchema),
        required=True,
        validate=validate.Length(min=1, max=1000, error="Must list from 1 to 1000 feature groups."),
    )


def dump_feature_group(fg: Mapping[str, Any]) -> dict[str, Any]:
    """A stored feature group as clients see it, from its view (services.feature_groups: GROUP_VIEW's columns by
    name, or group_view of a FeatureGroup): the token masked, absent optional values as "".

    A plain function rather than a marshmallow dump: it sits on the hottest read path.
    """
    return {
        "id": fg["id"],
        "featuregroup_name": fg["name"],
        "feature_list": fg["feature_list"],
        "datalake_source": fg["datalake_source"],
        "host": fg["host"],
        "port": fg["port"],
        "bucket": fg["bucket"],
        "token": TokenCipher.mask(fg["token_encrypted"]),
        "db_org": fg["db_org"],
        "measurement": fg["measurement"],
        "enable_dme": fg["enable_dme"],
        "measured_obj_class": fg["measured_obj_class"] or "",
        "dme_port": fg["dme_port"] or "",
        "source_name": fg["source_name"] or "",
    }
