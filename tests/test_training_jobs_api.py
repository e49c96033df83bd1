"""The training-job API over HTTP, without running any job: create (validation, spellings, artifact versions), list
and paging, get/delete/status, metrics, the older `/trainingjobs/{name}/{version}` route, the callbacks of the
data-extraction service and the pipeline engine, and model downloads.

No worker runs here: jobs stay NOT_STARTED. Every refused request is checked for its ProblemDetails body AND for
writing nothing (no job, no model row, no work item).
"""
from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.factories import (assert_problem_details, create_feature_group, create_file_feature_group,
                             upload_pipeline as upload)
from trainingmgr import PROJECT_ROOT
from trainingmgr.extensions import db
from trainingmgr.models import Model, TrainingJob, WorkItem

JOBS = "/ai-ml-model-training/v1/training-jobs"
PIPELINES = PROJECT_ROOT / "examples" / "pipelines"
FEATURES = "prbUsageDl,prbUsageUl,activeUes,sinrMean,throughputDl"
PROBLEM = "application/problem+json"
STEPS = ["DATA_EXTRACTION", "DATA_EXTRACTION_AND_TRAINING", "TRAINING", "TRAINING_AND_TRAINED_MODEL",
         "TRAINED_MODEL"]


# ---------------------------------------------------------------------------------------------------- helpers
def job_request(model: str = "qoe", version: str = "1", **top: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model_id": {"modelname": model, "modelversion": version},
        "training_config": {
            "description": "QoE throughput model",
            "dataPipeline": {
                "feature_group_name": "cell_kpis",
                "query_filter": "",
                "arguments": {"epochs": "2"},
            },
            "trainingPipeline": {
                "pipeline_name": "qoe_training",
                "pipeline_version": "1",
                "retraining_pipeline_name": "qoe_retraining",
                "retraining_pipeline_version": "1",
            },
        },
    }
    body.update(top)
    return body


def create(client: Any, body: dict[str, Any] | None = None) -> dict[str, Any]:
    response = client.post(JOBS, json=job_request() if body is None else body)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def counts(app: Any) -> tuple[int, int, int]:
    """(training jobs, models, work items) in the database."""
    with app.app_context():
        return tuple(db.session.scalar(select(func.count()).select_from(t)) for t in (TrainingJob, Model, WorkItem))


def assert_problem(response: Any, status: int, *, legacy: bool = False, field: str | None = None) -> dict[str, Any]:
    """A ProblemDetails answer; `Exception` only outside /ai-ml-model-training/; `errors` naming `field`."""
    body = assert_problem_details(response, status)
    assert ("Exception" in body) == legacy
    if field is not None:
        assert field in body["errors"], body
        assert all(isinstance(m, str) and m for m in body["errors"][field])
        assert field in body["detail"]
    return body


