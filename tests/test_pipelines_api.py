"""Pipelines and experiments over HTTP: upload (versions), list, get, versions, experiments, errors.

Every bad upload is checked for its ProblemDetails body (with `result`) AND for storing nothing: no row, no file.
(No `from __future__ import annotations` here: kfp reads the test pipeline's annotations as real types.)
"""
import hashlib
import io
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.factories import assert_problem_details
import yaml
from sqlalchemy import select

from trainingmgr.errors import BadRequest, NotFound
from trainingmgr.extensions import db
from trainingmgr.models import Pipeline, PipelineVersion



@pytest.fixture
def settings(settings, tmp_path):
    """The conftest settings (each backend), with a data folder of this test's own: stored files are checked."""
    return settings.replace(data_dir=str(tmp_path / "data"))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from kfp import compiler, dsl
    from kfp.dsl import Model, Output

    @dsl.component(install_kfp_package=False, packages_to_install=[], base_image="python:3.11")
    def train(featurepath: str, epochs: str, model: Output[Model]):
        import os

        os.makedirs(model.path, exist_ok=True)

    @dsl.pipeline(name="qoe-training")
    def qoe_training(featurepath: str, epochs: str = "1"):
        train(featurepath=featurepath, epochs=epochs)

    path = tmp_path_factory.mktemp("compiled") / "qoe.yaml"
    compiler.Compiler().compile(qoe_training, str(path))
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------------- helpers
def upload(client: Any, name: str, content: bytes, description: str | None = None, filename: str = "p.yaml"):
    data: dict[str, Any] = {"file": (io.BytesIO(content), filename)}
    if description is not None:
        data["description"] = description
    return client.post(f"/pipelines/{name}/upload", data=data, content_type="multipart/form-data")


def uploaded(client: Any, name: str, content: bytes, description: str | None = None) -> dict[str, Any]:
    response = upload(client, name, content, description)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def assert_problem(response: Any, status: int, *, result: bool = False) -> dict[str, Any]:
    body = assert_problem_details(response, status)
    assert body["Exception"] == body["detail"]  # every route here is outside the R1AP prefix
    if result:
        assert body["result"] == body["detail"]
    return body


def data_dir(app: Any) -> Path:
    return app.extensions["trainingmgr"].settings.data_path


def stored_files(app: Any) -> list[str]:
    root = data_dir(app) / "pipelines"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []


def names(client: Any) -> list[str]:
    response = client.get("/pipelines")
    assert response.status_code == 200
    return response.get_json()["pipeline_names"]


def rows(app: Any) -> list[tuple[str, int, str, str]]:
    with app.app_context():
        return [
            (p.name, v.number, v.file_path, v.sha256)
            for v, p in db.session.execute(
                select(PipelineVersion, Pipeline).join(Pipeline).order_by(Pipeline.name, PipelineVersion.number)
            )
        ]


# ---------------------------------------------------------------------------------------------------- upload
def test_first_upload_creates_version_1_and_stores_the_file(app, client, compiled):
    body = uploaded(client, "qoe_pipeline", compiled, "trains the QoE model")
    assert body == {"result": "Pipeline qoe_pipeline version 1 uploaded", "pipeline_name": "qoe_pipeline", "version": "1",
                    "version_name": "qoe_pipeline"}  # as in Kubeflow: the first version is named after the pipeline
    sha = hashlib.sha256(compiled).hexdigest()
    assert rows(app) == [("qoe_pipeline", 1, "pipelines/qoe_pipeline/1.yaml", sha)]
    assert (data_dir(app) / "pipelines" / "qoe_pipeline" / "1.yaml").read_bytes() == compiled
    assert stored_files(app) == ["qoe_pipeline/1.yaml"]  # no temporary file left behind
    with app.app_context():
        service = app.extensions["trainingmgr"].pipelines()
        version = service.resolve_version("qoe_pipeline", "1")
        assert service.file_for(version).read_bytes() == compiled
        assert version.engine_ref is None  # the embedded engine keeps no registry


def test_later_uploads_add_versions(app, client, compiled):
    uploaded(client, "qoe_pipeline", compiled, "first")
    second = compiled + b"\n# retrained variant\n"
    body = uploaded(client, "qoe_pipeline", second, "second")
    assert body == {"result": "Pipeline qoe_pipeline version 2 uploaded", "pipeline_name": "qoe_pipeline", "version": "2",
                    "version_name": "2"}
    assert client.get("/pipelines/qoe_pipeline/versions").get_json() == ["qoe_pipeline", "2"]
    assert (data_dir(app) / "pipelines" / "qoe_pipeline" / "2.yaml").read_bytes() == second
    assert (data_dir(app) / "pipelines" / "qoe_pipeline" / "1.yaml").read_bytes() == compiled
    info = client.get("/pipelines/qoe_pipeline").get_json()["pipeline_info"]
    assert info["versions"] == ["qoe_pipeline", "2"]
    assert info["description"] == "first"  # the pipeline keeps its first description; versions have their own
    with app.app_context():
        service = app.extensions["trainingmgr"].pipelines()
        assert [v.description for v in service.list_versions("qoe_pipeline")] == ["first", "second"]


