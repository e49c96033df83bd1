"""Feature groups over HTTP: create, list, get, update, bulk delete, token secrecy.

Every bad input is checked for its ProblemDetails body AND for leaving the database as it was.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any

import pytest
from sqlalchemy import select, text

from tests.factories import (FG_V1, add_training_job, assert_problem_details, create_feature_group,
                             create_file_feature_group, feature_group_body)
from trainingmgr.extensions import db
from trainingmgr.logs import JsonFormatter
from trainingmgr.models import FeatureGroup
from trainingmgr.services.pagination import encode_cursor

LEGACY = "/featureGroup"
TOKEN = feature_group_body()["token"]
# Required whatever the source; then what an InfluxSource needs (the token present, possibly empty).
REQUIRED = ("featuregroup_name", "feature_list", "datalake_source", "measurement", "enable_dme")
INFLUX_REQUIRED = {"host": "Required, not empty, for an InfluxSource.",
                   "port": "Required, not empty, for an InfluxSource.",
                   "bucket": "Required, not empty, for an InfluxSource.",
                   "db_org": "Required, not empty, for an InfluxSource.",
                   "token": "Required for an InfluxSource (it may be empty)."}
# The by-name routes exist under both prefixes; only the legacy one carries the "Exception" key.
BY_NAME_PREFIXES = [pytest.param(FG_V1, id="v1"), pytest.param(LEGACY, id="legacy")]
BULK_PATHS = [pytest.param(FG_V1, id="v1"), pytest.param(LEGACY, id="legacy")]


# ---------------------------------------------------------------------------------------------------- helpers


def assert_problem(response: Any, status: int, *, errors: tuple[str, ...] = ()) -> dict[str, Any]:
    """A ProblemDetails answer with `status`; `errors` lists fields that must be named in body["errors"]."""
    body = assert_problem_details(response, status)
    for name in errors:
        assert name in body.get("errors", {}), body
        messages = body["errors"][name]
        assert isinstance(messages, list) and messages and all(isinstance(m, str) and m for m in messages)
        # The detail sums the errors up, naming each field.
        assert name in body["detail"]
    return body


def expected_view(body: dict[str, Any], answered: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the service answers for a feature group created from `body` (with the id the service gave it)."""
    view = {k: v for k, v in body.items() if k != "id"}
    if answered is not None:
        assert isinstance(answered["id"], int) and answered["id"] > 0
        view["id"] = answered["id"]
    view["token"] = "****" if body["token"] else ""
    view["port"] = str(body["port"])
    for optional in ("measured_obj_class", "dme_port", "source_name"):
        view[optional] = str(body[optional]) if body.get(optional) is not None else ""
    return view


def names(client: Any) -> list[str]:
    response = client.get(FG_V1)
    assert response.status_code == 200
    return [fg["featuregroup_name"] for fg in response.get_json()["featuregroups"]]


def row(app: Any, name: str) -> dict[str, Any] | None:
    """The stored row, every column (token_encrypted and updated_at included), or None."""
    with app.app_context():
        fg = db.session.scalar(select(FeatureGroup).where(FeatureGroup.name == name))
        if fg is None:
            return None
        return {c.key: getattr(fg, c.key) for c in FeatureGroup.__mapper__.column_attrs}


def clear_token(app: Any, name: str) -> str:
    with app.app_context():
        fg = db.session.scalar(select(FeatureGroup).where(FeatureGroup.name == name))
        return app.extensions["trainingmgr"].feature_groups().token(fg)


def without(body: dict[str, Any], field: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != field}


# ---------------------------------------------------------------------------------------------------- create


def test_create_answers_201_with_the_group_and_a_location(client):
    body = feature_group_body()
    response = client.post(FG_V1, json=body)
    assert response.status_code == 201
    assert response.mimetype == "application/json"
    assert response.headers["Location"] == f"{FG_V1}/cell_kpis"
    answer = response.get_json()
    assert "cell_kpis" in answer["result"]
    assert answer["featuregroup"] == expected_view(body, answer["featuregroup"])
    # The record's fields at the top level too, as the reference's clients read them.
    assert {k: v for k, v in answer.items() if k not in ("result", "featuregroup")} == answer["featuregroup"]
    # The Location leads to the same group.
    got = client.get(response.headers["Location"])
    assert got.status_code == 200
    assert got.get_json()["featuregroup"] == answer["featuregroup"]
    assert names(client) == ["cell_kpis"]


