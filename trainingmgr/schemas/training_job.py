"""ModelTrainingRequest validation (with the spellings older clients send) and the job as clients see it."""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from marshmallow import EXCLUDE, RAISE, Schema, ValidationError, fields, pre_load, validate, validates

from ..adapters.outbound import parse_url
from ..adapters.query_filter import FilterError, parse_filter
from ..models.lifecycle import ordered, step_seconds

# \Z, not $ ("$" also matches before a trailing newline: "qoe\n" would pass); [0-9], not \d (which takes any
# script's digits).
MODEL_NAME = validate.Regexp(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z", error="Must be 1 to 128 letters, digits, '_', '-' or '.'."
)
MODEL_VERSION = validate.Regexp(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z", error="Must be 1 to 64 letters, digits, '_', '-' or '.'."
)
ARTIFACT_VERSION = validate.Regexp(r"^[0-9]{1,6}\.[0-9]{1,6}\.[0-9]{1,6}\Z", error="Must be MAJOR.MINOR.PATCH.")
_SHORT = validate.Length(max=255)
_TEXT = validate.Length(max=4096)


def _rename(data: dict[str, Any], aliases: dict[str, str], where: str) -> dict[str, Any]:
    """Map the other spellings clients send onto the seed's. Both spellings at once are one field given twice:
    fine with the same value, a 400 naming both when the values differ."""
    out = dict(data)
    for alias, name in aliases.items():
        if alias in out:
            value = out.pop(alias)
            if name in out and out[name] != value:
                raise ValidationError({alias: [f"{where}{name} and {where}{alias} are the same field, given twice "
                                               "with different values: give one."]})
            out[name] = value
    return out


class ModelIdSchema(Schema):
    class Meta:
        unknown = RAISE

    modelname = fields.String(required=True, validate=MODEL_NAME)
    modelversion = fields.String(required=True, validate=MODEL_VERSION)
    artifactversion = fields.String(validate=ARTIFACT_VERSION)

    @pre_load
    def _aliases(self, data: Any, **kwargs: Any) -> Any:
        if isinstance(data, dict):
            return _rename(data, {"modelName": "modelname", "modelVersion": "modelversion",
                                  "artifactVersion": "artifactversion"}, "")
        return data


class ArgumentsField(fields.Field):
    """An object of arguments; older clients send it as a JSON string holding an object."""

    default_error_messages = {
        "invalid": "Must be an object (or a JSON string holding an object) of names to strings, numbers or booleans."
    }

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> dict[str, str]:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):  # RecursionError: nested too deeply
                raise self.make_error("invalid") from None
        if not isinstance(value, dict):
            raise self.make_error("invalid")
        out: dict[str, str] = {}
        for key, item in value.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", key):
                raise ValidationError(f"Argument name {key!r} must be an identifier of at most 64 characters.")
            if isinstance(item, bool):
                out[key] = "true" if item else "false"
            elif isinstance(item, (str, int, float)):
                out[key] = str(item)
            else:
                raise self.make_error("invalid")
        return out


def _validate_filter(text: str) -> None:
    """The filter's syntax, checked when the job is created rather than when its data is extracted; the column names
    are checked against the source's at extraction (an InfluxDB measurement shows its columns only with its rows)."""
    try:
        parse_filter(text)
    except FilterError as e:
        raise ValidationError(f"Invalid filter: {e}") from None


class DataPipelineSchema(Schema):
    class Meta:
        unknown = RAISE

    # May be "" when a Model Management Service resolves it from the model's inputDataType.
    feature_group_name = fields.String(required=True, validate=validate.Length(max=63))
    query_filter = fields.String(required=True, validate=[_TEXT, _validate_filter])
    arguments = ArgumentsField(required=True)


class TrainingPipelineSchema(Schema):
    class Meta:
        unknown = RAISE

    pipeline_name = fields.String(required=True, validate=validate.Length(min=1, max=128))
    # A version's name, its number or "latest".
    pipeline_version = fields.String(required=True, validate=validate.Length(max=128))
    retraining_pipeline_name = fields.String(required=True, validate=validate.Length(min=1, max=128))
    retraining_pipeline_version = fields.String(required=True, validate=validate.Length(max=128))

    @pre_load
    def _aliases(self, data: Any, **kwargs: Any) -> Any:
        if isinstance(data, dict):
            return _rename(data, {"training_pipeline_name": "pipeline_name",
                                  "training_pipeline_version": "pipeline_version"}, "")
        return data


class TrainingConfigSchema(Schema):
    class Meta:
        unknown = RAISE

    description = fields.String(required=True, validate=_TEXT)
    dataPipeline = fields.Nested(DataPipelineSchema, required=True)
    trainingPipeline = fields.Nested(TrainingPipelineSchema, required=True)


def _validate_url(value: str) -> None:
    """A plain http(s) URL with a strict host (the outbound rules are applied by the service, which knows them)."""
    if value == "":
        return
    try:
        parse_url(value)
    except ValueError as e:
        raise ValidationError(f"Must be an http:// or https:// URL with a host name or IP address: {e}.") from None