def dig(body: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """The dict holding the last segment of a dotted path, and that segment."""
    *parents, last = path.split(".")
    for key in parents:
        body = body[key]
    return body, last


def ids(client: Any, url: str = JOBS) -> list[int]:
    response = client.get(url)
    assert response.status_code == 200, response.get_json()
    return [job["id"] for job in response.get_json()]


@pytest.fixture
def setup(client):
    create_file_feature_group(client, "cell_kpis", measurement="cell_kpis.csv", feature_list=FEATURES)
    upload(client, "qoe_training", PIPELINES / "qoe_training.yaml")
    upload(client, "qoe_retraining", PIPELINES / "qoe_retraining.yaml")
    return client


@pytest.fixture
def refused(setup, app):
    """Post a body that must be refused; check the status and that nothing was written. Returns the body."""

    def check(body: Any, status: int = 400, field: str | None = None, **kwargs: Any) -> dict[str, Any]:
        before = counts(app)
        if "data" in kwargs:
            response = setup.post(JOBS, **kwargs)
        else:
            response = setup.post(JOBS, json=body, **kwargs)
        problem = assert_problem(response, status, field=field)
        assert counts(app) == before
        assert setup.get(JOBS).get_json() == []
        return problem

    return check


# ---------------------------------------------------------------------------------------------------- create
def test_create_answers_201_with_the_job(setup, app):
    response = setup.post(JOBS, json=job_request())
    assert response.status_code == 201
    assert response.mimetype == "application/json"
    job = response.get_json()
    assert response.headers["Location"] == f"{JOBS}/{job['id']}"
    assert isinstance(job["id"], int)
    assert set(job["modelId"]) == {"id", "modelname", "modelversion", "artifactversion"}
    assert job["modelId"]["modelname"] == "qoe" and job["modelId"]["modelversion"] == "1"
    assert job["modelId"]["artifactversion"] == "1.0.0" and isinstance(job["modelId"]["id"], int)
    assert job["training_config"] == job_request()["training_config"]  # an object, not a JSON string
    for absent in ("model_location", "training_dataset", "validation_dataset", "notification_url",
                   "consumer_rapp_id", "producer_rapp_id", "model_url", "run_id", "failure_reason"):
        assert job[absent] == "", absent
    assert list(job["steps_state"]) == STEPS
    assert set(job["steps_state"].values()) == {"NOT_STARTED"}
    assert job["status"] == "NOT_STARTED"
    assert job["is_retraining"] is False and job["deletion_in_progress"] is False
    assert job["metrics_url"] == f"{JOBS}/get-model-metrics/{job['id']}"
    assert setup.get(job["metrics_url"]).status_code == 200
    # What the Location names is the job itself.
    assert setup.get(response.headers["Location"]).get_json() == job
    assert counts(app) == (1, 1, 1)


def test_create_keeps_the_optional_strings(setup):
    job = create(setup, job_request(model_location="s3://models/qoe", training_dataset="train.csv",
                                    validation_dataset="val.csv", notification_url="https://rapp.example/cb",
                                    consumer_rapp_id="consumer-1", producer_rapp_id="producer-1"))
    assert job["model_location"] == "s3://models/qoe"
    assert job["training_dataset"] == "train.csv" and job["validation_dataset"] == "val.csv"
    assert job["notification_url"] == "https://rapp.example/cb"
    assert job["consumer_rapp_id"] == "consumer-1" and job["producer_rapp_id"] == "producer-1"


REQUIRED = [
    "model_id",
    "model_id.modelname",
    "model_id.modelversion",
    "training_config",
    "training_config.description",
    "training_config.dataPipeline",
    "training_config.dataPipeline.feature_group_name",
    "training_config.dataPipeline.query_filter",
    "training_config.dataPipeline.arguments",
    "training_config.trainingPipeline",
    "training_config.trainingPipeline.pipeline_name",
    "training_config.trainingPipeline.pipeline_version",
    "training_config.trainingPipeline.retraining_pipeline_name",
    "training_config.trainingPipeline.retraining_pipeline_version",
]


@pytest.mark.parametrize("path", REQUIRED, ids=lambda p: p.rsplit(".", 1)[-1])
def test_create_without_a_required_field_is_400(refused, path):
    body = job_request()
    holder, key = dig(body, path)
    del holder[key]
    problem = refused(body, field=path)
    assert problem["errors"][path] == ["Missing data for required field."]


@pytest.mark.parametrize("path", REQUIRED, ids=lambda p: p.rsplit(".", 1)[-1])
def test_create_with_a_required_field_null_is_400(refused, path):
    body = job_request()
    holder, key = dig(body, path)
    holder[key] = None
    refused(body, field=path)


@pytest.mark.parametrize("where", ["", "model_id", "training_config", "training_config.dataPipeline",
                                   "training_config.trainingPipeline"])
def test_create_with_an_unknown_field_is_400(refused, where):
    body = job_request()
    holder = body
    for key in filter(None, where.split(".")):
        holder = holder[key]
    holder["surprise"] = "x"
    path = f"{where}.surprise" if where else "surprise"
    problem = refused(body, field=path)
    assert problem["errors"][path] == ["Unknown field."]


@pytest.mark.parametrize(
    "path, value",
    [
        ("model_id", "qoe"),
        ("model_id", ["qoe", "1"]),
        ("model_id.modelname", 7),
        ("model_id.modelversion", 1),
        ("training_config", "{}"),
        ("training_config.description", 42),
        ("training_config.dataPipeline", []),
        ("training_config.dataPipeline.feature_group_name", ["cell_kpis"]),
        ("training_config.dataPipeline.query_filter", {"a": 1}),
        ("training_config.dataPipeline.arguments", ["epochs", "2"]),
        ("training_config.dataPipeline.arguments", '["epochs", "2"]'),
        ("training_config.dataPipeline.arguments", '"epochs"'),
        ("training_config.dataPipeline.arguments", "epochs=2"),
        ("training_config.dataPipeline.arguments", 2),
        ("training_config.dataPipeline.arguments", {"epochs": {"value": 2}}),
        ("training_config.dataPipeline.arguments", {"epochs": [2]}),
        ("training_config.dataPipeline.arguments", {"epochs": None}),
        ("training_config.dataPipeline.arguments", '{"epochs": {"value": 2}}'),
        ("training_config.dataPipeline.arguments", {"not an identifier": "1"}),
        ("training_config.trainingPipeline.pipeline_version", 1),
        ("training_config.trainingPipeline.pipeline_name", ""),
        ("notification_url", "ftp://rapp.example/cb"),
        ("notification_url", "rapp.example/cb"),
        ("notification_url", "http://"),
        ("notification_url", "javascript:alert(1)"),
        ("notification_url", 80),
        ("consumer_rapp_id", 1),
        ("producer_rapp_id", "p" * 256),
        ("model_location", False),
    ],
)
def test_create_with_a_mistyped_field_is_400(refused, path, value):
    body = job_request()
    holder, key = dig(body, path)
    holder[key] = value
    refused(body, field=path)


@pytest.mark.parametrize(
    "path, value",
    [
        ("model_id.modelname", ""),
        ("model_id.modelname", "../etc"),
        ("model_id.modelname", ".hidden"),
        ("model_id.modelname", "qoe model"),
        ("model_id.modelname", "qoe/model"),
        ("model_id.modelname", "qoe\\model"),
        ("model_id.modelname", "q" * 129),
        ("model_id.modelname", "qoé"),
        ("model_id.modelname", "qoe\n"),
        ("model_id.modelversion", "1\n"),
        ("model_id.modelversion", ""),
        ("model_id.modelversion", ".."),
        ("model_id.modelversion", "1/2"),
        ("model_id.modelversion", "v" * 65),
        ("model_id.artifactversion", "1.0"),
        ("model_id.artifactversion", "../1.0.0"),
        ("model_id.artifactversion", "1.0.0\n"),
        ("model_id.artifactversion", "\u0661.0.0"),  # an Arabic-Indic digit one
    ],
)
def test_create_with_a_bad_model_name_or_version_is_400(refused, path, value):
    body = job_request()
    holder, key = dig(body, path)
    holder[key] = value
    refused(body, field=path)


@pytest.mark.parametrize("s3_bucket, accepted", [("", False), ("tm-models", True)])
def test_a_model_name_the_s3_layout_cannot_hold_is_refused_at_creation(build_app, s3_bucket, accepted):
    """With the reference's bucket-per-model layout, `demo_qoe` cannot be an S3 bucket: refused when the job is
    created (naming the rule and TM_S3_BUCKET), not after the whole training ran. One bucket holds it."""
    client = build_app(object_store="s3", s3_endpoint="127.0.0.1:9", s3_access_key="k", s3_secret_key="s",
                      s3_bucket=s3_bucket).test_client()
    create_file_feature_group(client, "cell_kpis", measurement="cell_kpis.csv", feature_list=FEATURES)
    upload(client, "qoe_training", PIPELINES / "qoe_training.yaml")
    upload(client, "qoe_retraining", PIPELINES / "qoe_retraining.yaml")
    response = client.post(JOBS, json=job_request("demo_qoe"))
    if accepted:
        assert response.status_code == 201, response.get_json()
    else:
        problem = assert_problem_details(response, 400)
        message = problem["errors"]["model_id.modelname"][0]
        assert "cannot be an S3 bucket" in message and "TM_S3_BUCKET" in message
        assert client.get(JOBS).get_json() == []
    assert client.post(JOBS, json=job_request("demo-qoe")).status_code == 201  # a valid bucket name


def test_model_names_and_versions_at_their_limits_are_accepted(setup):
    job = create(setup, job_request("Q" + "q" * 126 + "9", "v-1.2_b" + "0" * 57))
    assert len(job["modelId"]["modelname"]) == 128 and len(job["modelId"]["modelversion"]) == 64


@pytest.mark.parametrize(
    "body, field",
    [
        ({"model_id": {"modelname": "a", "modelversion": "1"}, "modelId": {"modelname": "b", "modelversion": "1"}},
         "modelId"),
        ({"model_id": {"modelname": "a", "modelName": "b", "modelversion": "1"}}, "model_id.modelName"),
        ({"model_id": {"modelname": "a", "modelversion": "1", "modelVersion": "2"}}, "model_id.modelVersion"),
        ({"trainingConfig": "see training_config"}, "trainingConfig"),
        ({"notification_url": "", "notificationDestination": "http://rapp.example/n"}, "notificationDestination"),
        ({"consumer_rapp_id": "a", "consumerRAppId": "b"}, "consumerRAppId"),
        ({"producer_rapp_id": "a", "producerRAppId": "b"}, "producerRAppId"),
        ({"model_location": "s3://a", "modelLocation": "s3://b"}, "modelLocation"),
        ({"training_dataset": "a", "trainingDataset": "b"}, "trainingDataset"),
        ({"validation_dataset": "a", "validationDataset": "b"}, "validationDataset"),
    ],
    ids=["modelId", "modelName", "modelVersion", "trainingConfig", "notificationDestination", "consumerRAppId",
         "producerRAppId", "modelLocation", "trainingDataset", "validationDataset"],
)
def test_create_with_one_field_given_twice_with_different_values_is_400(refused, body, field):
    request = job_request()
    if "trainingConfig" in body:
        request["trainingConfig"] = copy.deepcopy(request["training_config"])
        request["trainingConfig"]["description"] = "another description"
    else:
        request.update(body)
    problem = refused(request, field=field)
    message = " ".join(problem["errors"][field])
    alias = field.split(".")[-1]
    seed = {"modelId": "model_id", "modelName": "modelname", "modelVersion": "modelversion",
            "trainingConfig": "training_config", "notificationDestination": "notification_url",
            "consumerRAppId": "consumer_rapp_id", "producerRAppId": "producer_rapp_id",
            "modelLocation": "model_location", "trainingDataset": "training_dataset",
            "validationDataset": "validation_dataset"}[alias]
    assert f"{seed} and {alias} are the same field, given twice with different values" in message


@pytest.mark.parametrize("body", [
    {"model_id": {"modelname": "qoe", "modelversion": "1"}, "modelId": {"modelname": "qoe", "modelversion": "1"}},
    {"model_id": {"modelname": "qoe", "modelName": "qoe", "modelversion": "1"}},
    {"notification_url": "http://rapp.example/n", "notificationDestination": "http://rapp.example/n"},
    {"model_location": "s3://m", "modelLocation": "s3://m"},
], ids=["modelId", "modelName", "notificationDestination", "modelLocation"])
def test_one_field_given_twice_with_the_same_value_is_fine(setup, body):
    request = job_request()
    request.update(body)
    assert setup.post(JOBS, json=request).status_code == 201


def test_create_with_both_spellings_of_the_training_pipeline_is_400_when_they_differ(refused, setup):
    body = job_request()
    body["training_config"]["trainingPipeline"]["training_pipeline_name"] = "qoe_retraining"
    problem = refused(body, field="training_config.trainingPipeline.training_pipeline_name")
    message = problem["errors"]["training_config.trainingPipeline.training_pipeline_name"][0]
    assert "pipeline_name and training_pipeline_name" in message
    body = job_request()
    body["training_config"]["trainingPipeline"]["training_pipeline_version"] = "2"
    refused(body, field="training_config.trainingPipeline.training_pipeline_version")
    same = job_request()
    same["training_config"]["trainingPipeline"]["training_pipeline_name"] = "qoe_training"
    assert setup.post(JOBS, json=same).status_code == 201


@pytest.mark.parametrize("body", ["[]", '"a job"', "null", "42"])
def test_create_with_a_body_that_is_not_an_object_is_400(refused, body):
    refused(None, data=body, content_type="application/json")


def test_create_with_malformed_json_or_the_wrong_content_type(refused):
    refused(None, data='{"model_id": ', content_type="application/json")
    refused(None, 415, data=json.dumps(job_request()), content_type="text/plain")
    refused(None, 415, data={"model_id": "x"}, content_type="application/x-www-form-urlencoded")


def test_create_for_an_unknown_feature_group_is_404(refused):
    body = job_request()
    body["training_config"]["dataPipeline"]["feature_group_name"] = "no_such_group"
    problem = refused(body, 404)
    assert "no_such_group" in problem["detail"]


def test_create_with_an_empty_feature_group_name_is_400(refused):
    body = job_request()
    body["training_config"]["dataPipeline"]["feature_group_name"] = ""
    problem = refused(body, 400)
    assert "feature_group_name" in problem["detail"]


@pytest.mark.parametrize(
    "key, value, status",
    [
        # The pipeline service answers an unknown pipeline or version with 404, a version that is not a number
        # (nor "latest") with 400.
        ("pipeline_name", "no_such_pipeline", 404),
        ("retraining_pipeline_name", "no_such_pipeline", 404),
        ("pipeline_version", "7", 404),
        ("retraining_pipeline_version", "7", 404),
        ("pipeline_version", "v1", 404),  # a version name that no version has
        ("retraining_pipeline_version", "-1", 404),
        ("pipeline_version", "../1", 400),  # neither a name, a number nor "latest"
        ("retraining_pipeline_version", "a b", 400),
        ("pipeline_name", "../qoe_training", 404),
    ],
)
def test_create_with_an_unknown_pipeline_or_version(refused, key, value, status):
    body = job_request()
    body["training_config"]["trainingPipeline"][key] = value
    problem = refused(body, status)
    assert value in problem["detail"]


@pytest.mark.parametrize("version", ["", "latest", "LATEST"])
def test_create_with_the_latest_pipeline_version(setup, version):
    body = job_request()
    body["training_config"]["trainingPipeline"]["pipeline_version"] = version
    job = create(setup, body)
    assert job["training_config"]["trainingPipeline"]["pipeline_version"] == version


# ---------------------------------------------------------------------------------------------------- spellings
@pytest.mark.parametrize(
    "model_id",
    [{"modelname": "qoe", "modelversion": "1"}, {"modelName": "qoe", "modelVersion": "1"},
     {"modelName": "qoe", "modelversion": "1"}],
    ids=["lower", "camel", "mixed"],
)
def test_modelId_spelling_is_accepted(setup, model_id):
    body = job_request()
    del body["model_id"]
    body["modelId"] = model_id
    job = create(setup, body)
    assert job["modelId"]["modelname"] == "qoe" and job["modelId"]["modelversion"] == "1"
    assert "modelName" not in job["modelId"] and "model_id" not in job


def test_v8_spellings_are_accepted_and_answered_with_the_seeds(setup):
    seed = job_request()
    body = {
        "modelId": {"modelName": "qoe", "modelVersion": "1"},
        "trainingConfig": seed["training_config"],
        "notificationDestination": "http://rapp.example:8080/notify",
        "consumerRAppId": "consumer-rapp",
        "producerRAppId": "producer-rapp",
    }
    job = create(setup, body)
    assert job["training_config"] == seed["training_config"]
    assert job["notification_url"] == "http://rapp.example:8080/notify"
    assert job["consumer_rapp_id"] == "consumer-rapp" and job["producer_rapp_id"] == "producer-rapp"
    for v8 in ("trainingConfig", "notificationDestination", "consumerRAppId", "producerRAppId"):
        assert v8 not in job
    assert setup.get(f"{JOBS}/{job['id']}").get_json() == job


def test_training_pipeline_spellings_are_accepted(setup):
    body = job_request()
    pipeline = body["training_config"]["trainingPipeline"]
    pipeline["training_pipeline_name"] = pipeline.pop("pipeline_name")
    pipeline["training_pipeline_version"] = pipeline.pop("pipeline_version")
    job = create(setup, body)
    # Answered as sent: clients that read the config back (the dashboard) find the names they wrote.
    assert job["training_config"] == body["training_config"]
    assert job["training_config"]["trainingPipeline"]["training_pipeline_name"] == "qoe_training"
    assert setup.get(f"{JOBS}/{job['id']}").get_json()["training_config"] == body["training_config"]


@pytest.mark.parametrize(
    "arguments, expected",
    [
        ('{"epochs": "3", "lr": 0.01, "shuffle": true}', {"epochs": "3", "lr": "0.01", "shuffle": "true"}),
        ("{}", {}),
        ({"epochs": 3, "verbose": False}, {"epochs": "3", "verbose": "false"}),
    ],
    ids=["json-string", "empty-json-string", "object-of-scalars"],
)
def test_arguments_are_kept_as_an_object_of_strings(setup, app, arguments, expected):
    body = job_request()
    body["training_config"]["dataPipeline"]["arguments"] = arguments
    job = create(setup, body)
    # Answered as the client sent them; the pipeline gets the normal form (an object of strings).
    assert job["training_config"]["dataPipeline"]["arguments"] == arguments
    assert setup.get(f"{JOBS}/{job['id']}").get_json()["training_config"]["dataPipeline"]["arguments"] == arguments
    with app.app_context():
        assert db.session.get(TrainingJob, job["id"]).training_config["dataPipeline"]["arguments"] == expected


# ---------------------------------------------------------------------------------------------------- artifact versions
def test_artifact_versions_of_sequential_trainings(setup, app):
    jobs = [create(setup) for _ in range(3)]
    assert [j["modelId"]["artifactversion"] for j in jobs] == ["1.0.0", "1.1.0", "1.2.0"]
    assert [j["is_retraining"] for j in jobs] == [False, True, True]
    assert len({j["modelId"]["id"] for j in jobs}) == 1
    other = create(setup, job_request("qoe", "2"))
    assert other["modelId"]["artifactversion"] == "1.0.0" and other["is_retraining"] is False
    assert other["modelId"]["id"] != jobs[0]["modelId"]["id"]
    another = create(setup, job_request("qoe_b", "1"))
    assert another["modelId"]["artifactversion"] == "1.0.0"
    assert counts(app)[:2] == (5, 3)


def test_a_refused_creation_does_not_use_up_an_artifact_version(setup):
    assert create(setup)["modelId"]["artifactversion"] == "1.0.0"
    body = job_request()
    body["training_config"]["trainingPipeline"]["retraining_pipeline_version"] = "9"
    assert setup.post(JOBS, json=body).status_code == 404
    assert create(setup)["modelId"]["artifactversion"] == "1.1.0"


def test_a_given_artifactversion_does_not_change_the_numbering(setup):
    body = job_request()
    body["model_id"]["artifactversion"] = "5.0.0"
    assert create(setup, body)["modelId"]["artifactversion"] == "1.0.0"


# ---------------------------------------------------------------------------------------------------- list
def test_list_is_a_plain_array_newest_first(setup):
    assert setup.get(JOBS).get_json() == []
    created = [create(setup, job_request(f"m{n}"))["id"] for n in range(3)]
    response = setup.get(JOBS)
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert isinstance(response.get_json(), list)
    assert [j["id"] for j in response.get_json()] == created[::-1]
    assert "Link" not in response.headers
    assert response.get_json()[0] == setup.get(f"{JOBS}/{created[-1]}").get_json()


def test_list_with_a_trailing_slash_is_answered_without_redirect(setup):
    job = create(setup)
    response = setup.get(f"{JOBS}/", follow_redirects=False)
    assert response.status_code == 200
    assert [j["id"] for j in response.get_json()] == [job["id"]]
    # Creating at the trailing-slash URL works as well.
    assert setup.post(f"{JOBS}/", json=job_request()).status_code == 201


def _walk(client: Any, url: str) -> tuple[list[int], int]:
    seen: list[int] = []
    pages = 0
    while url:
        response = client.get(url)
        assert response.status_code == 200, response.get_json()
        pages += 1
        seen += [j["id"] for j in response.get_json()]
        link = response.headers.get("Link")
        if link is None:
            break
        match = re.fullmatch(r'<([^>]+)>; rel="next"', link)
        assert match, link
        url = match.group(1)
        assert pages < 50
    return seen, pages


def test_paging_visits_each_job_once(setup):
    created = [create(setup, job_request(f"m{n % 3}"))["id"] for n in range(7)]
    seen, pages = _walk(setup, f"{JOBS}?limit=3")
    assert seen == created[::-1]
    assert pages == 3
    seen, pages = _walk(setup, f"{JOBS}?limit=7")
    assert seen == created[::-1] and pages == 1  # a full last page has no next link
    seen, pages = _walk(setup, f"{JOBS}?limit=1")
    assert seen == created[::-1] and pages == 7
    # Paging one model's list (m0: jobs 0, 3, 6) keeps the filter.
    seen, pages = _walk(setup, f"{JOBS}/m0/1?limit=2")
    assert seen == [created[6], created[3], created[0]] and pages == 2


@pytest.mark.parametrize(
    "query, field",
    [
        ("limit=0", "limit"),
        ("limit=-1", "limit"),
        ("limit=1001", "limit"),
        ("limit=abc", "limit"),
        ("limit=", "limit"),
        ("limit=1.5", "limit"),
        ("limit=%C2%B2", "limit"),
        ("cursor=!!!", "cursor"),
        ("cursor=" + base64.urlsafe_b64encode(b'"abc"').decode(), "cursor"),
        ("cursor=" + base64.urlsafe_b64encode(b"true").decode(), "cursor"),
        ("cursor=" + base64.urlsafe_b64encode(b"{}").decode(), "cursor"),
        ("cursor=" + base64.urlsafe_b64encode(b"not json").decode(), "cursor"),
    ],
)
def test_list_with_a_bad_limit_or_cursor_is_400(setup, query, field):
    create(setup)
    assert_problem(setup.get(f"{JOBS}?{query}"), 400, field=field)
    assert_problem(setup.get(f"{JOBS}/qoe/1?{query}"), 400, field=field)


def test_list_of_one_model(setup):
    a1 = create(setup, job_request("qoe", "1"))["id"]
    b1 = create(setup, job_request("other", "1"))["id"]
    a2 = create(setup, job_request("qoe", "2"))["id"]
    a1_again = create(setup, job_request("qoe", "1"))["id"]
    assert ids(setup, f"{JOBS}/qoe/1") == [a1_again, a1]
    assert ids(setup, f"{JOBS}/qoe/2") == [a2]
    assert ids(setup, f"{JOBS}/other/1") == [b1]
    assert ids(setup, f"{JOBS}/nobody/1") == []
    assert ids(setup, f"{JOBS}/qoe/3") == []
    jobs = setup.get(f"{JOBS}/qoe/1").get_json()
    assert all(j["modelId"]["modelname"] == "qoe" and j["modelId"]["modelversion"] == "1" for j in jobs)


# ---------------------------------------------------------------------------------------------------- get/delete/status
@pytest.mark.parametrize("method, suffix", [("get", ""), ("delete", ""), ("get", "/status")])
def test_unknown_job_is_404(setup, method, suffix):
    absent = create(setup)["id"] + 1  # ids keep growing on PostgreSQL: a fixed number might exist
    for job_id in (absent, 0):
        problem = assert_problem(getattr(setup, method)(f"{JOBS}/{job_id}{suffix}"), 404)
        assert str(job_id) in problem["detail"]


@pytest.mark.parametrize("method, suffix", [("get", ""), ("delete", ""), ("get", "/status")])
def test_a_huge_job_id_is_404_not_a_server_error(setup, method, suffix):
    for job_id in (2**31, 2**63, 10**30):
        assert_problem(getattr(setup, method)(f"{JOBS}/{job_id}{suffix}"), 404)


def test_status_route_is_the_steps_state(setup):
    # `/training-jobs/7/status` (no job yet) is the status route (404), not model "7" version "status" (200 []).
    problem = assert_problem(setup.get(f"{JOBS}/7/status"), 404)
    assert "7" in problem["detail"]
    job = create(setup)
    response = setup.get(f"{JOBS}/{job['id']}/status")
    assert response.status_code == 200
    status = response.get_json()
    assert isinstance(status, dict)
    assert list(status) == STEPS and set(status.values()) == {"NOT_STARTED"}
    assert setup.get(f"{JOBS}/{job['id']}/status").get_json() == job["steps_state"]


@pytest.mark.parametrize("job_id", ["abc", "qoe", "null%2Cnull", "-1", "1.5", "%C2%B2"])
def test_status_of_a_non_integer_id_is_400_not_the_model_list(setup, job_id):
    # It answered 200 [] through the model-list route (model "abc", version "status"), even with a model "qoe".
    create(setup, job_request("qoe", "status"))
    problem = assert_problem(setup.get(f"{JOBS}/{job_id}/status"), 400)
    assert "Invalid training job id" in problem["detail"]
    assert setup.get(f"{JOBS}/qoe/1").status_code == 200  # the model list itself is still served


def test_delete_answers_204_without_a_body_or_a_content_type(setup):
    job = create(setup)
    response = setup.delete(f"{JOBS}/{job['id']}")
    assert response.status_code == 204 and response.get_data() == b""
    assert "Content-Type" not in response.headers  # it said text/html, for no body at all


def test_a_metrics_route_word_is_never_a_model_name(setup):
    # `GET .../update-model-metrics/7` listed the jobs of a model "update-model-metrics" (200 []), so its Allow said
    # GET where the contract has POST only; it is a 405 of the metrics route now.
    create(setup, job_request("update-model-metrics", "7"))
    response = setup.get(f"{JOBS}/update-model-metrics/7")
    assert_problem(response, 405)
    assert "GET" not in response.headers["Allow"] and "POST" in response.headers["Allow"]
    assert "GET" not in setup.open(f"{JOBS}/update-model-metrics/7", method="OPTIONS").headers["Allow"]
    assert setup.get(f"{JOBS}/update-model-metricsX/7").status_code == 200  # other names are models
    assert setup.get(f"{JOBS}/qoe/1").status_code == 200


def test_delete_then_404(setup, app):
    keep = create(setup)
    job = create(setup, job_request("gone"))
    response = setup.delete(f"{JOBS}/{job['id']}")
    assert response.status_code == 204 and response.get_data() == b""
    assert_problem(setup.get(f"{JOBS}/{job['id']}"), 404)
    assert_problem(setup.get(f"{JOBS}/{job['id']}/status"), 404)
    assert_problem(setup.delete(f"{JOBS}/{job['id']}"), 404)
    assert ids(setup) == [keep["id"]]
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(WorkItem).where(WorkItem.job_id == job["id"])) == 0


