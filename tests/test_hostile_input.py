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


# ------------------------------------------------------------------------------------------------- issue 9, round 2
# A security test's findings: each was a 500, an unbounded echo or parse, or a misleading 413 before.
FG_LEGACY = "/featureGroup"
UPLOAD = "/pipelines/qoe_training/upload"


def _multipart(*parts: bytes, boundary: bytes = b"B") -> tuple[bytes, str]:
    body = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts) + b"--" + boundary + b"--\r\n"
    return body, f"multipart/form-data; boundary={boundary.decode()}"


def _file_part(content: bytes, name: bytes = b"file", filename: bytes = b"p.yaml") -> bytes:
    return b'Content-Disposition: form-data; name="' + name + b'"; filename="' + filename + b'"\r\n\r\n' + content


def _pipeline_names(client) -> list[str]:
    return client.get("/pipelines").get_json()["pipeline_names"]


NAMELESS_PARTS = [
    b"Content-Disposition: form-data\r\n\r\nv",
    b'Content-Disposition: form-data; name="a\rb"\r\n\r\nv',
    b'Content-Disposition: form-data; name="a\r\n b"\r\n\r\nv',
    b'Content-Disposition: form-data; filename="p.yaml"\r\n\r\nv',
]


@pytest.mark.parametrize("part", NAMELESS_PARTS, ids=["no-name", "cr-in-name", "crlf-in-name", "file-no-name"])
def test_a_form_part_without_a_usable_name_is_not_a_500(client, part):
    body, content_type = _multipart(part)
    # Before: TypeError in the control-character check (the part's key is None), a 500 on every route.
    assert_problem_details(client.post("/healthz", data=body, content_type=content_type), 405)
    assert_problem_details(client.post(FG_V1, data=body, content_type=content_type), 415)
    problem = assert_problem_details(client.post(UPLOAD, data=body, content_type=content_type), 400)
    assert problem["result"] == problem["detail"] and "'file'" in problem["detail"]
    # Beside a real file, the nameless part is ignored.
    body, content_type = _multipart(part, _file_part((PIPELINES / "qoe_training.yaml").read_bytes()))
    response = client.post(UPLOAD, data=body, content_type=content_type)
    assert response.status_code == 200, response.get_json()
    assert _pipeline_names(client) == ["qoe_training"]


BAD_YAML_VALUES = {
    "int-over-4300-digits": b"a: 1" + b"0" * 10000 + b"\n",
    "explicit-int": b"a: !!int abc\n",
    "impossible-date": b"a: 2001-02-30\n",
    "impossible-time": b"a: 2001-01-01 25:00:00\n",
    "explicit-timestamp": b"a: !!timestamp x\n",
    "explicit-bool": b"a: !!bool maybe\n",
    "explicit-float": b"a: !!float .\n",
    "nested-too-deeply": b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n",
}


@pytest.mark.parametrize("content", BAD_YAML_VALUES.values(), ids=BAD_YAML_VALUES.keys())
def test_a_pipeline_yaml_value_that_cannot_be_read_is_a_400_with_result(app, client, content):
    # Before: PyYAML let the constructor's ValueError (Python's int-digit limit, datetime's ranges), AttributeError
    # or KeyError through: a 500.
    problem = assert_problem_details(client.post(UPLOAD, data={"file": (io.BytesIO(content), "p.yaml")},
                                                 content_type="multipart/form-data"), 400)
    assert problem["result"] == problem["detail"]
    assert problem["detail"].startswith("The file is not valid YAML: "), problem
    assert "line 1 column" in problem["detail"]
    assert len(problem["detail"]) < 300  # the value itself is not echoed
    assert _pipeline_names(client) == []


def test_an_unreadable_value_in_a_later_yaml_document_is_refused_at_upload(client):
    # The engines read every document of the file at run time: a bad one is refused now, not when a job runs.
    content = (PIPELINES / "qoe_training.yaml").read_bytes() + b"\n---\nplatforms: 2001-02-30\n"
    problem = assert_problem_details(client.post(UPLOAD, data={"file": (io.BytesIO(content), "p.yaml")},
                                                 content_type="multipart/form-data"), 400)
    assert "cannot be read" in problem["result"]
    assert _pipeline_names(client) == []


def test_json_nested_too_deeply_inside_a_string_or_a_cursor_is_a_400(client):
    import base64

    # Before: RecursionError from json.loads, a 500 (json_body itself already answered 400).
    cursor = base64.urlsafe_b64encode(b"[" * 5000).decode().rstrip("=")
    for path in (f"{FG_V1}?cursor={cursor}", f"{JOBS}?cursor={cursor}"):
        problem = assert_problem_details(client.get(path), 400)
        assert "cursor" in problem["errors"], problem
    body = job_request()
    body["training_config"]["dataPipeline"]["arguments"] = "[" * 5000
    problem = assert_problem_details(client.post(JOBS, json=body), 400)
    assert "training_config.dataPipeline.arguments" in problem["errors"], problem