class ModelTrainingRequestSchema(Schema):
    class Meta:
        unknown = RAISE

    model_id = fields.Nested(ModelIdSchema, required=True)
    training_config = fields.Nested(TrainingConfigSchema, required=True)
    model_location = fields.String(load_default="", validate=_TEXT)
    training_dataset = fields.String(load_default="", validate=_TEXT)
    validation_dataset = fields.String(load_default="", validate=_TEXT)
    notification_url = fields.String(load_default="", validate=[_TEXT, _validate_url])
    consumer_rapp_id = fields.String(load_default="", validate=_SHORT)
    producer_rapp_id = fields.String(load_default="", validate=_SHORT)

    @pre_load
    def _aliases(self, data: Any, **kwargs: Any) -> Any:
        if isinstance(data, dict):
            return _rename(
                data,
                {
                    "modelId": "model_id",
                    "trainingConfig": "training_config",
                    "modelLocation": "model_location",
                    "trainingDataset": "training_dataset",
                    "validationDataset": "validation_dataset",
                    "notificationDestination": "notification_url",
                    "consumerRAppId": "consumer_rapp_id",
                    "producerRAppId": "producer_rapp_id",
                },
                "",
            )
        return data


class DataExtractionNotificationSchema(Schema):
    """A callback's body: trainingjob_id as a string or an integer. Peers may send more: it is ignored."""

    class Meta:
        unknown = EXCLUDE

    trainingjob_id = fields.Raw(required=True)

    @validates("trainingjob_id")
    def _job_id(self, value: Any, **kwargs: Any) -> None:
        if isinstance(value, bool) or not (
            (isinstance(value, int) and value > 0) or (isinstance(value, str) and re.fullmatch(r"[0-9]{1,18}", value))
        ):
            raise ValidationError("Must be a training job id: a positive integer or a string of digits.")


class PipelineNotificationSchema(DataExtractionNotificationSchema):
    run_status = fields.String(required=True, validate=validate.Length(min=1, max=64))
    run_id = fields.String(validate=_SHORT)


def dump_training_job(job: Mapping[str, Any], *, metrics_url: str) -> dict[str, Any]:
    """A job as clients read it (absent values as "", as the reference did), plus what an operator needs, from its
    view (services.training_jobs: JOB_VIEW's columns by name, or job_view of a TrainingJob)."""
    steps_state = ordered(job["steps_state"])
    return {
        "id": job["id"],
        "modelId": {
            "id": job["model_id"],
            "modelname": job["modelname"],
            "modelversion": job["modelversion"],
            "artifactversion": job["artifact_version"],
        },
        "model_location": job["model_location"] or "",
        "training_dataset": job["training_dataset"] or "",
        "validation_dataset": job["validation_dataset"] or "",
        # As the client sent it (its spellings); the normalised form is internal.
        "training_config": job["training_config_sent"] or job["training_config"],
        "notification_url": job["notification_url"] or "",
        "consumer_rapp_id": job["consumer_rapp_id"] or "",
        "producer_rapp_id": job["producer_rapp_id"] or "",
        "model_url": job["model_url"] or "",
        "status": job["status"],
        "steps_state": steps_state,
        "is_retraining": job["is_retraining"],
        "run_id": job["run_id"] or "",
        "failure_reason": job["failure_reason"] or "",
        # While a step retries a peer that fails: {step, reason, attempts, next_attempt_at, gives_up_at}; else null.
        "waiting": job["waiting"],
        "metrics_url": metrics_url,
        "deletion_in_progress": job["deletion_in_progress"],
        "created_at": job["created_at"].isoformat(),
        "updated_at": job["updated_at"].isoformat(),
        "started_at": _iso(job["started_at"]),
        "finished_at": _iso(job["finished_at"]),
        "steps": dump_steps(steps_state, job["step_times"] or {}),
    }


def _iso(moment: Any) -> str | None:
    return moment.isoformat() if moment is not None else None


def dump_steps(steps_state: dict[str, str], step_times: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each step in the order of `steps_state` (ordered already): its state, when it started and ended, and how
    long it took (seconds; null until it ended)."""
    steps = []
    for step, state in steps_state.items():
        times = step_times.get(step)
        started = ended = duration = None
        if times:
            started, ended = times.get("started_at"), times.get("ended_at")
            if started and ended:
                duration = times.get("seconds")
                if duration is None:  # ended before its duration was stored with its times
                    duration = step_seconds(started, ended)
        steps.append({"name": step, "state": state, "started_at": started, "finished_at": ended,
                      "duration_seconds": duration})
    return steps


def dump_event(event: Any) -> dict[str, Any]:
    return {"id": event.id, "seq": event.seq, "time": event.at.isoformat(), "step": event.step,
            "from": event.from_state, "to": event.to_state, "reason": event.reason, "attempt": event.attempt}
