"""Pipeline and experiment routes, at the reference's paths.

`GET /pipelines/experiments` is a static route: werkzeug ranks it before `GET /pipelines/<pipeline_name>`.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import Blueprint, g, request

from ..errors import BadRequest
from ..models import Pipeline
from .common import refuse_form_over_limits, services


bp = Blueprint("pipelines", __name__)


@bp.url_value_preprocessor
def _upload_errors_carry_result(endpoint: str | None, values: dict[str, Any] | None) -> None:
    # The reference's upload clients read errors from `result`: every error of the upload route carries it, also
    # those raised before the view runs (the app's before_request checks). URL value preprocessors run first.
    if endpoint == "pipelines.upload_pipeline":
        g.problem_result_key = True


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")  # UTC: every timestamp column gives it back so


def _pipeline_view(pipeline: Pipeline) -> dict[str, Any]:
    return {
        "pipeline_id": str(pipeline.id),
        "display_name": pipeline.name,
        "description": pipeline.description or "",
        "created_at": _iso(pipeline.created_at),
    }


@bp.post("/pipelines/<pipe_name>/upload")
def upload_pipeline(pipe_name: str):
    if request.mimetype != "multipart/form-data":
        raise BadRequest(
            "Send the compiled pipeline as multipart/form-data in the field 'file', "
            f"not as {request.content_type or 'a body without Content-Type'}"
        )
    refuse_form_over_limits()  # 413: the body's size, too many parts or a text field too large
    upload = request.files.get("file")
    if upload is None:
        raise BadRequest("The field 'file' is required: the compiled pipeline (YAML) to upload")
    content = upload.read()
    description = request.form.get("description", "")
    version = services().pipelines().upload(pipe_name, content, description, request.form.get("version_name"))
    return {
        "result": f"Pipeline {pipe_name} version {version.number} uploaded",
        "pipeline_name": pipe_name,
        "version": version.version,
        "version_name": version.name,
    }


@bp.get("/pipelines")
def list_pipelines():
    pipelines = services().pipelines().list_pipelines()
    return {
        "pipeline_names": [p.name for p in pipelines],
        # The reference's richer list, still read by its dashboard.
        "pipelines": [_pipeline_view(p) for p in pipelines],
        "total_size": len(pipelines),
        "next_page_token": "",
    }


@bp.get("/experiments")
def list_experiments():
    return {"experiment_names": services().pipelines().list_experiment_names()}


@bp.get("/pipelines/experiments")
def list_experiments_bare():
    # The current reference (and its dashboard) reads a bare array here.
    return services().pipelines().list_experiment_names()


@bp.get("/pipelines/<pipeline_name>")
def get_pipeline(pipeline_name: str):
    service = services().pipelines()
    pipeline = service.get_pipeline(pipeline_name)
    versions = service.list_versions(pipeline_name)
    return {"pipeline_info": {**_pipeline_view(pipeline), "versions": [v.name for v in versions]}}


@bp.get("/pipelines/<pipeline_name>/versions")
def list_pipeline_versions(pipeline_name: str):
    versions = services().pipelines().list_versions(pipeline_name)
    # The current reference and its dashboard read a bare array of version names (the seed had
    # {"versions_list": [...]}): they cannot coexist, the reference wins (api/swagger.yaml says so).
    return [v.name for v in versions]