def test_create_with_dme_fields(client, dme):
    body = feature_group_body(
        "dme_group", host="127.0.0.1", enable_dme=True, measured_obj_class="NRCellDU", dme_port=dme.port,
        source_name="gnb_1",
    )
    response = client.post(FG_V1, json=body)
    assert response.status_code == 201, response.get_json()
    fg = response.get_json()["featuregroup"]
    assert fg == expected_view(body, fg)
    assert (fg["enable_dme"], fg["measured_obj_class"], fg["dme_port"], fg["source_name"]) == (
        True,
        "NRCellDU",
        dme.port,
        "gnb_1",
    )
    assert list(dme.jobs) == ["dme_group"]


@pytest.mark.parametrize("source_name", ["", None])
def test_a_dme_feature_group_without_a_source_name_filters_on_no_source(client, dme, source_name):
    """The reference's documented DME example sends "source_name": "": accepted; the DME job then names no source."""
    body = feature_group_body("dme_nosrc", host="127.0.0.1", enable_dme=True, measured_obj_class="NRCellDU",
                              dme_port=dme.port, source_name=source_name)
    response = client.post(FG_V1, json=body)
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["source_name"] == ""
    job = dme.jobs["dme_nosrc"]
    assert job["job_definition"]["filter"]["sourceNames"] == []


def test_port_sent_as_a_json_integer_is_answered_as_a_string(client, dme):
    fg = create_feature_group(client, host="127.0.0.1", port=8086, enable_dme=True, measured_obj_class="C",
                              dme_port=int(dme.port), source_name="s")
    assert fg["port"] == "8086"
    assert fg["dme_port"] == dme.port
    got = client.get(f"{FG_V1}/cell_kpis").get_json()["featuregroup"]
    assert (got["port"], got["dme_port"]) == ("8086", dme.port)


def test_strings_are_trimmed_and_ports_normalised(client):
    fg = create_feature_group(client, " trimmed_name ", host="  influx  ", port=" 08086 ")
    assert fg["featuregroup_name"] == "trimmed_name"
    assert fg["host"] == "influx"
    assert fg["port"] == "8086"


@pytest.mark.parametrize("port", ["1", "65535"])
def test_port_bounds_are_accepted(client, port):
    assert create_feature_group(client, port=port)["port"] == port


@pytest.mark.parametrize("source", ["CsvSource", "ParquetSource"])
def test_a_file_source_needs_only_its_file(client, source):
    body = {"featuregroup_name": "file_group", "feature_list": "a,b", "datalake_source": source,
            "measurement": "cell_kpis.csv", "enable_dme": False}
    response = client.post(FG_V1, json=body)
    assert response.status_code == 201, response.get_json()
    view = response.get_json()["featuregroup"]
    assert {k: view[k] for k in ("host", "port", "bucket", "token", "db_org")} == dict.fromkeys(
        ("host", "port", "bucket", "token", "db_org"), "")
    # The fields as clients send them all, empty (the dashboard's form), are accepted too.
    again = {**body, "featuregroup_name": "file_group_2", "host": "", "port": "", "bucket": "", "token": "",
             "db_org": ""}
    assert client.post(FG_V1, json=again).status_code == 201


@pytest.mark.parametrize("source", ["CsvSource", "ParquetSource"])
@pytest.mark.parametrize("field,value", [("host", "influxdb"), ("port", "8086"), ("bucket", "b"), ("token", "t"),
                                         ("db_org", "o")])
def test_a_file_source_accepts_connection_fields_it_does_not_use_and_keeps_none(app, client, source, field, value):
    """Clients such as the dashboard send every field: accepted, and stored as "" (no secret is kept for a source
    that never uses it)."""
    body = {"featuregroup_name": "file_group", "feature_list": "a,b", "datalake_source": source,
            "measurement": "cell_kpis.csv", "enable_dme": False, field: value}
    response = client.post(FG_V1, json=body)
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["featuregroup"][field] == ""
    if field == "token":
        assert clear_token(app, "file_group") == ""
    else:
        assert row(app, "file_group")[field] == ""


def test_a_file_source_stored_with_connection_fields_can_be_put_back(app, client):
    """File feature groups stored before this rule carry InfluxDB fields: what GET shows them with goes back in a
    PUT (the dashboard's edit), and the fields are cleared."""
    create_file_feature_group(client, "old_csv", measurement="cell_kpis.csv", feature_list="a,b")
    with app.app_context():
        db.session.execute(text("UPDATE feature_groups SET host = 'influx', port = '1', bucket = 'b', db_org = 'o' "
                                "WHERE name = 'old_csv'"))
        db.session.commit()
    shown = client.get(f"{FG_V1}/old_csv").get_json()["featuregroup"]
    assert shown["host"] == "influx"
    response = client.put(f"{FG_V1}/old_csv", json=shown)
    assert response.status_code == 200, response.get_json()
    assert {k: response.get_json()["featuregroup"][k] for k in ("host", "port", "bucket", "db_org")} == \
        dict.fromkeys(("host", "port", "bucket", "db_org"), "")