def test_upload_without_description(client, compiled):
    uploaded(client, "plain", compiled)
    assert client.get("/pipelines/plain").get_json()["pipeline_info"]["description"] == ""


def test_names_with_dots_and_dashes_are_fine(client, compiled):
    for name in ("qoe.v2", "-dash", "a", "x" * 128):
        assert uploaded(client, name, compiled)["version"] == "1"
    assert sorted(names(client)) == sorted(["qoe.v2", "-dash", "a", "x" * 128])


def test_a_multi_document_file_is_accepted(client, compiled):
    # kfp writes the platform config as a second YAML document when a pipeline has one.
    content = compiled + b"\n---\nplatforms:\n  kubernetes: {}\n"
    assert uploaded(client, "with_platform", content)["version"] == "1"


def test_concurrent_uploads_of_one_name_get_distinct_versions(app, compiled):
    count = 4
    barrier = threading.Barrier(count)
    answers: list[Any] = []
    contents = [compiled + f"\n# upload {i}\n".encode() for i in range(count)]

    def send(i: int) -> None:
        client = app.test_client()
        barrier.wait()
        response = upload(client, "raced", contents[i], f"upload {i}")
        answers.append((response.status_code, response.get_json()))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [status for status, _ in answers] == [200] * count, answers
    assert sorted(int(body["version"]) for _, body in answers) == list(range(1, count + 1))
    # Each stored file is the one its row describes.
    for name, number, file_path, sha in rows(app):
        assert hashlib.sha256((data_dir(app) / file_path).read_bytes()).hexdigest() == sha
    assert len({sha for *_, sha in rows(app)}) == count


# ---------------------------------------------------------------------------------------------------- bad uploads
NOT_A_PIPELINE = [
    pytest.param(b"", "empty", id="empty"),
    pytest.param(b"   \n", "empty", id="blank"),
    pytest.param(b"\xff\xfe\x00junk", "UTF-8", id="binary"),
    pytest.param(b"key: [unclosed", "not valid YAML", id="not-yaml"),
    pytest.param(b"- a\n- b\n", "not a mapping", id="yaml-list"),
    pytest.param(b"just text", "not a mapping", id="yaml-scalar"),
    pytest.param(b"pipelineInfo:\n  name: p\n", "root.dag", id="no-root"),
    pytest.param(b"name: x\ninputs: []\nimplementation: {}\n", "pipelineInfo.name", id="v1-component"),
    pytest.param(
        b"pipelineInfo: {name: p}\nroot: {dag: {}, inputDefinitions: [1]}\ncomponents: {}\n"
        b"deploymentSpec: {executors: {}}\n",
        "root.inputDefinitions.parameters",
        id="bad-inputs",
    ),
    pytest.param(b"a: &a [*a, *a]\n", "not a compiled KFP pipeline", id="recursive-alias"),
    pytest.param(b"b: " + b"[" * 5000 + b"]" * 5000, "not valid YAML", id="deep-nesting"),  # libyaml: depth limit
]


@pytest.mark.parametrize("content, expected", NOT_A_PIPELINE)
def test_a_file_that_is_not_a_compiled_pipeline_is_refused_and_nothing_is_stored(app, client, content, expected):
    body = assert_problem(upload(client, "qoe_pipeline", content), 400, result=True)
    assert expected in body["detail"]
    assert names(client) == []
    assert rows(app) == []
    assert stored_files(app) == []


def test_a_mapping_that_is_not_a_pipeline_names_everything_missing(client):
    body = assert_problem(upload(client, "p", b"apiVersion: v1\nkind: Pod\n"), 400, result=True)
    for missing in ("pipelineInfo.name", "root.dag", "components", "deploymentSpec.executors"):
        assert missing in body["detail"]


def test_a_bad_upload_of_a_known_pipeline_adds_no_version(app, client, compiled):
    uploaded(client, "qoe_pipeline", compiled)
    assert_problem(upload(client, "qoe_pipeline", b"not: [a pipeline"), 400, result=True)
    assert client.get("/pipelines/qoe_pipeline/versions").get_json() == ["qoe_pipeline"]
    assert stored_files(app) == ["qoe_pipeline/1.yaml"]
    # The next good upload is version 2: no number was used up.
    assert uploaded(client, "qoe_pipeline", compiled)["version"] == "2"