def test_delete_with_delete_model_true_removes_the_stored_model(setup, app, tmp_path):
    job = create(setup)
    source = tmp_path / "Model.zip"
    source.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    store = app.extensions["trainingmgr"].object_store
    store.put_file("qoe", "1/1.0.0/Model.zip", source)
    assert setup.get("/model/qoe/1/1.0.0/Model.zip").status_code == 200
    assert setup.delete(f"{JOBS}/{job['id']}?delete_model=true").status_code == 204
    assert setup.get("/model/qoe/1/1.0.0/Model.zip").status_code == 404


@pytest.mark.parametrize("value", ["maybe", "1", "yes", ""])
def test_delete_with_a_bad_delete_model_is_400(setup, value):
    job = create(setup)
    problem = assert_problem(setup.delete(f"{JOBS}/{job['id']}?delete_model={value}"), 400)
    assert "delete_model" in problem["detail"]
    assert setup.get(f"{JOBS}/{job['id']}").status_code == 200


# ---------------------------------------------------------------------------------------------------- metrics
def test_metrics_of_a_new_job_then_updated(setup):
    job = create(setup)
    response = setup.get(f"{JOBS}/get-model-metrics/{job['id']}")
    assert response.status_code == 200 and response.get_json() == {}
    metrics = {"r2": 0.93, "mae": 1.5, "per_cell": {"c1": 0.9}}
    response = setup.post(f"{JOBS}/update-model-metrics/{job['id']}", json=metrics)
    assert response.status_code == 200
    assert response.get_json()["metrics"] == metrics
    assert setup.get(f"{JOBS}/get-model-metrics/{job['id']}").get_json() == metrics
    # A later update replaces them.
    assert setup.post(f"{JOBS}/update-model-metrics/{job['id']}", json={"r2": 0.5}).status_code == 200
    assert setup.get(f"{JOBS}/get-model-metrics/{job['id']}").get_json() == {"r2": 0.5}


