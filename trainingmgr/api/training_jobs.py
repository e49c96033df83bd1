"""Training-job routes (R1AP style) and the older `/trainingjobs/{name}/{version}`."""
from __future__ import annotations

from flask import Blueprint, current_app, request, url_for
from werkzeug.routing import BaseConverter

from ..errors import BadRequest, NotFound
from ..extensions import read_only_transactions
from ..schemas.training_job import ModelTrainingRequestSchema, dump_event, dump_training_job
from ..models import lifecycle as lc
from ..services.pagination import page_request
from ..services.training_jobs import DEFAULT_EXPERIMENT, job_view
from .common import bounded_limit, json_body, load, next_link, services
from .event_stream import follow_log
from .rendered_jobs import install_rendered_jobs, job_list_body

bp = Blueprint("training_jobs", __name__)


class _ModelNameConverter(BaseConverter):
    """The model name of `/training-jobs/<model_name>/<model_version>`: any segment but the metrics routes' words,
    which always name those routes (`GET .../update-model-metrics/7` is a 405 there, not the jobs of a model
    "update-model-metrics"), as a last segment `status` always names the status route."""

    regex = r"(?!(?:get|update)-model-metrics$)[^/]+"
    part_isolating = True  # matched against its own segment, where "$" is the segment's end


class _ModelVersionConverter(BaseConverter):
    """The model version of the same route: any segment but the words of a job's own routes (`.../7/cancel`,
    `.../7/events`, `.../7/status`), which always name those routes."""

    regex = r"(?!(?:status|events|cancel|logs)$)[^/]+"
    part_isolating = True


# Recorded before the routes below, so the converters exist when they are added.
bp.record_once(lambda state: state.app.url_map.converters.setdefault("modelname", _ModelNameConverter))
bp.record_once(lambda state: state.app.url_map.converters.setdefault("modelversion", _ModelVersionConverter))
bp.record_once(lambda state: install_rendered_jobs(state.app))

V1 = "/ai-ml-model-training/v1/training-jobs"
DEFAULT_PAGE, MAX_PAGE = 100, 1000

_request_schema = ModelTrainingRequestSchema()


def _metrics_prefix() -> str:
    # Formatted rather than url_for: url_for was a sixth of a 100-job list's time.
    return f"{request.script_root}{V1}/get-model-metrics/"


def _dump(job: dict, metrics_prefix: str | None = None) -> dict:
    return dump_training_job(job, metrics_url=f"{metrics_prefix or _metrics_prefix()}{job['id']}")


def _page():
    return page_request(request.args, default_limit=DEFAULT_PAGE, max_limit=MAX_PAGE, key_type=int)


@bp.post(V1, strict_slashes=False)
def create_training_job():
    body = json_body()
    data = load(_request_schema, body)
    sent = body.get("training_config", body.get("trainingConfig"))
    job = services().training_jobs().create(data, config_as_sent=sent)
    services().wake_workers()
    # The TrainingJob's own view: no second query. Its attributes reload after the commit in a read-only
    # transaction: on SQLite the write lock is not held while the answer is written, and the worker's claim of the
    # new job does not wait for it.
    with read_only_transactions():
        return _dump(job_view(job)), 201, {"Location": url_for(".get_training_job", training_job_id=job.id)}


@bp.get(V1, strict_slashes=False)
def list_training_jobs():
    return _job_list()


def _job_list(**model: str):
    """A page of jobs, newest first: each job's JSON as rendered before while the job has not changed since."""
    page_req = _page()
    service = services().training_jobs()
    page = service.versions(page_req, **model)
    metrics_prefix = _metrics_prefix()
    provider = current_app.json
    body = job_list_body(page.items, metrics_prefix, service.views_of,
                         lambda view: provider.compact_bytes(_dump(view, metrics_prefix)))
    return current_app.response_class(body, mimetype=provider.mimetype), 200, next_link(page, page_req.limit)


@bp.get(f"{V1}/<int:training_job_id>")
def get_training_job(training_job_id: int):
    return _dump(services().training_jobs().view(training_job_id))


@bp.delete(f"{V1}/<int:training_job_id>")
def delete_training_job(training_job_id: int):
    delete_model = request.args.get("delete_model", "false").lower()
    if delete_model not in ("true", "false"):
        raise BadRequest("delete_model must be true or false")
    services().training_jobs().delete(training_job_id, delete_model=delete_model == "true")
    response = current_app.response_class(status=204)
    del response.headers["Content-Type"]  # no body, so no type (Flask would name text/html)
    return response


def _id_before_a_word(raw: str) -> int:
    """The id of `.../training-jobs/<id>/status` (or `/events`, `/cancel`, `/logs`). A string, not <int:>: with <int:>,
    "abc/status" fell through to the model-list route (model "abc", version "status") and answered 200 []. A last
    segment "status", "events", "cancel" or "logs" is always these routes; the id must be an integer."""
    if not (raw.isascii() and raw.isdigit()):
        raise BadRequest(f"Invalid training job id {raw!r}: a positive integer")
    digits = raw.lstrip("0") or "0"
    if len(digits) > 19:  # more than any id (and int() refuses more than 4300 digits)
        raise NotFound(f"Training job {raw} does not exist")
    return int(digits)


