"""Errors at the HTTP edge: unknown routes, methods, bodies, sizes, crashes; request ids; health checks."""
from __future__ import annotations

import json
import re
from typing import Any, Callable, Iterator

import pytest
from flask import Flask

from tests.factories import assert_problem_details, FG_V1, create_feature_group, feature_group_body
from trainingmgr import create_app
from trainingmgr.extensions import db

LEGACY = "/featureGroup"


def assert_problem(response: Any, status: int, title: str) -> dict[str, Any]:
    return assert_problem_details(response, status, title)


def names(client: Any) -> list[str]:
    response = client.get(FG_V1)
    assert response.status_code == 200
    return [fg["featuregroup_name"] for fg in response.get_json()["featuregroups"]]


@pytest.fixture
def make_app(settings) -> Iterator[Callable[..., Flask]]:
    """Apps built by the test itself (other settings, extra routes); their engines are closed afterwards."""
    built: list[Flask] = []

    def make(**changes: Any) -> Flask:
        app = create_app(settings.replace(**changes) if changes else settings)
        built.append(app)
        return app

    yield make
    for app in built:
        with app.app_context():
            db.engine.dispose()


# Requests that carry a body, so each body error is checked on every route that reads one.
BODY_ROUTES = [
    pytest.param("post", FG_V1, id="create"),
    pytest.param("put", f"{FG_V1}/cell_kpis", id="update-v1"),
    pytest.param("put", f"{LEGACY}/cell_kpis", id="update-legacy"),
    pytest.param("delete", FG_V1, id="delete-v1"),
    pytest.param("delete", LEGACY, id="delete-legacy"),
]


@pytest.fixture
def existing(app, client) -> dict[str, Any]:
    """One stored group, and how it reads, to prove a bad request changed nothing."""
    create_feature_group(client)
    return client.get(f"{FG_V1}/cell_kpis").get_json()


def assert_unchanged(client: Any, existing: dict[str, Any]) -> None:
    assert names(client) == ["cell_kpis"]
    assert client.get(f"{FG_V1}/cell_kpis").get_json() == existing


# ---------------------------------------------------------------------------------------------------- routing


@pytest.mark.parametrize("path", ["/no/such/route", "/featureGroup/", "/featureGroups"])
def test_unknown_legacy_route_is_404_with_exception(client, path):
    body = assert_problem(client.get(path), 404, "Not Found")
    assert path in body["detail"]
    assert body["Exception"] == body["detail"]


def test_unknown_r1ap_route_is_404_without_exception(client):
    body = assert_problem(client.get("/ai-ml-model-training/v1/nothing-here"), 404, "Not Found")
    assert "Exception" not in body


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("patch", FG_V1, {"GET", "POST", "DELETE"}),
        ("put", FG_V1, {"GET", "POST", "DELETE"}),
        ("patch", f"{FG_V1}/cell_kpis", {"GET", "PUT"}),
        ("delete", f"{LEGACY}/cell_kpis", {"GET", "PUT"}),
        ("post", LEGACY, {"DELETE"}),
        ("post", "/healthz", {"GET"}),
    ],
)
def test_wrong_method_is_405_with_allow(client, method, path, allowed):
    response = getattr(client, method)(path, json=feature_group_body())
    body = assert_problem(response, 405, "Method Not Allowed")
    assert method.upper() in body["detail"]
    allow = {m.strip() for m in response.headers["Allow"].split(",")}
    assert allowed <= allow
    assert method.upper() not in allow
    assert names(client) == []


# ---------------------------------------------------------------------------------------------------- bodies


@pytest.mark.parametrize("method, path", BODY_ROUTES)
@pytest.mark.parametrize(
    "data",
    ['{"featuregroup_name": ', "{'single': 'quotes'}", "", "{} {}", "not json"],
    ids=["truncated", "single-quotes", "empty", "two-values", "text"],
)
def test_malformed_json_is_400(client, existing, method, path, data):
    response = getattr(client, method)(path, data=data, content_type="application/json")
    body = assert_problem(response, 400, "Bad Request")
    assert "not valid JSON" in body["detail"]
    assert_unchanged(client, existing)