@pytest.mark.parametrize("source", ["CsvSource", "ParquetSource"])
@pytest.mark.parametrize("value", [None, "", "  "])
def test_a_file_source_needs_its_file(client, source, value):
    body = {"featuregroup_name": "file_group", "feature_list": "a,b", "datalake_source": source,
            "enable_dme": False}
    if value is not None:
        body["measurement"] = value
    assert_problem(client.post(FG_V1, json=body), 400, errors=("measurement",))
    assert names(client) == []


def test_a_file_source_still_needs_a_valid_port_when_one_is_given(client):
    # The port's rule (digits, 1 to 65535) holds for every source.
    body = feature_group_body("csv_group", datalake_source="CsvSource", host="", port="http", bucket="", token="",
                              db_org="", measurement="x.csv")
    assert_problem(client.post(FG_V1, json=body), 400, errors=("port",))
    assert names(client) == []


def test_duplicate_name_is_409_and_leaves_the_original(app, client):
    create_feature_group(client)
    before = row(app, "cell_kpis")
    response = client.post(FG_V1, json=feature_group_body(host="other.host", token="other-token"))
    body = assert_problem(response, 409)
    assert "cell_kpis" in body["detail"]
    assert row(app, "cell_kpis") == before
    assert clear_token(app, "cell_kpis") == TOKEN
    assert names(client) == ["cell_kpis"]


@pytest.mark.parametrize("field", REQUIRED)
def test_create_without_a_required_field_is_400(client, field):
    response = client.post(FG_V1, json=without(feature_group_body(), field))
    body = assert_problem(response, 400, errors=(field,))
    assert body["errors"][field] == ["Missing data for required field."]
    assert names(client) == []


@pytest.mark.parametrize("field", sorted(INFLUX_REQUIRED))
def test_create_of_an_influx_source_without_a_field_it_reads_is_400(client, field):
    response = client.post(FG_V1, json=without(feature_group_body(), field))
    body = assert_problem(response, 400, errors=(field,))
    assert body["errors"][field] == [INFLUX_REQUIRED[field]]
    assert names(client) == []


def test_create_with_an_unknown_field_is_400(client):
    response = client.post(FG_V1, json=feature_group_body(colour="red"))
    assert_problem(response, 400, errors=("colour",))
    assert names(client) == []


def test_every_missing_field_is_named_at_once(client):
    body = assert_problem(client.post(FG_V1, json={}), 400, errors=REQUIRED)
    assert set(body["errors"]) == set(REQUIRED)
    assert names(client) == []


@pytest.mark.parametrize(
    "field, value",
    [
        ("feature_list", ["pdcpBytesDl", "pdcpBytesUl"]),
        ("feature_list", ""),
        ("feature_list", "a,,b"),
        ("enable_dme", "yes"),
        ("enable_dme", 1),
        ("enable_dme", "true"),
        ("enable_dme", None),
        ("port", "abc"),
        ("port", "70000"),
        ("port", "65536"),
        ("port", "0"),
        ("port", "-1"),
        ("port", ""),
        ("port", True),
        ("port", 8086.5),
        ("port", None),
        ("port", "80 86"),
        ("port", "²"),  # a digit to str.isdigit(), not to int()
        ("port", "８０８６"),  # full-width digits
        ("port", "9" * 5000),
        ("token", 12345),
        ("token", None),
        ("host", 42),
        ("host", "h" * 256),
        ("bucket", "b" * 256),
        ("db_org", "o" * 256),
        ("measurement", "m" * 256),
        ("measured_obj_class", "c" * 256),
        ("source_name", "s" * 256),
        ("dme_port", "x"),
        ("dme_port", 0),
        ("datalake_source", 7),
    ],
    ids=lambda v: repr(v)[:20],
)
def test_create_with_a_mistyped_field_is_400(client, field, value):
    response = client.post(FG_V1, json=feature_group_body(**{field: value}))
    assert_problem(response, 400, errors=(field,))
    assert names(client) == []


def test_the_longest_allowed_strings_are_stored(client):
    long = "x" * 255
    longest_host = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # a host name has at most 253 characters
    fg = create_feature_group(client, host=longest_host, bucket=long, db_org=long, measurement=long)
    assert (fg["host"], fg["bucket"], fg["db_org"], fg["measurement"]) == (longest_host, long, long, long)