@bp.post(f"{V1}/<training_job_id>/cancel")
def cancel_training_job(training_job_id: str):
    """Stop the job without deleting it: it ends CANCELLED, with its record and history."""
    job = services().training_jobs().cancel(_id_before_a_word(training_job_id))
    with read_only_transactions():  # as the create's answer: reloaded after the commit without the write lock
        return _dump(job_view(job))


@bp.get(f"{V1}/<training_job_id>/status")
def get_training_job_status(training_job_id: str):
    return lc.ordered(services().training_jobs().steps_state(_id_before_a_word(training_job_id)))


@bp.get(f"{V1}/<training_job_id>/events")
def list_training_job_events(training_job_id: str):
    """The job's history, oldest first: one event per change of a step (and the job's creation)."""
    page_req = _page()
    page = services().training_jobs().events(_id_before_a_word(training_job_id), page_req)
    return [dump_event(event) for event in page.items], 200, next_link(page, page_req.limit)


@bp.get(f"{V1}/<training_job_id>/logs")
def get_training_job_logs(training_job_id: str):
    """The pipeline run's output as text (its last TM_RUN_LOG_MAX_BYTES, or from ?offset=); ?follow=true goes on
    streaming it while the job runs. X-Log-Offset says where the next read starts."""
    job_id = _id_before_a_word(training_job_id)
    follow = request.args.get("follow", "false")
    if follow not in ("true", "false"):
        raise BadRequest(f"follow must be true or false, not {follow[:20]!r}")
    raw_offset = request.args.get("offset")
    if raw_offset is not None and not (raw_offset.isascii() and raw_offset.isdigit() and len(raw_offset) <= 18):
        raise BadRequest(f"offset must be a byte offset (a non-negative integer), not {raw_offset[:40]!r}")
    piece = services().training_jobs().run_log(job_id, int(raw_offset) if raw_offset is not None else None)
    if follow == "true" and not piece.ended:
        return follow_log(job_id, piece.data, piece.offset)
    response = current_app.response_class(piece.data, mimetype="text/plain")
    response.headers["X-Log-Offset"] = str(piece.offset)
    response.headers["X-Log-Complete"] = "true" if piece.ended else "false"
    return response


@bp.get(f"{V1}/<modelname:model_name>/<modelversion:model_version>")
def list_training_jobs_of_model(model_name: str, model_version: str):
    return _job_list(modelname=model_name, modelversion=model_version)


def _job_id(raw: str) -> int:
    """A job id taken as a string, so that "abc" is a 400 here rather than a match of the model-list route."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19:
        raise BadRequest(f"Invalid training job id {raw!r}: a positive integer")
    return int(raw)


@bp.get(f"{V1}/get-model-metrics/<trainingjob_id>")
def get_model_metrics(trainingjob_id: str):
    return services().training_jobs().metrics(_job_id(trainingjob_id))


@bp.post(f"{V1}/update-model-metrics/<trainingjob_id>")
def update_model_metrics(trainingjob_id: str):
    job_id = _job_id(trainingjob_id)
    # Metrics are small: a body over TM_MAX_METRICS_BYTES is refused (413) before it is read, or while it is read
    # when its length is not announced, so anonymous 15 MB bodies are neither stored nor echoed.
    request.max_content_length = bounded_limit(request.max_content_length, services().settings.max_metrics_bytes)
    metrics = services().training_jobs().update_metrics(job_id, json_body())
    return {"result": f"Model metrics of training job {job_id} saved", "metrics": metrics}


@bp.get("/trainingjobs/<trainingjob_name>/<version>")
def get_training_job_legacy(trainingjob_name: str, version: str):
    # Not an <int:> converter: a version that is not a positive integer is a 400 (swagger.yaml), not an unknown route.
    if not (version.isascii() and version.isdigit()):
        raise BadRequest(f"version must be a positive integer, not {version!r}")
    digits = version.lstrip("0") or "0"
    if len(digits) > 19:  # more than any id; int() would also refuse more than 4300 digits
        raise NotFound(f"Training job {trainingjob_name!r} version {version} does not exist")
    number = int(digits)
    service = services().training_jobs()
    job = service.nth_training(trainingjob_name, number)
    config = job.training_config
    fg = job.feature_group
    return {
        "trainingjob": {
            "trainingjob_name": job.model.modelname,
            "description": config.get("description", ""),
            "feature_list": fg.feature_list,
            "pipeline_name": config["trainingPipeline"][
                "retraining_pipeline_name" if job.is_retraining else "pipeline_name"],
            "experiment_name": DEFAULT_EXPERIMENT,
            "arguments": config["dataPipeline"].get("arguments", {}),
            "query_filter": config["dataPipeline"].get("query_filter", ""),
            "creation_time": job.created_at.isoformat(),
            "run_id": job.run_id or "",
            "steps_state": lc.ordered(job.steps_state),
            "accuracy": job.metrics or {},
            "enable_versioning": True,
            "updation_time": job.updated_at.isoformat(),
            "version": number,
            "pipeline_version": config["trainingPipeline"][
                "retraining_pipeline_version" if job.is_retraining else "pipeline_version"],
            "datalake_source": fg.datalake_source,
            "model_url": job.model_url or "",
            "notification_url": job.notification_url or "",
            "is_mme": False,
            "model_name": job.model.modelname,
            "model_info": {"modelversion": job.model.modelversion, "artifactversion": job.artifact_version},
            "id": job.id,
        }
    }