@pytest.mark.parametrize("method, path", BODY_ROUTES)
@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
def test_a_number_json_does_not_have_is_400(client, existing, method, path, number):
    """Python's json reads NaN, Infinity and 1e999 (as inf); JSON has none of them, and a database or a client
    reading them back would fail (PostgreSQL's json refuses NaN: a 500 before)."""
    data = '{"featuregroup_name": "cell_kpis", "value": %s, "arguments": {"epochs": %s}}' % (number, number)
    body = assert_problem(getattr(client, method)(path, data=data, content_type="application/json"), 400, "Bad Request")
    assert "not valid JSON" in body["detail"] and ("not a JSON number" in body["detail"] or "too large" in body["detail"])
    assert_unchanged(client, existing)


@pytest.mark.parametrize("method, path", BODY_ROUTES)
@pytest.mark.parametrize(
    "payload",
    [[feature_group_body()], "cell_kpis", 42, None, True],
    ids=["array", "string", "number", "null", "true"],
)
def test_a_json_body_that_is_not_an_object_is_400(client, existing, method, path, payload):
    response = getattr(client, method)(path, data=json.dumps(payload), content_type="application/json")
    body = assert_problem(response, 400, "Bad Request")
    assert "JSON object" in body["detail"]
    assert_unchanged(client, existing)


@pytest.mark.parametrize("method, path", BODY_ROUTES)
@pytest.mark.parametrize(
    "content_type", ["text/plain", None, "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
def test_a_body_that_is_not_declared_json_is_415(client, existing, method, path, content_type):
    data = json.dumps(feature_group_body(host="changed.host"))
    if method == "delete":
        data = json.dumps({"featuregroups_list": [{"featureGroup_name": "cell_kpis"}]})
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = getattr(client, method)(path, data=data, headers=headers)
    body = assert_problem(response, 415, "Unsupported Media Type")
    assert "application/json" in body["detail"]
    if content_type is None:
        assert "absent" in body["detail"]
    assert_unchanged(client, existing)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/merge-patch+json"])
def test_json_content_types_with_parameters_or_suffix_are_accepted(client, content_type):
    response = client.post(FG_V1, data=json.dumps(feature_group_body()), headers={"Content-Type": content_type})
    assert response.status_code == 201, response.get_json()
    assert names(client) == ["cell_kpis"]


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(feature_group_body()).encode().replace(b"cell_kpis", b"cell_\xffkpis", 1),
        b'{"featuregroup_name": "\xc3\x28"}',
        b'{"a": "\xed\xa0\x80"}',  # an encoded surrogate
    ],
    ids=["ff-byte", "bad-continuation", "surrogate"],
)
def test_invalid_utf8_is_400(client, raw):
    response = client.post(FG_V1, data=raw, content_type="application/json")
    body = assert_problem(response, 400, "Bad Request")
    assert "UTF-8" in body["detail"]
    assert names(client) == []


@pytest.mark.parametrize("field", ["token", "host", "feature_list", "measurement"])
@pytest.mark.parametrize("nested", [False, True], ids=["value", "unknown-key"])
def test_an_unpaired_surrogate_escape_is_400_not_500(client, field, nested):
    body = feature_group_body()
    if nested:
        body["extra"] = {"deep": [{field: "x\ud800y"}]}
    else:
        body[field] = "x\ud800y"
    raw = json.dumps(body)  # ASCII, with the escape \ud800 in it
    assert "\\ud800" in raw
    response = client.post(FG_V1, data=raw, content_type="application/json")
    body = assert_problem(response, 400, "Bad Request")
    assert "surrogate" in body["detail"]
    assert names(client) == []


def test_paired_surrogate_escapes_and_a_bom_are_accepted(client):
    raw = json.dumps(feature_group_body(measurement="kpis \U0001f4e1"))  # an escaped surrogate pair
    assert "\\ud83d\\udce1" in raw
    response = client.post(FG_V1, data=b"\xef\xbb\xbf" + raw.encode(), content_type="application/json")
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["featuregroup"]["measurement"] == "kpis \U0001f4e1"
    assert client.get(f"{FG_V1}/cell_kpis").get_json()["measurement"] == "kpis \U0001f4e1"


