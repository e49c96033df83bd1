"""With a Model Management Service configured (a local HTTP double of its discovery API, tests/peers.py)."""
import io

import pytest

from tests.factories import create_feature_group
from tests.peers import MmeDouble
from tests.test_training_lifecycle import JOBS, TRAINING_YAML, RETRAINING_YAML, job_request
from trainingmgr import create_app

FEATURES = "prbUsageDl,activeUes,throughputDl"


@pytest.fixture
def mme():
    double = MmeDouble().start()
    yield double
    double.stop()


@pytest.fixture
def mme_client(app, settings, mme):  # `app` empties the tables afterwards
    app = create_app(settings.replace(mme_url=mme.url, http_timeout=2.0))
    client = app.test_client()
    create_feature_group(client, "kpi_a", feature_list=FEATURES)
    create_feature_group(client, "kpi_b", feature_list="sinrMean,throughputDl")
    for name, path in (("qoe_training", TRAINING_YAML), ("qoe_retraining", RETRAINING_YAML)):
        r = client.post(f"/pipelines/{name}/upload", data={"file": (io.BytesIO(path.read_bytes()), path.name)},
                        content_type="multipart/form-data")
        assert r.status_code == 200
    return client


def request_for(model="qoe", location="", fg=""):
    body = job_request(model)
    body["training_config"]["dataPipeline"]["feature_group_name"] = fg
    body["model_location"] = location
    return body


def count_jobs(client):
    return len(client.get(JOBS).get_json())


def test_a_registered_model_gets_its_feature_group_from_input_data_type(mme_client, mme):
    mme.register("qoe", "1", "s3://models/qoe", " throughputDl , prbUsageDl,activeUes")
    response = mme_client.post(JOBS, json=request_for(location="s3://models/qoe"))
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["training_config"]["dataPipeline"]["feature_group_name"] == "kpi_a"
    assert mme.requests[0].path == "/ai-ml-model-discovery/v1/models?model-name=qoe&model-version=1"


def test_an_unregistered_model_is_400(mme_client, mme):
    response = mme_client.post(JOBS, json=request_for(fg="kpi_a"))
    assert response.status_code == 400 and "not registered" in response.get_json()["detail"]
    assert count_jobs(mme_client) == 0


def test_a_model_location_that_differs_is_400(mme_client, mme):
    mme.register("qoe", "1", "s3://models/qoe", FEATURES)
    response = mme_client.post(JOBS, json=request_for(location="s3://elsewhere", fg="kpi_a"))
    assert response.status_code == 400 and "model_location" in response.get_json()["detail"]
    assert count_jobs(mme_client) == 0


def test_no_feature_group_matching_input_data_type_is_400(mme_client, mme):
    mme.register("qoe", "1", "", "rsrpMean")
    response = mme_client.post(JOBS, json=request_for())
    assert response.status_code == 400 and "inputDataType" in response.get_json()["detail"]


@pytest.mark.parametrize("status", [500, 503])
def test_a_failing_mme_is_502_and_nothing_is_written(mme_client, mme, status):
    mme.fail_with = status
    response = mme_client.post(JOBS, json=request_for(fg="kpi_a"))
    assert response.status_code == 502 and response.get_json()["title"] == "Bad Gateway"
    assert count_jobs(mme_client) == 0


def test_an_unreachable_mme_is_502_and_not_ready(mme_client, mme):
    mme.stop()
    assert mme_client.post(JOBS, json=request_for(fg="kpi_a")).status_code == 502
    ready = mme_client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["checks"]["model_management"] == "unreachable"