@pytest.mark.parametrize(
    "name",
    [".hidden", "..", "with%20space", "na%C3%AFve", "x" * 129, "semi;colon", "quote'"],
    ids=["leading-dot", "dotdot", "space", "non-ascii", "too-long", "semicolon", "quote"],
)
def test_a_bad_name_is_refused_and_nothing_is_stored(app, client, compiled, name):
    body = assert_problem(upload(client, name, compiled), 400, result=True)
    assert "Invalid pipeline name" in body["detail"]
    assert names(client) == [] and rows(app) == [] and stored_files(app) == []


def test_no_file_field_is_a_400_with_result(app, client):
    response = client.post(
        "/pipelines/qoe_pipeline/upload", data={"description": "no file"}, content_type="multipart/form-data"
    )
    body = assert_problem(response, 400, result=True)
    assert "'file'" in body["detail"]
    assert names(client) == [] and stored_files(app) == []


def test_a_body_that_is_not_multipart_is_a_400_with_result(app, client, compiled):
    for response in (
        client.post("/pipelines/qoe_pipeline/upload", json={"file": compiled.decode()}),
        client.post("/pipelines/qoe_pipeline/upload", data=compiled, content_type="application/yaml"),
        client.post("/pipelines/qoe_pipeline/upload"),
    ):
        body = assert_problem(response, 400, result=True)
        assert "multipart/form-data" in body["detail"]
    assert names(client) == [] and stored_files(app) == []


def test_a_file_larger_than_the_limit_is_a_413_with_result(app, client, compiled):
    app.config["MAX_CONTENT_LENGTH"] = 2048
    body = assert_problem(upload(client, "qoe_pipeline", compiled + b"#" * 4096), 413, result=True)
    assert "2048" in body["detail"]
    assert names(client) == [] and stored_files(app) == []


def test_an_upload_refused_before_its_view_runs_carries_result_too(app, client, compiled):
    # The app's control-character check runs before the view: its 400 lacked `result`, the key upload clients read.
    for response in (upload(client, "qoe_pipeline", compiled, description="a\x05b"),
                     upload(client, "qoe%01pipeline", compiled)):
        body = assert_problem(response, 400, result=True)
        assert "control characters" in body["detail"]
    assert names(client) == [] and stored_files(app) == []


def test_other_methods_on_the_upload_route_are_405(client):
    assert client.get("/pipelines/qoe_pipeline/upload").status_code == 405


# ---------------------------------------------------------------------------------------------------- list, get, versions
def test_list_is_empty_at_first(client):
    assert client.get("/pipelines").get_json() == {
        "pipeline_names": [],
        "pipelines": [],
        "total_size": 0,
        "next_page_token": "",
    }


def test_list_shows_every_pipeline_by_name_in_both_shapes(app, client, compiled):
    uploaded(client, "zeta", compiled, "last one")
    uploaded(client, "alpha", compiled)
    uploaded(client, "alpha", compiled)
    body = client.get("/pipelines").get_json()
    assert body["pipeline_names"] == ["alpha", "zeta"]
    assert body["total_size"] == 2 and body["next_page_token"] == ""
    with app.app_context():
        ids = {p.name: str(p.id) for p in db.session.scalars(select(Pipeline))}
    assert [(p["pipeline_id"], p["display_name"], p["description"]) for p in body["pipelines"]] == [
        (ids["alpha"], "alpha", ""),
        (ids["zeta"], "zeta", "last one"),
    ]
    for p in body["pipelines"]:
        created = datetime.fromisoformat(p["created_at"].replace("Z", "+00:00"))
        assert created.utcoffset() is not None  # ISO 8601 with its zone (UTC)
        assert abs((datetime.now(created.tzinfo) - created).total_seconds()) < 300


def test_get_one_pipeline(app, client, compiled):
    uploaded(client, "qoe_pipeline", compiled, "trains")
    uploaded(client, "qoe_pipeline", compiled)
    info = client.get("/pipelines/qoe_pipeline").get_json()["pipeline_info"]
    listed = client.get("/pipelines").get_json()["pipelines"][0]
    assert info == {**listed, "versions": ["qoe_pipeline", "2"]}
    assert info["display_name"] == "qoe_pipeline" and info["description"] == "trains"


@pytest.mark.parametrize("path", ["/pipelines/nope", "/pipelines/nope/versions", "/pipelines/..hidden/versions"])
def test_unknown_pipeline_is_404(client, compiled, path):
    uploaded(client, "qoe_pipeline", compiled)
    body = assert_problem(client.get(path), 404)
    assert "does not exist" in body["detail"]