@pytest.mark.parametrize("name", ["ab", "bad-name!", "a" * 64, "", "with space", "naïve_name", "dot.name"])
def test_create_with_a_bad_name_is_400(client, name):
    response = client.post(FG_V1, json=feature_group_body(name))
    assert_problem(response, 400, errors=("featuregroup_name",))
    assert names(client) == []


def test_a_name_of_63_characters_is_accepted(client):
    name = "n" * 63
    assert create_feature_group(client, name)["featuregroup_name"] == name
    assert client.get(f"{FG_V1}/{name}").status_code == 200


@pytest.mark.parametrize("source", ["MongoSource", "influxsource", "", "InfluxSourceX"])
def test_create_with_a_bad_datalake_source_is_400(client, source):
    response = client.post(FG_V1, json=feature_group_body(datalake_source=source))
    assert_problem(response, 400, errors=("datalake_source",))
    assert names(client) == []


@pytest.mark.parametrize("field", ["host", "port", "bucket", "db_org", "measurement"])
@pytest.mark.parametrize("value", ["", "   ", None])
def test_influx_source_needs_non_empty_connection_fields(client, field, value):
    body = feature_group_body()
    if value is None:
        del body[field]
    else:
        body[field] = value
    problem = assert_problem(client.post(FG_V1, json=body), 400, errors=(field,))
    if field != "measurement" or value is not None:  # a missing measurement is "required" for every source
        assert problem["errors"][field] == ["Required, not empty, for an InfluxSource."]
    assert names(client) == []


def test_influx_source_token_may_be_empty(client):
    # An InfluxDB without authentication: the token is the one connection field that may be empty.
    assert create_feature_group(client, token="")["token"] == ""


@pytest.mark.parametrize(
    "given",
    [
        {},
        {"dme_port": "31823", "source_name": "gnb_1"},
        {"measured_obj_class": "NRCellDU", "source_name": "gnb_1"},
        {"measured_obj_class": "", "dme_port": "31823", "source_name": ""},
        {"measured_obj_class": None, "dme_port": None, "source_name": None},
    ],
    ids=["none", "no_class", "no_port", "empty", "nulls"],
)
def test_enable_dme_needs_its_class_and_port(client, given):
    response = client.post(FG_V1, json=feature_group_body(enable_dme=True, **given))
    missing = tuple(f for f in ("measured_obj_class", "dme_port") if not given.get(f))
    body = assert_problem(response, 400, errors=missing)
    assert set(body["errors"]) == set(missing)
    for f in missing:
        assert body["errors"][f] == ["Required when enable_dme is true."]
    assert names(client) == []


# ---------------------------------------------------------------------------------------------------- token secrecy


def test_token_is_masked_in_every_response(client):
    responses = [client.post(FG_V1, json=feature_group_body())]
    assert responses[0].get_json()["featuregroup"]["token"] == "****"
    for prefix in (FG_V1, LEGACY):
        got = client.get(f"{prefix}/cell_kpis")
        assert got.get_json()["token"] == "****"
        assert got.get_json()["featuregroup"]["token"] == "****"
        responses.append(got)
    listed = client.get(FG_V1)
    assert [fg["token"] for fg in listed.get_json()["featuregroups"]] == ["****"]
    assert [fg["token"] for fg in listed.get_json()["FeatureGroups"]] == ["****"]
    responses.append(listed)
    for prefix in (FG_V1, LEGACY):
        updated = client.put(f"{prefix}/cell_kpis", json=feature_group_body(host="h2"))
        assert updated.status_code == 200
        assert updated.get_json()["featuregroup"]["token"] == "****"
        responses.append(updated)
    for response in responses:
        assert TOKEN not in response.get_data(as_text=True)


def test_token_is_encrypted_at_rest(app, client):
    create_feature_group(client)
    with app.app_context():
        fg = db.session.scalar(select(FeatureGroup).where(FeatureGroup.name == "cell_kpis"))
        assert fg.token_encrypted
        assert fg.token_encrypted != TOKEN
        assert TOKEN not in fg.token_encrypted
        assert app.extensions["trainingmgr"].feature_groups().token(fg) == TOKEN


