"""The framework's own clients, unchanged: the request bodies its installation guide, Postman collection, dashboard
and peers send (the spellings and shapes of the seed, of the older reference and of R1AP v08, mixed as real clients
mix them), with the answers read the way those clients read them."""
from __future__ import annotations

import copy

import pytest

from tests.factories import FG_V1, upload_pipeline as upload
from tests.test_training_lifecycle import FEATURES, RETRAINING_YAML, TRAINING_YAML

JOBS = "/ai-ml-model-training/v1/training-jobs"

# The installation guide's feature group (a CSV here, so nothing reaches out), as its curl sends it: every field.
GUIDE_FEATURE_GROUP = {
    "featuregroup_name": "testing_influxdb", "feature_list": FEATURES, "datalake_source": "CsvSource",
    "host": "", "port": "", "bucket": "", "token": "", "db_org": "", "measurement": "cell_kpis.csv",
    "enable_dme": False, "measured_obj_class": "", "dme_port": "", "source_name": ""}

# R1AP v08, as the current reference documents its training request.
V08_TRAINING = {
    "modelId": {"modelName": "qoe_v08", "modelVersion": "1"},
    "modelLocation": "",
    "trainingConfig": {
        "description": "QoE prediction (R1AP v08 spelling)",
        "dataPipeline": {"feature_group_name": "testing_influxdb", "query_filter": "",
                         "arguments": "{'epochs': 1}".replace("'", '"')},
        "trainingPipeline": {"training_pipeline_name": "qoe_pipeline_g_release",
                             "training_pipeline_version": "qoe_pipeline_g_release",
                             "retraining_pipeline_name": "qoe_pipeline_retrain",
                             "retraining_pipeline_version": "qoe_pipeline_retrain"},
    },
    "trainingDataset": "",
    "validationDataset": "",
    "notificationDestination": "",
    "consumerRAppId": "",
    "producerRAppId": "",
}


@pytest.fixture
def framework(client):
    """What the installation guide sets up: its feature group and its two pipelines, each uploaded once."""
    created = client.post(FG_V1, json=GUIDE_FEATURE_GROUP)
    assert created.status_code == 201, created.get_json()
    assert upload(client, "qoe_pipeline_g_release", TRAINING_YAML)["version_name"] == "qoe_pipeline_g_release"
    assert upload(client, "qoe_pipeline_retrain", RETRAINING_YAML)["version_name"] == "qoe_pipeline_retrain"
    return client


def test_the_guides_v08_training_then_retraining_requests(framework):
    first = framework.post(JOBS, json=V08_TRAINING)
    assert first.status_code == 201, first.get_json()
    again = framework.post(JOBS, json=copy.deepcopy(V08_TRAINING))  # the retraining request is the same body
    assert again.status_code == 201, again.get_json()
    jobs = [first.get_json(), again.get_json()]
    assert [j["modelId"]["artifactversion"] for j in jobs] == ["1.0.0", "1.1.0"]
    assert [j["is_retraining"] for j in jobs] == [False, True]
    # The dashboard's job list and job details show the pipeline names as the request spelled them.
    for job in framework.get(JOBS).get_json():
        config = job["training_config"]
        assert config == V08_TRAINING["trainingConfig"]
        assert config["trainingPipeline"]["training_pipeline_name"] == "qoe_pipeline_g_release"
        assert config["dataPipeline"]["arguments"] == '{"epochs": 1}'


def test_postman_style_mixed_spellings_and_seed_spellings_read_back_as_sent(framework):
    mixed = {
        "model_id": {"modelName": "qoe_mixed", "modelversion": "2"},
        "training_config": {
            "description": "mixed", "dataPipeline": {"feature_group_name": "testing_influxdb", "query_filter": "",
                                                     "arguments": {"epochs": "1"}},
            "trainingPipeline": {"pipeline_name": "qoe_pipeline_g_release", "pipeline_version": "1",
                                 "retraining_pipeline_name": "qoe_pipeline_retrain",
                                 "retraining_pipeline_version": "latest"}},
        "modelLocation": "", "notification_url": "", "consumerRAppId": "rapp-1"}
    job = framework.post(JOBS, json=mixed)
    assert job.status_code == 201, job.get_json()
    read = framework.get(f"{JOBS}/{job.get_json()['id']}").get_json()
    assert read["training_config"]["trainingPipeline"]["pipeline_name"] == "qoe_pipeline_g_release"
    assert "training_pipeline_name" not in read["training_config"]["trainingPipeline"]
    assert read["consumer_rapp_id"] == "rapp-1"
    assert read["modelId"] == {"id": read["modelId"]["id"], "modelname": "qoe_mixed", "modelversion": "2",
                               "artifactversion": "1.0.0"}