@pytest.mark.parametrize(
    "kwargs, status",
    [
        ({"data": "[1, 2]", "content_type": "application/json"}, 400),
        ({"data": '"r2"', "content_type": "application/json"}, 400),
        ({"data": '{"r2": ', "content_type": "application/json"}, 400),
        ({"data": "", "content_type": "application/json"}, 400),
        ({"data": '{"r2": 0.1}', "content_type": "text/plain"}, 415),
        ({"data": "r2=0.1", "content_type": "application/x-www-form-urlencoded"}, 415),
    ],
    ids=["array", "string", "malformed", "empty", "text-plain", "form"],
)
def test_bad_metrics_update_changes_nothing(setup, kwargs, status):
    job = create(setup)
    setup.post(f"{JOBS}/update-model-metrics/{job['id']}", json={"r2": 0.9})
    assert_problem(setup.post(f"{JOBS}/update-model-metrics/{job['id']}", **kwargs), status)
    assert setup.get(f"{JOBS}/get-model-metrics/{job['id']}").get_json() == {"r2": 0.9}


def test_metrics_of_an_unknown_job_are_404(setup):
    absent = create(setup)["id"] + 1
    assert_problem(setup.get(f"{JOBS}/get-model-metrics/{absent}"), 404)
    assert_problem(setup.post(f"{JOBS}/update-model-metrics/{absent}", json={"r2": 1}), 404)
    assert_problem(setup.get(f"{JOBS}/get-model-metrics/{2**63}"), 404)
    assert_problem(setup.post(f"{JOBS}/update-model-metrics/{2**63}", json={"r2": 1}), 404)