def test_token_never_reaches_a_log_or_a_response(app, client, caplog):
    caplog.set_level(logging.INFO)
    responses = [
        client.post(FG_V1, json=feature_group_body()),
        client.post(FG_V1, json=feature_group_body()),  # 409
        client.post(FG_V1, json=feature_group_body("bad-name!")),  # 400
        client.put(f"{FG_V1}/cell_kpis", json=feature_group_body(host="h2")),
        client.put(f"{LEGACY}/cell_kpis", json=feature_group_body(host="h2", measurement="m3", token="****")),
        client.get(f"{FG_V1}/cell_kpis"),
        client.get(f"{LEGACY}/cell_kpis"),
        client.get(FG_V1),
        client.delete(LEGACY, json={"featuregroups_list": [{"featureGroup_name": "cell_kpis"}]}),
    ]
    assert [r.status_code for r in responses] == [201, 409, 400, 200, 200, 200, 200, 200, 200]
    messages = caplog.messages
    # The capture works: the service's own lines are there.
    assert "feature group created" in messages
    assert "feature group updated" in messages
    assert "feature groups deleted" in messages
    formatter = JsonFormatter()
    for record in caplog.records:
        assert TOKEN not in record.getMessage()
        assert TOKEN not in formatter.format(record)  # extras included
    assert TOKEN not in caplog.text
    for response in responses:
        assert TOKEN not in response.get_data(as_text=True)


# ---------------------------------------------------------------------------------------------------- list


def test_list_of_nothing(client):
    response = client.get(FG_V1)
    assert response.status_code == 200
    assert response.get_json() == {"featuregroups": [], "FeatureGroups": []}
    assert "Link" not in response.headers


def test_list_has_both_keys_ordered_by_name(client):
    created = {name: create_feature_group(client, name) for name in ["charlie", "alpha", "bravo"]}
    response = client.get(FG_V1)
    assert response.status_code == 200
    body = response.get_json()
    assert body["featuregroups"] == [created["alpha"], created["bravo"], created["charlie"]]
    assert body["FeatureGroups"] == body["featuregroups"]
    assert "Link" not in response.headers


def _next_link(response: Any) -> str | None:
    link = response.headers.get("Link")
    if link is None:
        return None
    match = re.fullmatch(r'<([^>]+)>; rel="next"', link)
    assert match, link
    return match.group(1)


def test_paging_follows_the_link_header_over_every_group_once(client):
    all_names = ["delta", "alpha", "echo", "charlie", "bravo"]
    for name in all_names:
        create_feature_group(client, name)
    seen: list[str] = []
    sizes: list[int] = []
    url: str | None = f"{FG_V1}?limit=2"
    while url is not None:
        response = client.get(url)
        assert response.status_code == 200
        page = [fg["featuregroup_name"] for fg in response.get_json()["featuregroups"]]
        assert [fg["featuregroup_name"] for fg in response.get_json()["FeatureGroups"]] == page
        seen += page
        sizes.append(len(page))
        url = _next_link(response)
        if url is not None:
            assert url.startswith(f"{FG_V1}?") and "limit=2" in url and "cursor=" in url
        assert len(sizes) <= 5, "the Link chain does not end"
    assert sizes == [2, 2, 1]
    assert seen == sorted(all_names)


def test_a_page_that_ends_exactly_at_the_last_group_has_no_link(client):
    for name in ["alpha", "bravo"]:
        create_feature_group(client, name)
    response = client.get(f"{FG_V1}?limit=2")
    assert len(response.get_json()["featuregroups"]) == 2
    assert "Link" not in response.headers


@pytest.mark.parametrize("limit", ["0", "1001", "x", "-1", "", "2.5"])
def test_list_with_a_bad_limit_is_400(client, limit):
    create_feature_group(client)
    response = client.get(FG_V1, query_string={"limit": limit})
    assert_problem(response, 400, errors=("limit",))


@pytest.mark.parametrize("cursor", ["***", "not-a-cursor", encode_cursor(5), encode_cursor(True), encode_cursor(None)])
def test_list_with_a_bad_cursor_is_400(client, cursor):
    create_feature_group(client)
    response = client.get(FG_V1, query_string={"cursor": cursor})
    assert_problem(response, 400, errors=("cursor",))


# ---------------------------------------------------------------------------------------------------- get


@pytest.mark.parametrize("prefix", BY_NAME_PREFIXES)
def test_get_answers_the_group_wrapped_and_bare(client, prefix):
    created = create_feature_group(client)
    response = client.get(f"{prefix}/cell_kpis")
    assert response.status_code == 200
    body = response.get_json()
    assert body["featuregroup"] == created
    assert {k: v for k, v in body.items() if k != "featuregroup"} == created


@pytest.mark.parametrize("prefix", BY_NAME_PREFIXES)
def test_get_of_an_unknown_group_is_404(client, prefix):
    create_feature_group(client)
    body = assert_problem(client.get(f"{prefix}/no_such_group"), 404)
    assert "no_such_group" in body["detail"]