def test_the_dashboard_reads_pipelines_versions_experiments_and_feature_groups(framework):
    upload(framework, "qoe_pipeline_g_release", TRAINING_YAML)
    upload(framework, "qoe_pipeline_g_release", TRAINING_YAML, version_name="tuned")
    assert framework.get("/pipelines/qoe_pipeline_g_release/versions").get_json() == [
        "qoe_pipeline_g_release", "2", "tuned"]
    pipelines = framework.get("/pipelines").get_json()
    assert pipelines["total_size"] == 2
    assert [p["display_name"] for p in pipelines["pipelines"]] == pipelines["pipeline_names"]
    assert set(pipelines["pipelines"][0]) == {"pipeline_id", "display_name", "description", "created_at"}
    assert framework.get("/pipelines/qoe_pipeline_g_release").get_json()["pipeline_info"]["versions"][-1] == "tuned"
    assert framework.post(JOBS, json=V08_TRAINING).status_code == 201  # creates the "Default" experiment
    assert framework.get("/pipelines/experiments").get_json() == ["Default"]
    assert framework.get("/experiments").get_json() == {"experiment_names": ["Default"]}
    listed = framework.get(FG_V1).get_json()["FeatureGroups"]
    assert [(fg["featuregroup_name"], type(fg["id"])) for fg in listed] == [("testing_influxdb", int)]
    one = framework.get("/featureGroup/testing_influxdb").get_json()
    assert one["id"] == listed[0]["id"] and one["token"] == ""
    # Edit as the dashboard does: the record as shown, changed, put back; it compares the answer's text.
    edited = {**one, "feature_list": FEATURES}
    edited.pop("featuregroup")
    answer = framework.put("/featureGroup/testing_influxdb", json=edited)
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["result"] == "Feature Group Edited"


def test_a_job_names_a_pipeline_version_by_name_number_or_latest(framework):
    upload(framework, "qoe_pipeline_g_release", TRAINING_YAML, version_name="v2-tuned")
    for version in ("qoe_pipeline_g_release", "1", "v2-tuned", "2", "latest"):
        body = copy.deepcopy(V08_TRAINING)
        body["modelId"]["modelVersion"] = f"by-{version}"
        body["trainingConfig"]["trainingPipeline"]["training_pipeline_version"] = version
        assert framework.post(JOBS, json=body).status_code == 201, version
    body = copy.deepcopy(V08_TRAINING)
    body["trainingConfig"]["trainingPipeline"]["training_pipeline_version"] = "no-such-version"
    assert framework.post(JOBS, json=body).status_code == 404


def test_the_guides_feature_group_create_is_answered_as_its_clients_read_it(client):
    created = client.post(FG_V1, json=GUIDE_FEATURE_GROUP)
    assert created.status_code == 201
    answer = created.get_json()
    assert answer["result"] == "Feature group testing_influxdb created"
    assert answer["featuregroup_name"] == "testing_influxdb" and isinstance(answer["id"], int)
    assert answer["featuregroup"]["id"] == answer["id"]


def test_the_documented_dme_feature_group_with_an_empty_source_name(client, dme):
    body = {"featuregroup_name": "dme_group", "feature_list": "pdcpBytesDl,pdcpBytesUl",
            "datalake_source": "InfluxSource", "host": "127.0.0.1", "port": "8086", "bucket": "pm-bucket",
            "token": "tok", "db_org": "est", "measurement": "test,ManagedElement=nodedntest",
            "enable_dme": True, "measured_obj_class": "NRCellDU", "dme_port": dme.port, "source_name": ""}
    created = client.post(FG_V1, json=body)
    assert created.status_code == 201, created.get_json()
    assert dme.jobs["dme_group"]["job_definition"]["filter"]["sourceNames"] == []


def test_peer_callbacks_and_the_model_storage_metrics_round_trip_still_work(framework):
    job = framework.post(JOBS, json=V08_TRAINING).get_json()
    # The Kubeflow adapter and the data-extraction service call back with string or integer ids.
    assert framework.post("/trainingjob/pipelineNotification",
                          json={"trainingjob_id": str(job["id"]), "run_status": "RUNNING"}).status_code == 200
    assert framework.post("/trainingjob/dataExtractionNotification",
                          json={"trainingjob_id": job["id"]}).status_code == 200
    # The model-storage SDK writes metrics, then reads them back.
    metrics = {"accuracy": 0.91, "loss": 0.2}
    assert framework.post(f"{JOBS}/update-model-metrics/{job['id']}", json=metrics).status_code == 200
    assert framework.get(f"{JOBS}/get-model-metrics/{job['id']}").get_json() == metrics