# ---------------------------------------------------------------------------------------------------- experiments
@pytest.mark.parametrize("path", ["/experiments", "/pipelines/experiments"])
def test_experiments_on_both_paths(app, client, path):
    # /experiments keeps the seed's object; /pipelines/experiments answers the current reference's bare array.
    shape = (lambda names: {"experiment_names": names}) if path == "/experiments" else (lambda names: names)
    assert client.get(path).get_json() == shape([])
    with app.app_context():
        service = app.extensions["trainingmgr"].pipelines()
        first = service.ensure_experiment("qoe-exp")
        service.ensure_experiment("Default")
        assert service.ensure_experiment("qoe-exp").id == first.id  # once, however often it is asked for
        db.session.commit()
    response = client.get(path)
    assert response.status_code == 200
    assert response.get_json() == shape(["Default", "qoe-exp"])


def test_experiments_path_wins_over_a_pipeline_named_experiments(app, client, compiled):
    """/pipelines/experiments is static: werkzeug ranks it before /pipelines/<pipeline_name>."""
    adapter = app.url_map.bind("localhost")
    assert adapter.match("/pipelines/experiments")[0] == "pipelines.list_experiments_bare"
    assert adapter.match("/pipelines/other")[0] == "pipelines.get_pipeline"
    uploaded(client, "experiments", compiled)
    assert client.get("/pipelines/experiments").get_json() == []
    assert client.get("/pipelines/experiments/versions").get_json() == ["experiments"]
    assert names(client) == ["experiments"]


def test_ensure_experiment_refuses_bad_names(app):
    with app.app_context():
        service = app.extensions["trainingmgr"].pipelines()
        for bad in ("", "   ", "x" * 129):
            with pytest.raises(BadRequest):
                service.ensure_experiment(bad)


# ---------------------------------------------------------------------------------------------------- resolve_version
def test_resolve_version(app, client, compiled):
    uploaded(client, "qoe_pipeline", compiled)
    uploaded(client, "qoe_pipeline", compiled + b"\n# two\n")
    with app.app_context():
        service = app.extensions["trainingmgr"].pipelines()
        for asked, number in (("latest", 2), ("", 2), (None, 2), ("LATEST", 2), ("1", 1), (" 2 ", 2), (1, 1)):
            assert service.resolve_version("qoe_pipeline", asked).number == number, asked
        with pytest.raises(NotFound, match="no version 3"):
            service.resolve_version("qoe_pipeline", "3")
        for bad in ("²", "../x", "a b"):
            with pytest.raises(BadRequest):
                service.resolve_version("qoe_pipeline", bad)
        for unknown in ("v1", "1.0", "-1", "9" * 20):  # could be names: none has them
            with pytest.raises(NotFound):
                service.resolve_version("qoe_pipeline", unknown)
        assert service.resolve_version("qoe_pipeline", "qoe_pipeline").number == 1  # by name
        with pytest.raises(NotFound):
            service.resolve_version("unknown", "latest")
        newest = service.resolve_version("qoe_pipeline", "latest")
        assert yaml.safe_load(service.file_for(newest).read_text())["pipelineInfo"]["name"] == "qoe-training"


def test_version_names_as_in_kubeflow(client, compiled):
    assert uploaded(client, "named", compiled)["version_name"] == "named"
    assert uploaded(client, "named", compiled)["version_name"] == "2"
    response = client.post("/pipelines/named/upload", data={"file": (io.BytesIO(compiled), "p.yaml"),
                                                            "version_name": "v3-tuned"},
                           content_type="multipart/form-data")
    assert response.status_code == 200 and response.get_json()["version_name"] == "v3-tuned"
    assert client.get("/pipelines/named/versions").get_json() == ["named", "2", "v3-tuned"]
    taken = client.post("/pipelines/named/upload", data={"file": (io.BytesIO(compiled), "p.yaml"),
                                                         "version_name": "v3-tuned"},
                        content_type="multipart/form-data")
    assert_problem(taken, 409, result=True)
    for bad in ("7", "latest", "../x", "x" * 129):
        refused = client.post("/pipelines/named/upload", data={"file": (io.BytesIO(compiled), "p.yaml"),
                                                               "version_name": bad},
                              content_type="multipart/form-data")
        assert_problem(refused, 400, result=True)
    assert client.get("/pipelines/named/versions").get_json() == ["named", "2", "v3-tuned"]  # nothing added


def test_a_pipeline_named_by_digits_only_names_its_first_version_1(client, compiled):
    assert uploaded(client, "2", compiled)["version_name"] == "1"  # "2" is the next version's number
    assert uploaded(client, "2", compiled)["version_name"] == "2"
    assert client.get("/pipelines/2/versions").get_json() == ["1", "2"]