@pytest.mark.parametrize("prefix", BY_NAME_PREFIXES)
@pytest.mark.parametrize("name", ["ab", "bad-name!", "a" * 64])
def test_get_with_an_invalid_name_is_400(client, prefix, name):
    assert_problem(client.get(f"{prefix}/{name}"), 400)


# ---------------------------------------------------------------------------------------------------- update


@pytest.mark.parametrize("prefix", BY_NAME_PREFIXES)
def test_update_changes_the_fields_and_a_masked_token_keeps_the_stored_one(app, client, prefix, dme):
    # The token's destination (source, host, port, bucket, org) stays, so "****" keeps the stored token.
    create_feature_group(client, host="127.0.0.1", port=9999, bucket="b2", db_org="org2")
    before = row(app, "cell_kpis")
    body = feature_group_body(
        feature_list="a,b",
        datalake_source="InfluxSource",
        host="127.0.0.1",
        port=9999,
        bucket="b2",
        token="****",
        db_org="org2",
        measurement="m2",
        enable_dme=True,
        measured_obj_class="NRCellCU",
        dme_port=dme.port,
        source_name="gnb_2",
    )
    response = client.put(f"{prefix}/cell_kpis", json=body)
    assert response.status_code == 200, response.get_json()
    answer = response.get_json()
    assert answer["result"] == "Feature Group Edited"  # the reference's words: its clients compare them
    assert answer["featuregroup"] == expected_view(body, answer["featuregroup"])
    assert client.get(f"{FG_V1}/cell_kpis").get_json()["featuregroup"] == answer["featuregroup"]
    after = row(app, "cell_kpis")
    assert after["token_encrypted"] == before["token_encrypted"]
    assert after["id"] == before["id"]
    assert clear_token(app, "cell_kpis") == TOKEN
    assert names(client) == ["cell_kpis"]


def test_update_can_clear_the_optional_dme_fields(client, dme):
    create_feature_group(client, host="127.0.0.1", enable_dme=True, measured_obj_class="C", dme_port=dme.port,
                         source_name="s")
    assert list(dme.jobs) == ["cell_kpis"]
    response = client.put(f"{FG_V1}/cell_kpis", json=feature_group_body(host="127.0.0.1", token="****"))
    assert dme.jobs == {}  # DME turned off: its information job is deleted
    assert response.status_code == 200
    fg = response.get_json()["featuregroup"]
    assert (fg["enable_dme"], fg["measured_obj_class"], fg["dme_port"], fg["source_name"]) == (False, "", "", "")


@pytest.mark.parametrize("prefix", BY_NAME_PREFIXES)
def test_update_with_a_new_token_replaces_it(app, client, prefix):
    create_feature_group(client)
    before = row(app, "cell_kpis")
    response = client.put(f"{prefix}/cell_kpis", json=feature_group_body(token="brand-new-token"))
    assert response.status_code == 200
    assert response.get_json()["featuregroup"]["token"] == "****"
    assert "brand-new-token" not in response.get_data(as_text=True)
    assert row(app, "cell_kpis")["token_encrypted"] != before["token_encrypted"]
    assert clear_token(app, "cell_kpis") == "brand-new-token"


@pytest.mark.parametrize("prefix", BY_NAME_PREFIXES)
def test_update_cannot_rename(app, client, prefix):
    create_feature_group(client)
    before = row(app, "cell_kpis")
    response = client.put(f"{prefix}/cell_kpis", json=feature_group_body("other_name", host="h2"))
    assert_problem(response, 400, errors=("featuregroup_name",))
    assert row(app, "cell_kpis") == before
    assert names(client) == ["cell_kpis"]


@pytest.mark.parametrize("prefix", BY_NAME_PREFIXES)
def test_update_of_an_unknown_group_is_404(app, client, prefix):
    create_feature_group(client)
    before = row(app, "cell_kpis")
    body = assert_problem(client.put(f"{prefix}/ghost_group", json=feature_group_body("ghost_group")), 404)
    assert "ghost_group" in body["detail"]
    assert names(client) == ["cell_kpis"]
    assert row(app, "cell_kpis") == before


@pytest.mark.parametrize("prefix", BY_NAME_PREFIXES)
def test_update_with_an_invalid_path_name_is_400(client, prefix):
    assert_problem(client.put(f"{prefix}/bad-name!", json=feature_group_body()), 400)