@pytest.mark.parametrize(
    "data",
    ["[" * 100_000 + "]" * 100_000, '{"port": ' + "9" * 5000 + "}"],
    ids=["deeply-nested", "huge-integer"],
)
def test_json_the_parser_cannot_hold_is_400_not_500(client, data):
    response = client.post(FG_V1, data=data, content_type="application/json")
    body = assert_problem(response, 400, "Bad Request")
    assert "not valid JSON" in body["detail"]
    assert names(client) == []


def test_an_oversized_body_is_413_and_writes_nothing(client, make_app):
    small = make_app(max_body_bytes=2048).test_client()
    body = feature_group_body(feature_list=",".join(f"feature_{i}" for i in range(300)))
    raw = json.dumps(body)
    assert len(raw) > 2048
    response = small.post(FG_V1, data=raw, content_type="application/json")
    problem = assert_problem(response, 413, "Request Entity Too Large")
    assert "2048" in problem["detail"]
    assert names(small) == []
    assert names(client) == []
    # The same app takes a body under the limit.
    assert small.post(FG_V1, json=feature_group_body()).status_code == 201


def test_an_oversized_body_on_a_legacy_route_carries_exception(client, make_app):
    small = make_app(max_body_bytes=2048).test_client()
    create_feature_group(client)
    raw = json.dumps({"featuregroups_list": [{"featureGroup_name": "cell_kpis"}] * 100})
    assert len(raw) > 2048
    response = small.delete(LEGACY, data=raw, content_type="application/json")
    assert_problem(response, 413, "Request Entity Too Large")
    assert names(client) == ["cell_kpis"]


# ---------------------------------------------------------------------------------------------------- 500


@pytest.mark.parametrize("path", ["/boom", "/ai-ml-model-training/v1/boom"])
def test_an_unexpected_error_is_500_without_its_text_but_with_a_request_id(make_app, path):
    app = make_app()

    def boom():
        raise RuntimeError("boom-secret")

    app.add_url_rule(path, "boom", boom)
    response = app.test_client().get(path)
    body = assert_problem(response, 500, "Internal Server Error")
    text = response.get_data(as_text=True)
    assert "boom-secret" not in text
    assert "RuntimeError" not in text
    assert "Traceback" not in text
    request_id = body["request_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert response.headers["X-Request-ID"] == request_id
    assert request_id in body["detail"]


def test_an_unexpected_error_quotes_the_callers_request_id(make_app):
    app = make_app()

    def boom():
        raise RuntimeError("boom-secret")

    app.add_url_rule("/boom", "boom", boom)
    response = app.test_client().get("/boom", headers={"X-Request-ID": "trace-abc-123"})
    body = assert_problem(response, 500, "Internal Server Error")
    assert body["request_id"] == "trace-abc-123"
    assert response.headers["X-Request-ID"] == "trace-abc-123"
    assert "boom-secret" not in response.get_data(as_text=True)


# ---------------------------------------------------------------------------------------------------- request ids


@pytest.mark.parametrize(
    "method, path, status",
    [("get", "/healthz", 200), ("get", FG_V1, 200), ("get", "/no/such/route", 404), ("patch", FG_V1, 405)],
)
def test_a_callers_request_id_is_echoed(client, method, path, status):
    response = getattr(client, method)(path, headers={"X-Request-ID": "req-42"})
    assert response.status_code == status
    assert response.headers["X-Request-ID"] == "req-42"


def test_a_request_id_is_made_when_none_is_given(client):
    first = client.get("/healthz").headers["X-Request-ID"]
    second = client.get("/healthz").headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert re.fullmatch(r"[0-9a-f]{32}", second)
    assert first != second


def test_an_overlong_request_id_is_replaced(client):
    response = client.get("/healthz", headers={"X-Request-ID": "x" * 65})
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])


def test_a_request_id_on_an_error_is_the_same_in_header_and_on_a_valid_post(client):
    response = client.post(FG_V1, json=feature_group_body(), headers={"X-Request-ID": "create-1"})
    assert response.status_code == 201
    assert response.headers["X-Request-ID"] == "create-1"
    response = client.post(FG_V1, json=feature_group_body(), headers={"X-Request-ID": "create-2"})
    assert_problem(response, 409, "Conflict")
    assert response.headers["X-Request-ID"] == "create-2"


# ---------------------------------------------------------------------------------------------------- health


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_json() == {"status": "ok"}


def test_readyz(client, worker):
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["checks"]["database"] == "ok"
    assert body["status"] == "ready"