# ---------------------------------------------------------------------------------------------------- older route
def test_older_route_counts_the_trainings_of_a_model_name(setup):
    first = create(setup, job_request("qoe", "1"))
    create(setup, job_request("other", "1"))
    second = create(setup, job_request("qoe", "2"))
    third = create(setup, job_request("qoe", "1"))
    for n, job in enumerate((first, second, third), start=1):
        response = setup.get(f"/trainingjobs/qoe/{n}")
        assert response.status_code == 200, response.get_json()
        legacy = response.get_json()["trainingjob"]
        assert legacy["id"] == job["id"] and legacy["version"] == n
        assert legacy["trainingjob_name"] == "qoe" and legacy["model_name"] == "qoe"
        assert legacy["model_info"] == {"modelversion": job["modelId"]["modelversion"],
                                        "artifactversion": job["modelId"]["artifactversion"]}
        assert list(legacy["steps_state"]) == STEPS
    legacy = setup.get("/trainingjobs/qoe/3").get_json()["trainingjob"]
    assert legacy["pipeline_name"] == "qoe_retraining"  # the third is a retraining of qoe 1
    assert setup.get("/trainingjobs/qoe/1").get_json()["trainingjob"]["pipeline_name"] == "qoe_training"
    assert setup.get("/trainingjobs/other/1").get_json()["trainingjob"]["feature_list"] == FEATURES


