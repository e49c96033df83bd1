"""Hostile input (issue 9): control characters in bodies, paths, query strings and forms, oversized metrics, filters
that cannot parse: each is a 400/413 ProblemDetails naming what is wrong, never a 500, and nothing is written.

Before: a NUL (\\u0000) in 19 of 33 string fields and in 12 GET paths was a 500 on PostgreSQL; 15 MB metrics bodies
were stored and echoed; an invalid query_filter was accepted and failed the job at extraction."""
from __future__ import annotations

import io
import json

import pytest
from sqlalchemy import func, select

from tests.factories import FG_V1, assert_problem_details, create_feature_group, feature_group_body
from tests.test_training_jobs_api import JOBS, counts, job_request
from trainingmgr import PROJECT_ROOT
from trainingmgr.extensions import db
from trainingmgr.models import FeatureGroup, TrainingJob

PIPELINES = PROJECT_ROOT / "examples" / "pipelines"

FG_STRING_FIELDS = ["featuregroup_name", "feature_list", "datalake_source", "host", "port", "bucket", "token",
                    "db_org", "measurement", "measured_obj_class", "source_name", "dme_port"]
JOB_STRING_FIELDS = [
    ("model_id", "modelname"), ("model_id", "modelversion"), ("training_config", "description"),
    ("training_config", "dataPipeline", "feature_group_name"), ("training_config", "dataPipeline", "query_filter"),
    ("training_config", "dataPipeline", "arguments", "epochs"),
    ("training_config", "trainingPipeline", "pipeline_name"),
    ("training_config", "trainingPipeline", "pipeline_version"),
    ("training_config", "trainingPipeline", "retraining_pipeline_name"),
    ("training_config", "trainingPipeline", "retraining_pipeline_version"),
    ("model_location",), ("training_dataset",), ("validation_dataset",), ("notification_url",),
    ("consumer_rapp_id",), ("producer_rapp_id",),
]
GET_PATHS = [
    "/pipelines/a%00b", "/pipelines/a%00b/versions", f"{FG_V1}/a%00b", "/featureGroup/a%00b",
    f"{JOBS}/a%00b/status", f"{JOBS}/get-model-metrics/1%00", f"{JOBS}/qoe%00/1", "/trainingjobs/a%00b/1",
    "/model/a%00b/1/1.0.0/Model.zip", "/model/a/1%00/1.0.0/Model.zip", "/apidocs/a%00b", f"{JOBS}/qoe/1%01",
]


def _nested_set(body: dict, path: tuple[str, ...], value: str) -> None:
    for key in path[:-1]:
        body = body[key]
    body[path[-1]] = value


def _feature_group_rows(app) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(FeatureGroup))


@pytest.mark.parametrize("field", FG_STRING_FIELDS)
@pytest.mark.parametrize("char", ["\u0000", "\u001b", "\n"])
def test_a_control_character_in_a_feature_group_field_is_a_400_naming_it(app, client, field, char):
    body = feature_group_body("cell_kpis", enable_dme=True, measured_obj_class="NRCellDU", dme_port="31823",
                              source_name="gnb1")
    body[field] = f"ab{char}cd"
    response = client.post(FG_V1, json=body)
    problem = assert_problem_details(response, 400)
    assert field in problem["errors"], problem
    assert "control characters" in problem["errors"][field][0]
    assert _feature_group_rows(app) == 0


@pytest.mark.parametrize("path", JOB_STRING_FIELDS, ids=".".join)
def test_a_nul_in_a_training_job_field_is_a_400_naming_it(app, client, path):
    create_feature_group(client)
    body = job_request()
    _nested_set(body, path, "qoe\u0000x")
    response = client.post(JOBS, json=body)
    problem = assert_problem_details(response, 400)
    assert ".".join(path) in problem["errors"], problem
    assert counts(app)[0] == 0


def test_a_control_character_in_a_key_is_a_400_too(client):
    body = job_request()
    body["training_config"]["dataPipeline"]["arguments"]["ep\u0000ochs"] = "1"
    problem = assert_problem_details(client.post(JOBS, json=body), 400)
    assert list(problem["errors"]) == ["training_config.dataPipeline.arguments.ep\\x00ochs"]


def test_line_breaks_are_kept_in_a_description(app, client, tmp_path):
    from tests.factories import upload_pipeline

    create_feature_group(client)
    for name in ("qoe_training", "qoe_retraining"):
        upload_pipeline(client, name, PIPELINES / "qoe_training.yaml")
    body = job_request()
    body["training_config"]["description"] = "line one\nline two\ttabbed"
    response = client.post(JOBS, json=body)
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["training_config"]["description"] == "line one\nline two\ttabbed"