@pytest.mark.parametrize("path", [FG_V1, FG_LEGACY])
def test_bulk_delete_of_a_huge_name_neither_echoes_nor_logs_it_in_full(client, caplog, path):
    import logging

    caplog.set_level(logging.INFO, logger="trainingmgr.services.feature_groups")
    create_feature_group(client)
    huge = "n" * 1_000_000  # under TM_MAX_JSON_BYTES; before: echoed and logged in full (15 MB at 16 MiB)
    response = client.delete(path, json={"featuregroups_list": [{"featureGroup_name": "cell_kpis"},
                                                                {"featureGroup_name": huge},
                                                                {"featureGroup_name": "bad-name!"}]})
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    assert len(response.get_data()) < 1000
    body = response.get_json()
    assert body["success_count"] == 1 and body["failure_count"] == 2
    assert [f["featureGroup_name"] for f in body["failures"]] == ["n" * 64 + "…", "bad-name!"]
    assert body["failures"][0]["reason"].startswith("invalid name")
    [record] = [r for r in caplog.records if r.getMessage() == "feature groups deleted"]
    assert record.failed == ["n" * 64 + "…", "bad-name!"] and record.deleted == ["cell_kpis"]
    assert len(caplog.text) < 10_000


def test_the_json_body_limit_is_one_mebibyte_by_default_and_at_least_1024():
    from trainingmgr.config import Settings, SettingsError

    assert Settings().max_json_bytes == 1024 * 1024
    assert Settings.from_env({"TM_MAX_JSON_BYTES": "4096"}).max_json_bytes == 4096
    with pytest.raises(SettingsError, match="TM_MAX_JSON_BYTES"):
        Settings.from_env({"TM_MAX_JSON_BYTES": "1000"})


@pytest.mark.parametrize("path", [FG_V1, FG_LEGACY])
def test_a_json_body_over_the_json_limit_is_a_413_naming_it(app, client, path):
    create_feature_group(client)
    # Before: 2 MiB of entries was parsed in full (14 MB took 3.7 s) before the 1000-entry check answered 400.
    raw = json.dumps({"featuregroups_list": [{"featureGroup_name": "cell_kpis"}] * 60_000})
    assert 1024 * 1024 < len(raw) < 16 * 1024 * 1024
    problem = assert_problem_details(client.delete(path, data=raw, content_type="application/json"), 413)
    assert "1048576 bytes" in problem["detail"]
    assert client.get(f"{FG_V1}/cell_kpis").status_code == 200


class _Unreadable(io.BytesIO):
    """A body of 4096 bytes (its length is announced) that fails the test when a byte of it is read."""

    def __init__(self) -> None:
        super().__init__(b" " * 4096)

    def _read(self, *args):
        raise AssertionError("the body was read")

    read = read1 = readinto = readline = readlines = _read


def test_a_json_body_announced_over_the_limit_is_refused_before_it_is_read(build_app):
    client = build_app(max_json_bytes=2048).test_client()
    response = client.open(FG_V1, method="POST", input_stream=_Unreadable(), content_type="application/json")
    assert response.request.content_length == 4096
    assert "2048 bytes" in assert_problem_details(response, 413)["detail"]


def test_a_chunked_json_body_over_the_limit_is_a_413_too(build_app):
    client = build_app(max_json_bytes=2048).test_client()
    raw = json.dumps(feature_group_body(feature_list=",".join(f"f{i}" for i in range(600)))).encode()
    assert len(raw) > 2048
    response = client.open(FG_V1, method="POST", input_stream=io.BytesIO(raw), content_type="application/json",
                           headers={"Transfer-Encoding": "chunked"}, environ_overrides={"wsgi.input_terminated": True})
    assert response.request.content_length is None
    assert "2048 bytes" in assert_problem_details(response, 413)["detail"]
    assert client.get(FG_V1).get_json()["featuregroups"] == []


def test_the_smaller_of_the_json_and_the_route_limits_applies(app, client, build_app):
    job_id = _job(app, client)
    big = json.dumps({"accuracy": 0.9, "padding": "x" * 3000})
    for settings in ({"max_json_bytes": 2048, "max_metrics_bytes": 4096},
                     {"max_json_bytes": 8192, "max_metrics_bytes": 2048},
                     {"max_json_bytes": 8192, "max_body_bytes": 2048}):
        limited = build_app(**settings).test_client()  # the same database
        problem = assert_problem_details(
            limited.post(f"{JOBS}/update-model-metrics/{job_id}", data=big, content_type="application/json"), 413)
        assert "2048 bytes" in problem["detail"], (settings, problem)
    assert _stored_metrics(app, job_id) is None