def test_older_route_reads_a_version_with_leading_zeros(setup):
    job = create(setup)
    legacy = setup.get("/trainingjobs/qoe/001").get_json()["trainingjob"]
    assert legacy["id"] == job["id"] and legacy["version"] == 1


@pytest.mark.parametrize("path", ["/trainingjobs/qoe/2", "/trainingjobs/nobody/1", f"/trainingjobs/qoe/{2**63}",
                                  f"/trainingjobs/qoe/{10**30}", "/trainingjobs/qoe/" + "9" * 5000])
def test_older_route_unknown_is_404_with_exception(setup, path):
    create(setup)
    assert_problem(setup.get(path), 404, legacy=True)


@pytest.mark.parametrize("version", ["0", "-1", "abc", "1.5"])
def test_older_route_invalid_version_is_400(setup, version):
    # swagger.yaml: version is an integer, minimum 1; 400 "Invalid training job name or version".
    create(setup)
    problem = assert_problem(setup.get(f"/trainingjobs/qoe/{version}"), 400, legacy=True)
    assert "version" in problem["detail"]


# ---------------------------------------------------------------------------------------------------- callbacks
CALLBACKS = ["/trainingjob/dataExtractionNotification", "/trainingjob/pipelineNotification"]


def _callback(url: str, **body: Any) -> dict[str, Any]:
    if url.endswith("pipelineNotification"):
        body.setdefault("run_status", "SUCCEEDED")
    return body