@pytest.mark.parametrize("path", GET_PATHS)
def test_a_control_character_in_a_path_is_a_400(client, path):
    problem = assert_problem_details(client.get(path), 400)
    assert problem["errors"] == {"path": ["must not contain control characters (U+0000 to U+001F)"]}


def test_a_control_character_in_a_query_parameter_is_a_400_naming_it(client):
    problem = assert_problem_details(client.get(f"{JOBS}?cursor=a%00b"), 400)
    assert list(problem["errors"]) == ["query.cursor"]
    problem = assert_problem_details(client.delete(f"{JOBS}/1?delete_model=tr%0Aue"), 400)
    assert list(problem["errors"]) == ["query.delete_model"]


def test_a_control_character_in_an_upload_form_is_a_400_naming_it(client):
    data = {"file": (io.BytesIO((PIPELINES / "qoe_training.yaml").read_bytes()), "qoe\u0000.yaml"),
            "description": "example"}
    problem = assert_problem_details(
        client.post("/pipelines/qoe_training/upload", data=data, content_type="multipart/form-data"), 400)
    assert list(problem["errors"]) == ["form.file"]
    data = {"file": (io.BytesIO(b"x"), "p.yaml"), "description": "ex\u0000ample"}
    problem = assert_problem_details(
        client.post("/pipelines/qoe_training/upload", data=data, content_type="multipart/form-data"), 400)
    assert list(problem["errors"]) == ["form.description"]
    assert client.get("/pipelines/qoe_training").status_code == 404


# ------------------------------------------------------------------------------------------------- metrics
def _job(app, client) -> int:
    from tests.factories import add_training_job

    create_feature_group(client)
    return add_training_job(app, "cell_kpis")


def _stored_metrics(app, job_id: int):
    with app.app_context():
        return db.session.get(TrainingJob, job_id).metrics


@pytest.mark.parametrize("text", ['{"a": NaN}', '{"a": 1, "b": Infinity}', '{"a": -Infinity}', '{"a": 1e999}'])
def test_non_finite_metrics_are_a_400(app, client, text):
    job_id = _job(app, client)
    response = client.post(f"{JOBS}/update-model-metrics/{job_id}", data=text, content_type="application/json")
    assert_problem_details(response, 400)
    assert _stored_metrics(app, job_id) is None


def test_metrics_over_the_limit_are_a_413_and_not_stored(build_app):
    app = build_app(max_metrics_bytes=4096)
    client = app.test_client()
    job_id = _job(app, client)
    big = json.dumps({"accuracy": 0.9, "padding": "x" * 5000})
    problem = assert_problem_details(
        client.post(f"{JOBS}/update-model-metrics/{job_id}", data=big, content_type="application/json"), 413)
    assert "4096 bytes" in problem["detail"]
    assert _stored_metrics(app, job_id) is None
    small = {"accuracy": 0.9}
    response = client.post(f"{JOBS}/update-model-metrics/{job_id}", json=small)
    assert response.status_code == 200, response.get_json()
    assert _stored_metrics(app, job_id) == small


def test_the_default_metrics_limit_is_one_mebibyte(app):
    assert app.extensions["trainingmgr"].settings.max_metrics_bytes == 1024 * 1024


# ------------------------------------------------------------------------------------------------- filters
@pytest.mark.parametrize("query_filter", ["cellid ==", "a = 1; DROP TABLE x", "__class__ = 1", "f(x) = 1",
                                          "a = 1 -- comment", "((a = 1)"])
def test_an_invalid_query_filter_is_a_400_at_creation(app, client, query_filter):
    create_feature_group(client)
    body = job_request()
    body["training_config"]["dataPipeline"]["query_filter"] = query_filter
    problem = assert_problem_details(client.post(JOBS, json=body), 400)
    assert "training_config.dataPipeline.query_filter" in problem["errors"], problem
    assert problem["errors"]["training_config.dataPipeline.query_filter"][0].startswith("Invalid filter: ")
    assert counts(app) == (0, 0, 0)


@pytest.mark.parametrize("query_filter", ["", "cellid = 'c1'", "prbUsageDl > 0.5 AND activeUes IN (1, 2)",
                                          "NOT (x IS NULL)\nOR y != 'a'"])
def test_a_valid_query_filter_is_accepted_at_creation(app, client, query_filter):
    from tests.factories import upload_pipeline

    create_feature_group(client)
    for name in ("qoe_training", "qoe_retraining"):
        upload_pipeline(client, name, PIPELINES / "qoe_training.yaml")
    body = job_request()
    body["training_config"]["dataPipeline"]["query_filter"] = query_filter
    response = client.post(JOBS, json=body)
    assert response.status_code == 201, response.get_json()