@pytest.mark.parametrize("prefix", BY_NAME_PREFIXES)
@pytest.mark.parametrize(
    "changes, field",
    [
        ({"port": "abc"}, "port"),
        ({"enable_dme": "yes"}, "enable_dme"),
        ({"host": ""}, "host"),
        ({"datalake_source": "Nope"}, "datalake_source"),
        ({"enable_dme": True}, "measured_obj_class"),
        ({"extra": 1}, "extra"),
        ({"token": 5}, "token"),
        ({"bucket": "b" * 256}, "bucket"),
    ],
    ids=lambda v: repr(v)[:24],
)
def test_update_with_an_invalid_body_is_400_and_changes_nothing(app, client, prefix, changes, field):
    create_feature_group(client)
    before = row(app, "cell_kpis")
    # The other fields would be a change: none of them may be applied.
    body = feature_group_body(host="changed.host", feature_list="x,y", token="changed-token")
    body.update(changes)
    assert_problem(client.put(f"{prefix}/cell_kpis", json=body), 400, errors=(field,))
    assert row(app, "cell_kpis") == before
    assert clear_token(app, "cell_kpis") == TOKEN


@pytest.mark.parametrize("prefix", BY_NAME_PREFIXES)
@pytest.mark.parametrize("field", ["featuregroup_name", "token", "port", "enable_dme"])
def test_update_without_a_required_field_is_400(app, client, prefix, field):
    create_feature_group(client)
    before = row(app, "cell_kpis")
    response = client.put(f"{prefix}/cell_kpis", json=without(feature_group_body(host="h2"), field))
    assert_problem(response, 400, errors=(field,))
    assert row(app, "cell_kpis") == before


# ---------------------------------------------------------------------------------------------------- bulk delete


def delete_body(*group_names: str) -> dict[str, Any]:
    return {"featuregroups_list": [{"featureGroup_name": n} for n in group_names]}


def assert_counts(body: dict[str, Any], ok: int, failed: int) -> None:
    assert body["success_count"] == ok
    assert body["failure_count"] == failed
    assert body["success count"] == ok
    assert body["failure count"] == failed
    assert len(body["failures"]) == failed


@pytest.mark.parametrize("path", BULK_PATHS)
def test_bulk_delete_removes_the_listed_groups(client, path):
    for name in ["alpha", "bravo", "charlie"]:
        create_feature_group(client, name)
    response = client.delete(path, json=delete_body("alpha", "charlie"))
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert_counts(body, 2, 0)
    assert body["failures"] == []
    assert names(client) == ["bravo"]
    assert client.get(f"{FG_V1}/alpha").status_code == 404


@pytest.mark.parametrize("path", BULK_PATHS)
def test_bulk_delete_of_an_unknown_group_is_a_failure(client, path):
    create_feature_group(client)
    body = client.delete(path, json=delete_body("ghost_group")).get_json()
    assert_counts(body, 0, 1)
    assert body["failures"] == [{"featureGroup_name": "ghost_group", "reason": "does not exist"}]
    assert names(client) == ["cell_kpis"]


@pytest.mark.parametrize("path", BULK_PATHS)
def test_bulk_delete_keeps_a_group_used_by_a_training_job(app, client, path):
    create_feature_group(client)
    add_training_job(app, "cell_kpis")
    before = row(app, "cell_kpis")
    response = client.delete(path, json=delete_body("cell_kpis"))
    assert response.status_code == 200
    body = response.get_json()
    assert_counts(body, 0, 1)
    [failure] = body["failures"]
    assert failure["featureGroup_name"] == "cell_kpis"
    assert "training job" in failure["reason"]
    assert row(app, "cell_kpis") == before
    assert client.get(f"{LEGACY}/cell_kpis").status_code == 200


@pytest.mark.parametrize("path", BULK_PATHS)
def test_bulk_delete_of_a_mixed_list(app, client, path):
    for name in ["free_one", "free_two", "busy_one"]:
        create_feature_group(client, name)
    add_training_job(app, "busy_one")
    response = client.delete(path, json=delete_body("free_one", "ghost_group", "busy_one", "bad-name!", "free_two"))
    assert response.status_code == 200
    body = response.get_json()
    assert_counts(body, 2, 3)
    failures = {f["featureGroup_name"]: f["reason"] for f in body["failures"]}
    assert [f["featureGroup_name"] for f in body["failures"]] == ["ghost_group", "busy_one", "bad-name!"]
    assert failures["ghost_group"] == "does not exist"
    assert "training job" in failures["busy_one"]
    assert failures["bad-name!"].startswith("invalid name")
    assert names(client) == ["busy_one"]


def test_bulk_delete_of_the_same_name_twice(client):
    create_feature_group(client)
    body = client.delete(FG_V1, json=delete_body("cell_kpis", "cell_kpis")).get_json()
    assert_counts(body, 1, 1)
    assert body["failures"] == [{"featureGroup_name": "cell_kpis", "reason": "does not exist"}]
    assert names(client) == []


