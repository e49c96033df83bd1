"""Feature groups with enable_dme and their DME information jobs, against a local HTTP double of the DME
(tests/peers.py DmeDouble): the database and the DME side stay consistent on every failure path."""
import json

import pytest

from tests.factories import FG_V1, feature_group_body
from trainingmgr.extensions import db
from trainingmgr.models import FeatureGroup


def dme_body(dme, name="pm_group", **changes):
    fields = {"host": "127.0.0.1", "enable_dme": True, "measured_obj_class": "NRCellDU", "dme_port": dme.port,
              "source_name": "gnb_1,gnb_2"}
    return feature_group_body(name, **{**fields, **changes})


def rows(app):
    with app.app_context():
        return [fg.name for fg in db.session.scalars(db.select(FeatureGroup))]


def test_create_puts_the_information_job_the_dme_expects(client, dme):
    response = client.post(FG_V1, json=dme_body(dme))
    assert response.status_code == 201
    [request] = dme.requests
    assert (request.method, request.path) == ("PUT", "/data-consumer/v1/info-jobs/pm_group")
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.body) == {
        "info_type_id": "PmData",
        "job_owner": "console",
        "job_definition": {
            "filter": {
                "sourceNames": ["gnb_1", "gnb_2"],
                "measObjInstIds": [],
                "measTypeSpecs": [{"measuredObjClass": "NRCellDU",
                                   "measTypes": ["pdcpBytesDl", "pdcpBytesUl", "prbUsage"]}],
                "measuredEntityDns": [],
            },
            "deliveryInfo": {"topic": "pmreports", "bootStrapServers": "kafka-1-kafka-bootstrap.nonrtric:9097"},
        },
    }


@pytest.mark.parametrize("status", [400, 500, 503])
def test_a_refused_create_stores_no_row(app, client, dme, status):
    dme.fail_with = status
    response = client.post(FG_V1, json=dme_body(dme))
    assert response.status_code == 502
    body = response.get_json()
    assert body["title"] == "Bad Gateway" and "not created" in body["detail"]
    assert rows(app) == []


def test_an_unreachable_dme_stores_no_row(app, client, dme):
    port = dme.port
    dme.stop()
    response = client.post(FG_V1, json=dme_body(dme, dme_port=port))
    assert response.status_code == 502
    assert rows(app) == []


def test_delete_removes_the_job_then_the_row(app, client, dme):
    assert client.post(FG_V1, json=dme_body(dme)).status_code == 201
    response = client.delete(FG_V1, json={"featuregroups_list": [{"featureGroup_name": "pm_group"}]})
    assert response.get_json()["success_count"] == 1
    assert dme.jobs == {} and rows(app) == []
    assert [r.method for r in dme.requests] == ["PUT", "DELETE"]


def test_a_failed_job_delete_keeps_the_row(app, client, dme):
    assert client.post(FG_V1, json=dme_body(dme)).status_code == 201
    dme.fail_with = 500
    body = client.delete(FG_V1, json={"featuregroups_list": [{"featureGroup_name": "pm_group"}]}).get_json()
    assert (body["success_count"], body["failure_count"]) == (0, 1)
    assert "DME" in body["failures"][0]["reason"]
    assert rows(app) == ["pm_group"]


def test_a_job_already_gone_from_the_dme_does_not_block_the_delete(app, client, dme):
    assert client.post(FG_V1, json=dme_body(dme)).status_code == 201
    dme.jobs.clear()  # removed on the DME side by someone else: DELETE answers 404
    body = client.delete(FG_V1, json={"featuregroups_list": [{"featureGroup_name": "pm_group"}]}).get_json()
    assert body["success_count"] == 1 and rows(app) == []


def test_update_enabling_disabling_and_failing(app, client, dme):
    assert client.post(FG_V1, json=feature_group_body("pm_group", host="127.0.0.1")).status_code == 201
    assert dme.requests == []
    # Enabling creates the job.
    assert client.put(f"{FG_V1}/pm_group", json=dme_body(dme, token="****")).status_code == 200
    assert list(dme.jobs) == ["pm_group"]
    # A failing DME leaves both sides as they were.
    dme.fail_with = 500
    response = client.put(f"{FG_V1}/pm_group", json=dme_body(dme, token="****", measured_obj_class="Other"))
    assert response.status_code == 502
    assert client.get(f"{FG_V1}/pm_group").get_json()["measured_obj_class"] == "NRCellDU"
    off = feature_group_body("pm_group", host="127.0.0.1", token="****")
    assert client.put(f"{FG_V1}/pm_group", json=off).status_code == 502
    assert client.get(f"{FG_V1}/pm_group").get_json()["enable_dme"] is True
    # Disabling deletes the job.
    dme.fail_with = None
    assert client.put(f"{FG_V1}/pm_group", json=off).status_code == 200
    assert dme.jobs == {} and client.get(f"{FG_V1}/pm_group").get_json()["enable_dme"] is False
