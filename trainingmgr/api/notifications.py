"""Callbacks from the data-extraction service and the pipeline engine (or a pipeline's exit step)."""
from __future__ import annotations

from flask import Blueprint

from ..schemas.training_job import DataExtractionNotificationSchema, PipelineNotificationSchema
from .common import json_body, load, services

bp = Blueprint("notifications", __name__)

_extraction_schema = DataExtractionNotificationSchema()
_pipeline_schema = PipelineNotificationSchema()


@bp.post("/trainingjob/dataExtractionNotification")
def data_extraction_notification():
    data = load(_extraction_schema, json_body())
    result = services().training_jobs().on_data_extraction_done(int(data["trainingjob_id"]))
    services().wake_workers()
    return {"result": result}


@bp.post("/trainingjob/pipelineNotification")
def pipeline_notification():
    data = load(_pipeline_schema, json_body())
    result = services().training_jobs().on_pipeline_status(int(data["trainingjob_id"]), data["run_status"],
                                                           data.get("run_id"))
    services().wake_workers()
    return {"result": result}