@pytest.mark.parametrize("path", BULK_PATHS)
@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "featuregroups_list"),
        ({"featuregroups_list": []}, "featuregroups_list"),
        ({"featuregroups_list": None}, "featuregroups_list"),
        ({"featuregroups_list": "cell_kpis"}, "featuregroups_list"),
        ({"featuregroups_list": {"featureGroup_name": "cell_kpis"}}, "featuregroups_list"),
        ({"featuregroups_list": [{}]}, "featuregroups_list.0.featureGroup_name"),
        ({"featuregroups_list": [{"name": "cell_kpis"}]}, "featuregroups_list.0.featureGroup_name"),
        (
            {"featuregroups_list": [{"featureGroup_name": "cell_kpis"}, {"featureGroup_name": 5}]},
            "featuregroups_list.1.featureGroup_name",
        ),
        ({"featuregroups_list": ["cell_kpis"]}, "featuregroups_list.0"),
        ({"featuregroups_list": [{"featureGroup_name": "cell_kpis"}], "extra": True}, "extra"),
        ({"featuregroups_list": [{"featureGroup_name": "cell_kpis"}] * 1001}, "featuregroups_list"),
    ],
    ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else v,
)
def test_bulk_delete_with_a_bad_body_is_400_and_deletes_nothing(app, client, path, body, field):
    create_feature_group(client)
    before = row(app, "cell_kpis")
    assert_problem(client.delete(path, json=body), 400, errors=(field,))
    assert names(client) == ["cell_kpis"]
    assert row(app, "cell_kpis") == before


# ---------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("prefix", BY_NAME_PREFIXES)
def test_what_get_answers_can_be_put_back_unchanged(app, client, prefix):
    """A UI edits what GET shows: the masked token and the "" of absent DME fields go back in a PUT."""
    create_feature_group(client)
    stored = row(app, "cell_kpis")
    shown = client.get(f"{prefix}/cell_kpis").get_json()["featuregroup"]
    response = client.put(f"{prefix}/cell_kpis", json=shown)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["featuregroup"] == shown
    after = row(app, "cell_kpis")
    assert after["token_encrypted"] == stored["token_encrypted"]
    assert after["dme_port"] is None and after["measured_obj_class"] is None
    assert clear_token(app, "cell_kpis") == TOKEN


def test_create_with_the_mask_as_token_is_400(client):
    assert_problem(client.post(FG_V1, json=feature_group_body(token="****")), 400, errors=("token",))
    assert names(client) == []


@pytest.mark.parametrize("limit", ["²", "9" * 5000, "１０"])
def test_list_with_a_non_ascii_or_huge_limit_is_400(client, limit):
    create_feature_group(client)
    assert_problem(client.get(FG_V1, query_string={"limit": limit}), 400, errors=("limit",))


def test_list_order_is_byte_order_on_every_backend(client):
    for name in ("b_group", "A_group", "a_group", "_group", "B_group"):
        create_feature_group(client, name)
    assert names(client) == ["A_group", "B_group", "_group", "a_group", "b_group"]


@pytest.mark.parametrize("field, value", [("host", "attacker.example"), ("port", "9999"), ("bucket", "other"),
                                          ("db_org", "other_org"), ("datalake_source", "CsvSource")])
def test_the_masked_token_does_not_follow_a_changed_destination(app, client, field, value):
    """A PUT with "token": "****" keeps the stored token only while it still goes where it was given for; a changed
    destination needs the token again (else the next extraction would send the stored secret to the new host)."""
    create_feature_group(client)
    before = row(app, "cell_kpis")
    body = feature_group_body(token="****", **{field: value})
    problem = assert_problem(client.put(f"{FG_V1}/cell_kpis", json=body), 400, errors=("token",))
    assert field in problem["errors"]["token"][0] and "Send the token again" in problem["errors"]["token"][0]
    assert row(app, "cell_kpis") == before
    assert clear_token(app, "cell_kpis") == TOKEN
    # With the token sent again, the change is made.
    again = client.put(f"{FG_V1}/cell_kpis", json=feature_group_body(token="new-token", **{field: value}))
    assert again.status_code == 200, again.get_json()


def test_the_masked_token_is_kept_when_the_destination_stays(app, client):
    create_feature_group(client)
    body = feature_group_body(token="****", feature_list="a,b,c", measurement="other_measurement")
    assert client.put(f"{FG_V1}/cell_kpis", json=body).status_code == 200
    assert clear_token(app, "cell_kpis") == TOKEN