def test_a_pipeline_upload_over_the_json_limit_is_still_accepted(build_app):
    client = build_app(max_json_bytes=2048).test_client()
    content = (PIPELINES / "qoe_training.yaml").read_bytes() + b"\n" + b"# padding\n" * 300_000  # 3 MB
    response = client.post(UPLOAD, data={"file": (io.BytesIO(content), "p.yaml")}, content_type="multipart/form-data")
    assert response.status_code == 200, response.get_json()


def test_a_form_of_too_many_parts_is_a_413_saying_so(client):
    parts = [b'Content-Disposition: form-data; name="f%d"\r\n\r\nv' % i for i in range(1001)]
    body, content_type = _multipart(_file_part((PIPELINES / "qoe_training.yaml").read_bytes()), *parts)
    assert len(body) < 16 * 1024 * 1024
    # Before: "Request body is larger than the limit of 16777216 bytes" (or, read again, a 400 for a missing file).
    problem = assert_problem_details(client.post(UPLOAD, data=body, content_type=content_type), 413)
    assert problem["result"] == problem["detail"]
    assert "too many parts" in problem["detail"] and "1000" in problem["detail"]
    assert "bytes" not in problem["detail"]
    assert_problem_details(client.post("/healthz", data=body, content_type=content_type), 405)
    assert _pipeline_names(client) == []


def test_a_form_field_over_the_form_memory_limit_is_a_413_saying_so(client):
    data = {"file": (io.BytesIO((PIPELINES / "qoe_training.yaml").read_bytes()), "p.yaml"),
            "description": "d" * 600_000}
    problem = assert_problem_details(client.post(UPLOAD, data=data, content_type="multipart/form-data"), 413)
    assert "500000 bytes" in problem["detail"] and "16777216" not in problem["detail"]
    assert _pipeline_names(client) == []


@pytest.mark.parametrize("request_id", ['a"b', "a'b", "<script>", "a b", "caf\xe9", "\xff\xfe", "a\tb", "x" * 65,
                                        "a/b", "a;b", "a,b"])
def test_a_request_id_outside_the_allowed_characters_is_replaced(client, request_id):
    import re

    # Before: echoed verbatim (invalid UTF-8 bytes, quotes and <> included) into the header and the log.
    response = client.get("/healthz", headers={"X-Request-ID": request_id})
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])


@pytest.mark.parametrize("request_id", ["a", "trace-abc-123", "req.1:2_x-Y", "x" * 64,
                                        "123e4567-e89b-12d3-a456-426614174000"])
def test_a_request_id_of_the_allowed_characters_is_kept(client, request_id):
    assert client.get("/healthz", headers={"X-Request-ID": request_id}).headers["X-Request-ID"] == request_id


# ------------------------------------------------------------------------------------------------- audit trail
def _audit_lines(caplog) -> list:
    return [r for r in caplog.records if r.name == "trainingmgr.audit"]


def test_every_write_logs_one_audit_line_without_secrets(client, caplog):
    body = feature_group_body("audited_fg", token="very-secret-token-value")
    with caplog.at_level("INFO", logger="trainingmgr.audit"):
        assert client.post(FG_V1, json=body).status_code == 201
        assert client.get(f"{FG_V1}/audited_fg").status_code == 200  # a read: no audit line
        assert client.put(f"{FG_V1}/audited_fg", json={**body, "token": "****", "host": "other.svc"}).status_code \
            == 400
        assert client.delete(f"{JOBS}/999").status_code == 404
    lines = _audit_lines(caplog)
    assert [(r.method, r.route, r.outcome, r.status) for r in lines] == [
        ("POST", FG_V1, "done", 201),
        ("PUT", f"{FG_V1}/<featuregroup_name>", "refused", 400),
        ("DELETE", f"{JOBS}/<int:training_job_id>", "refused", 404),
    ]
    assert all(r.principal == "anonymous" for r in lines)
    assert lines[0].object["created"].endswith("/featureGroup/audited_fg")
    assert lines[1].object == {"featuregroup_name": "audited_fg"}
    assert lines[2].object == {"training_job_id": "999"}
    assert "very-secret-token-value" not in caplog.text


def test_an_audit_line_is_bounded_whatever_the_path(client, caplog):
    with caplog.at_level("INFO", logger="trainingmgr.audit"):
        client.put(f"{FG_V1}/{'n' * 5000}", json=feature_group_body("x"))
    (line,) = _audit_lines(caplog)
    assert len(line.object["featuregroup_name"]) == 64