@pytest.mark.parametrize("url", CALLBACKS, ids=["extraction", "pipeline"])
@pytest.mark.parametrize(
    "job_id",
    [pytest.param(..., id="missing"), "abc", "", " 1", "1a", "1\n", "\u0661", "\u00b9", -1, "-1", 0, True, False,
     1.0, 1.5, "1.0", None, [1], {"id": 1}],
)
def test_callback_with_a_bad_trainingjob_id_is_400(setup, url, job_id):
    job = create(setup)
    body = _callback(url) if job_id is ... else _callback(url, trainingjob_id=job_id)
    problem = assert_problem(setup.post(url, json=body), 400, legacy=True, field="trainingjob_id")
    assert problem["errors"]["trainingjob_id"]
    assert setup.get(f"{JOBS}/{job['id']}").get_json() == job


@pytest.mark.parametrize("url", CALLBACKS, ids=["extraction", "pipeline"])
@pytest.mark.parametrize("job_id", ["next", "next-as-string", "0", 2**63, 10**30, "9" * 18])
def test_callback_for_an_unknown_job_is_400(setup, url, job_id):
    absent = create(setup)["id"] + 1
    job_id = {"next": absent, "next-as-string": str(absent)}.get(job_id, job_id)
    problem = assert_problem(setup.post(url, json=_callback(url, trainingjob_id=job_id)), 400, legacy=True)
    assert "does not exist" in problem["detail"]


@pytest.mark.parametrize("url", CALLBACKS, ids=["extraction", "pipeline"])
def test_callback_bodies_that_are_not_json_objects(setup, url):
    assert_problem(setup.post(url, data="[1]", content_type="application/json"), 400, legacy=True)
    assert_problem(setup.post(url, data="{", content_type="application/json"), 400, legacy=True)
    assert_problem(setup.post(url, data="trainingjob_id=1", content_type="text/plain"), 415, legacy=True)


@pytest.mark.parametrize("run_status", [..., None, "", 1, ["SUCCEEDED"]], ids=["missing", "null", "empty", "int",
                                                                               "list"])
def test_pipeline_notification_needs_a_run_status(setup, run_status):
    job = create(setup)
    body: dict[str, Any] = {"trainingjob_id": job["id"]}
    if run_status is not ...:
        body["run_status"] = run_status
    assert_problem(setup.post(CALLBACKS[1], json=body), 400, legacy=True, field="run_status")


@pytest.mark.parametrize("url", CALLBACKS, ids=["extraction", "pipeline"])
def test_callback_accepts_integer_and_string_ids_and_ignores_extra_fields(setup, url):
    job = create(setup)
    for job_id in (job["id"], str(job["id"])):
        body = _callback(url, trainingjob_id=job_id, run_id="run-1", pipeline_name="qoe", extra={"a": [1]})
        response = setup.post(url, json=body)
        assert response.status_code == 200, response.get_json()
        assert response.mimetype == "application/json"
        assert isinstance(response.get_json()["result"], str)
    assert setup.get(f"{JOBS}/{job['id']}").get_json() == job


@pytest.mark.parametrize("run_status", ["SUCCEEDED", "FAILED", "TERMINATED", "Running", "succeeded"])
def test_pipeline_notification_for_a_job_not_training_changes_nothing(setup, app, run_status):
    job = create(setup)
    before = counts(app)
    response = setup.post(CALLBACKS[1], json={"trainingjob_id": str(job["id"]), "run_status": run_status})
    assert response.status_code == 200
    assert "nothing to do" in response.get_json()["result"]
    assert setup.get(f"{JOBS}/{job['id']}").get_json() == job
    assert counts(app) == before


def test_extraction_notification_for_a_job_not_extracting_changes_nothing(setup, app):
    job = create(setup)
    before = counts(app)
    response = setup.post(CALLBACKS[0], json={"trainingjob_id": job["id"]})
    assert response.status_code == 200 and "nothing to do" in response.get_json()["result"]
    assert setup.get(f"{JOBS}/{job['id']}").get_json() == job
    assert counts(app) == before


# ---------------------------------------------------------------------------------------------------- model download
@pytest.fixture
def stored_model(setup, app, tmp_path):
    """A Model.zip in the store for qoe 1 1.0.0, and decoy files outside the store a traversal would reach."""
    store = app.extensions["trainingmgr"].object_store
    payload = b"PK\x03\x04 not really a zip, but bytes to compare"
    source = tmp_path / "upload.zip"
    source.write_bytes(payload)
    store.put_file("qoe", "1/1.0.0/Model.zip", source)
    root = Path(store.root)
    for decoy in (root.parent / "secret" / "Model.zip", root.parent / "x" / "Model.zip",
                  root.parent / "etc" / "1" / "1.0.0" / "Model.zip", root / "qoe" / "secret" / "Model.zip",
                  root / "x" / "Model.zip", root.parent.parent / "etc" / "1" / "1.0.0" / "Model.zip"):
        decoy.parent.mkdir(parents=True, exist_ok=True)
        decoy.write_bytes(b"DECOY outside the store")
    return payload


def test_model_download(stored_model, setup):
    response = setup.get("/model/qoe/1/1.0.0/Model.zip")
    assert response.status_code == 200
    assert response.mimetype == "application/zip"
    assert int(response.headers["Content-Length"]) == len(stored_model)
    assert response.headers["Content-Disposition"].startswith("attachment")
    assert "Model.zip" in response.headers["Content-Disposition"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.data == stored_model


@pytest.mark.parametrize("path", ["/model/nobody/1/1.0.0/Model.zip", "/model/qoe/2/1.0.0/Model.zip",
                                  "/model/qoe/1/1.1.0/Model.zip", "/model/qoe/1/Model.zip"])
def test_unknown_model_is_404(stored_model, setup, path):
    assert_problem(setup.get(path), 404, legacy=True)


@pytest.mark.parametrize(
    "path",
    [
        "/model/..%2F..%2Fetc/1/1.0.0/Model.zip",
        "/model/a/../../x/Model.zip",
        "/model/qoe/1/1.0.0%2F..%2F..%2Fsecret/Model.zip",
        "/model/%2e%2e/1/1.0.0/Model.zip",
        "/model/qoe/%2e%2e/1.0.0/Model.zip",
        "/model/qoe/1/%2e%2e/Model.zip",
        "/model/qoe/1/./Model.zip",
        "/model/a%5C..%5C..%5Csecret/1/1.0.0/Model.zip",
        "/model/qoe%5C..%5Cx/1/1.0.0/Model.zip",
        "/model/qoe/1/1.0.0%5C..%5C..%5Csecret/Model.zip",
        "/model/" + "q" * 5000 + "/1/1.0.0/Model.zip",
        "/model/qoe/" + "1" * 5000 + "/1.0.0/Model.zip",
        "/model/qoe%00/1/1.0.0/Model.zip",
        "/model/.qoe/1/1.0.0/Model.zip",
    ],
)
def test_path_tricks_never_serve_a_file_outside_the_store(stored_model, setup, path):
    response = setup.get(path)
    assert 400 <= response.status_code < 500, response.status_code
    assert response.mimetype == PROBLEM
    assert b"DECOY" not in response.data and stored_model not in response.data
    assert "Exception" in response.get_json()


@pytest.mark.parametrize("path", ["get-model-metrics/abc", "get-model-metrics/1.5", "get-model-metrics/-1"])
def test_metrics_with_a_non_integer_id_is_400_not_a_model_list(client, path):
    response = client.get(f"/ai-ml-model-training/v1/training-jobs/{path}")
    assert response.status_code == 400
    body = response.get_json()
    assert body["status"] == 400 and "Invalid training job id" in body["detail"]
    posted = client.post(f"/ai-ml-model-training/v1/training-jobs/{path.replace('get', 'update')}", json={"a": 1})
    assert posted.status_code == 400


@pytest.mark.parametrize("number", ["NaN", "Infinity", "1e999"])
def test_a_job_or_metrics_with_a_number_json_does_not_have_is_400(refused, setup, number):
    body = json.dumps(job_request()).replace('"epochs": "2"', f'"epochs": {number}')
    assert number in body
    problem = refused(None, data=body, content_type="application/json")
    assert "not valid JSON" in problem["detail"]
    job = create(setup)
    assert setup.post(f"{JOBS}/update-model-metrics/{job['id']}", json={"r2": 0.9}).status_code == 200
    answer = setup.post(f"{JOBS}/update-model-metrics/{job['id']}", data='{"r2": %s}' % number,
                        content_type="application/json")
    assert_problem(answer, 400)
    assert setup.get(f"{JOBS}/get-model-metrics/{job['id']}").get_json() == {"r2": 0.9}  # nothing lost
