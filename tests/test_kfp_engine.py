"""The Kubeflow Pipelines engine against a local double of the KFP API server (tests/kfp_double.py), with the real
kfp 2.17 client underneath: every test asserts the requests the server got.

(No `from __future__ import annotations` here: kfp reads the components' annotations as real types.)
"""

import hashlib
import json
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from tests.kfp_double import KfpDouble
from trainingmgr.adapters.base import AdapterError, RunStatus
from trainingmgr.adapters.kfp_engine import CAPACITY, KfpPipelineEngine

API = "/apis/v2beta1"
PARAMETERS = {
    "featurepath": "fg_7",
    "epochs": "3",
    "learning_rate": "0.5",
    "use_gpu": "true",
    "modelname": "qoe",
    "modelversion": "1",
    "trainingjob_id": "7",  # not declared by the pipeline: left out
    "dataset_uri": "/data/fg_7.csv",  # not declared either
}


# ---------------------------------------------------------------------------------------------------- pipelines
def _compile(folder: Path) -> dict[str, Path]:
    from kfp import compiler, dsl

    options = {"install_kfp_package": False, "packages_to_install": [], "base_image": "python:3.11"}

    @dsl.component(**options)
    def train(featurepath: str, epochs: int, learning_rate: float, use_gpu: bool, modelname: str, modelversion: str):
        print(featurepath, epochs, learning_rate, use_gpu, modelname, modelversion)

    @dsl.pipeline(name="qoe-training")
    def training(featurepath: str, modelname: str, modelversion: str, epochs: int = 1, learning_rate: float = 0.1,
                 use_gpu: bool = False):
        train(featurepath=featurepath, epochs=epochs, learning_rate=learning_rate, use_gpu=use_gpu,
              modelname=modelname, modelversion=modelversion)

    @dsl.pipeline(name="qoe-training")
    def retrained(featurepath: str, modelname: str, modelversion: str, epochs: int = 5, learning_rate: float = 0.01,
                  use_gpu: bool = True):
        train(featurepath=featurepath, epochs=epochs, learning_rate=learning_rate, use_gpu=use_gpu,
              modelname=modelname, modelversion=modelversion)

    files = {}
    for name, pipeline in (("training", training), ("retrained", retrained)):
        files[name] = folder / f"{name}.yaml"
        compiler.Compiler().compile(pipeline, str(files[name]))
    return files


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _compile(tmp_path_factory.mktemp("kfp-pipelines"))


def _spec(path: Path) -> dict:
    return next(yaml.safe_load_all(path.read_text()))


@pytest.fixture
def kfp():
    double = KfpDouble().start()
    yield double
    double.stop()


@pytest.fixture
def make_engine(kfp: KfpDouble):
    def make(**options) -> KfpPipelineEngine:
        options.setdefault("timeout", 2.0)
        options.setdefault("backoff", 0.01)
        return KfpPipelineEngine(kfp.url, **options)

    return make


@pytest.fixture
def registered(kfp: KfpDouble, make_engine, pipelines) -> str:
    """The training pipeline's version 1 on the server; the requests that made it are forgotten."""
    ref = make_engine().register_version("qoe", 1, pipelines["training"], "")
    kfp.clear()
    return ref


def _filter(request, key: str = "display_name") -> str:
    predicates = json.loads(request.q("filter"))["predicates"]
    assert len(predicates) == 1 and predicates[0]["operation"] == 1 and predicates[0]["key"] == key
    return predicates[0]["stringValue"]


# ---------------------------------------------------------------------------------------------------- construction
def test_construction_makes_no_request(kfp: KfpDouble):
    KfpPipelineEngine(kfp.url, token="t", timeout=1.0)
    assert kfp.calls() == []


def test_construction_needs_no_server(kfp: KfpDouble):
    kfp.stop()
    engine = KfpPipelineEngine(kfp.url)
    assert engine.capacity_left() == CAPACITY
    engine.cleanup("tj1-abc")  # nothing to do remotely


def test_host_is_required():
    with pytest.raises(ValueError):
        KfpPipelineEngine("")


def test_client_is_built_once_on_first_use(kfp: KfpDouble, make_engine):
    engine = make_engine()
    assert engine.ready()
    assert engine.ready()
    assert kfp.routes() == [("GET", f"{API}/healthz"), ("GET", f"{API}/healthz")]


def test_token_is_sent_as_bearer(kfp: KfpDouble, make_engine, pipelines):
    make_engine(token="s3cret").register_version("qoe", 1, pipelines["training"], "")
    assert kfp.calls()
    assert {r.headers.get("authorization") for r in kfp.calls()} == {"Bearer s3cret"}


def test_no_token_no_authorization(kfp: KfpDouble, make_engine):
    make_engine().ready()
    assert all("authorization" not in r.headers for r in kfp.calls())


# ---------------------------------------------------------------------------------------------------- register_version
def test_first_upload_creates_the_pipeline(kfp: KfpDouble, make_engine, pipelines):
    ref = make_engine().register_version("qoe", 1, pipelines["training"], "QoE model training")

    assert kfp.routes() == [
        ("GET", f"{API}/healthz"),
        ("GET", f"{API}/pipelines"),
        ("POST", f"{API}/pipelines/upload"),
        ("GET", f"{API}/pipelines/{ref.split('/')[0]}/versions"),
    ]
    lookup = kfp.calls("GET", f"{API}/pipelines")[0]
    assert _filter(lookup) == "qoe" and lookup.q("page_size") == "200"
    upload = kfp.calls("POST", f"{API}/pipelines/upload")[0]
    assert upload.q("name") == "qoe" and upload.q("description") == "QoE model training"
    filename, content = upload.form()["uploadfile"]
    assert filename == "training.yaml" and content == pipelines["training"].read_bytes()
    (pipeline,) = kfp.pipelines.values()
    (version,) = kfp.versions.values()
    assert pipeline["display_name"] == "qoe"
    assert ref == f"{pipeline['pipeline_id']}/{version['pipeline_version_id']}"


def test_second_version_is_uploaded_as_a_version(kfp: KfpDouble, make_engine, pipelines, registered):
    pipeline_id = registered.split("/")[0]
    ref = make_engine().register_version("qoe", 2, pipelines["retrained"], "more epochs")

    upload = kfp.calls("POST", f"{API}/pipelines/upload_version")
    assert len(upload) == 1 and kfp.calls("POST", f"{API}/pipelines/upload") == []
    assert upload[0].q("name") == "qoe-v2" and upload[0].q("pipelineid") == pipeline_id
    assert upload[0].q("description") == "more epochs"
    assert upload[0].form()["uploadfile"][1] == pipelines["retrained"].read_bytes()
    version = kfp.versions[ref.split("/")[1]]
    assert ref.split("/")[0] == pipeline_id and version["display_name"] == "qoe-v2"
    assert version["pipeline_spec"] == _spec(pipelines["retrained"])


def test_existing_pipeline_is_found_past_200(kfp: KfpDouble, make_engine, pipelines):
    for i in range(430):
        kfp.add_pipeline(f"other-{i:03}")
    target = kfp.add_pipeline("qoe", _spec(pipelines["training"]))
    for i in range(430, 450):
        kfp.add_pipeline(f"other-{i:03}")
    kfp.ignore_filters = True  # a server that lists everything: only paging finds it

    ref = make_engine().register_version("qoe", 2, pipelines["retrained"], "")

    pages = kfp.calls("GET", f"{API}/pipelines")
    assert [r.q("page_token") for r in pages] == ["", "offset-200", "offset-400"]
    assert {r.q("page_size") for r in pages} == {"200"}
    assert kfp.calls("POST", f"{API}/pipelines/upload") == []
    (upload,) = kfp.calls("POST", f"{API}/pipelines/upload_version")
    assert upload.q("pipelineid") == target["pipeline_id"] and ref.startswith(target["pipeline_id"] + "/")


def test_registering_again_uses_what_an_earlier_try_made(kfp: KfpDouble, make_engine, pipelines, registered):
    engine = make_engine()
    assert engine.register_version("qoe", 1, pipelines["training"], "") == registered
    second = engine.register_version("qoe", 2, pipelines["retrained"], "")
    assert engine.register_version("qoe", 2, pipelines["retrained"], "") == second
    assert len(kfp.calls("POST", f"{API}/pipelines/upload_version")) == 1
    assert kfp.calls("POST", f"{API}/pipelines/upload") == []


def test_a_version_name_taken_by_another_content_is_not_reused(kfp: KfpDouble, make_engine, pipelines, registered):
    pipeline_id = registered.split("/")[0]
    foreign = kfp.add_version(pipeline_id, "qoe-v2", {"root": {"dag": {}}, "pipelineInfo": {"name": "x"}})
    engine = make_engine()

    ref = engine.register_version("qoe", 2, pipelines["retrained"], "")

    digest = hashlib.sha256(pipelines["retrained"].read_bytes()).hexdigest()[:8]
    (upload,) = kfp.calls("POST", f"{API}/pipelines/upload_version")
    assert upload.q("name") == f"qoe-v2-{digest}"
    assert ref != f"{pipeline_id}/{foreign['pipeline_version_id']}"
    assert engine.register_version("qoe", 2, pipelines["retrained"], "") == ref  # found again by its own name
    assert len(kfp.calls("POST", f"{API}/pipelines/upload_version")) == 1


def test_pipeline_uploaded_meanwhile_is_used(kfp: KfpDouble, make_engine, pipelines):
    made = {}

    def race(request):
        if request.path == f"{API}/pipelines/upload" and not made:
            made["pipeline"] = kfp.add_pipeline("qoe", _spec(pipelines["training"]))

    kfp.hook = race
    ref = make_engine().register_version("qoe", 1, pipelines["training"], "")

    assert len(kfp.calls("POST", f"{API}/pipelines/upload")) == 1  # answered 409
    assert kfp.calls("POST", f"{API}/pipelines/upload_version") == []
    (version,) = kfp.versions.values()
    assert ref == f"{made['pipeline']['pipeline_id']}/{version['pipeline_version_id']}"


def test_register_refused_is_not_retryable(kfp: KfpDouble, make_engine, pipelines):
    engine = make_engine()
    engine.ready()
    kfp.fail_status = 400
    with pytest.raises(AdapterError) as raised:
        engine.register_version("qoe", 1, pipelines["training"], "")
    assert raised.value.retryable is False
    assert len(kfp.calls("GET", f"{API}/pipelines")) == 1  # no second try


def test_register_unreadable_file_sends_nothing(kfp: KfpDouble, make_engine, tmp_path: Path):
    with pytest.raises(AdapterError) as raised:
        make_engine().register_version("qoe", 1, tmp_path / "missing.yaml", "")
    assert raised.value.retryable is False and kfp.calls() == []


# ---------------------------------------------------------------------------------------------------- start_run
def test_start_run_runs_the_stored_version(kfp: KfpDouble, make_engine, pipelines, registered):
    pipeline_id, version_id = registered.split("/")

    kfp_run_id = make_engine().start_run("tj7-0a1b2c3d", pipelines["training"], registered, PARAMETERS)

    assert kfp.routes() == [
        ("GET", f"{API}/healthz"),
        ("GET", f"{API}/runs"),  # started by an earlier try?
        ("GET", f"{API}/experiments"),
        ("POST", f"{API}/experiments"),
        ("POST", f"{API}/runs"),
    ]
    assert _filter(kfp.calls("GET", f"{API}/runs")[0]) == "tj7-0a1b2c3d"
    assert _filter(kfp.calls("GET", f"{API}/experiments")[0]) == "Default"
    assert kfp.calls("POST", f"{API}/experiments")[0].json() == {"display_name": "Default"}
    (experiment,) = kfp.experiments.values()
    body = kfp.calls("POST", f"{API}/runs")[0].json()
    assert body == {
        "experiment_id": experiment["experiment_id"],
        "display_name": "tj7-0a1b2c3d",
        "pipeline_version_reference": {"pipeline_id": pipeline_id, "pipeline_version_id": version_id},
        "runtime_config": {"parameters": {
            "featurepath": "fg_7", "epochs": 3, "learning_rate": 0.5, "use_gpu": True,
            "modelname": "qoe", "modelversion": "1",
        }},
    }
    assert kfp_run_id == kfp.run_named("tj7-0a1b2c3d")["run_id"]


def test_experiment_is_created_once(kfp: KfpDouble, make_engine, pipelines, registered):
    engine = make_engine()
    engine.start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)
    engine.start_run("tj2-bbbbbbbb", pipelines["training"], registered, PARAMETERS)
    make_engine().start_run("tj3-cccccccc", pipelines["training"], registered, PARAMETERS)  # a restarted service

    assert len(kfp.calls("POST", f"{API}/experiments")) == 1
    assert len(kfp.calls("GET", f"{API}/experiments")) == 2  # once per engine, then remembered
    assert len({run["experiment_id"] for run in kfp.runs.values()}) == 1 and len(kfp.runs) == 3


def test_existing_default_experiment_is_used(kfp: KfpDouble, make_engine, pipelines, registered):
    default = kfp.add_experiment("Default")
    make_engine().start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)
    assert kfp.calls("POST", f"{API}/experiments") == []
    assert kfp.run_named("tj1-aaaaaaaa")["experiment_id"] == default["experiment_id"]


def test_experiment_created_meanwhile_is_used(kfp: KfpDouble, make_engine, pipelines, registered):
    made = {}

    def race(request):
        if request.method == "POST" and request.path == f"{API}/experiments" and not made:
            made["experiment"] = kfp.add_experiment("Default")

    kfp.hook = race
    make_engine().start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)

    assert len(kfp.calls("POST", f"{API}/experiments")) == 1  # answered 409
    assert kfp.run_named("tj1-aaaaaaaa")["experiment_id"] == made["experiment"]["experiment_id"]


def test_starting_again_does_not_start_twice(kfp: KfpDouble, make_engine, pipelines, registered):
    first = make_engine().start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)
    again = make_engine().start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)
    assert first == again and len(kfp.runs) == 1
    assert len(kfp.calls("POST", f"{API}/runs")) == 1


def test_start_without_engine_ref_sends_the_pipeline(kfp: KfpDouble, make_engine, pipelines):
    make_engine().start_run("tj1-aaaaaaaa", pipelines["training"], None, {"featurepath": "fg_1", "modelname": "m",
                                                                        "modelversion": "1"})
    body = kfp.calls("POST", f"{API}/runs")[0].json()
    assert "pipeline_version_reference" not in body
    assert body["pipeline_spec"] == _spec(pipelines["training"])
    assert body["runtime_config"] == {"parameters": {"featurepath": "fg_1", "modelname": "m", "modelversion": "1"}}


def test_start_of_a_missing_version_is_not_retryable(kfp: KfpDouble, make_engine, pipelines, registered):
    pipeline_id = registered.split("/")[0]
    with pytest.raises(AdapterError) as raised:
        make_engine().start_run("tj1-aaaaaaaa", pipelines["training"], f"{pipeline_id}/no-such-version", PARAMETERS)
    assert raised.value.retryable is False
    assert "404" in str(raised.value) and "pipeline version no-such-version not found" in str(raised.value)
    assert len(kfp.calls("POST", f"{API}/runs")) == 1 and kfp.runs == {}


def test_start_with_a_malformed_engine_ref_sends_nothing(kfp: KfpDouble, make_engine, pipelines):
    with pytest.raises(AdapterError) as raised:
        make_engine().start_run("tj1-aaaaaaaa", pipelines["training"], "not-a-ref", PARAMETERS)
    assert raised.value.retryable is False and kfp.calls() == []


# ---------------------------------------------------------------------------------------------------- run_status
@pytest.mark.parametrize(
    "state, expected",
    [
        ("PENDING", "RUNNING"),
        ("RUNNING", "RUNNING"),
        ("PAUSED", "RUNNING"),
        ("CANCELING", "RUNNING"),
        ("RUNTIME_STATE_UNSPECIFIED", "RUNNING"),
        ("SUCCEEDED", "SUCCEEDED"),
        ("FAILED", "FAILED"),
        ("ERROR", "FAILED"),
        ("SKIPPED", "FAILED"),
        ("CANCELED", "FAILED"),
        ("TERMINATED", "FAILED"),
    ],
)
def test_run_states(kfp: KfpDouble, make_engine, pipelines, registered, state: str, expected: str):
    engine = make_engine()
    kfp_run_id = engine.start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)
    kfp.set_run_state(kfp_run_id, state)

    status = engine.run_status("tj1-aaaaaaaa")

    assert status.state == expected and status.model_path is None
    if expected == "FAILED":
        assert status.error == f"pipeline run ended {state}"
    else:
        assert status.error is None
    assert kfp.calls("GET")[-1].path == f"{API}/runs/{kfp_run_id}"


def test_new_run_is_running(kfp: KfpDouble, make_engine, pipelines, registered):
    engine = make_engine()
    engine.start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)
    assert engine.run_status("tj1-aaaaaaaa") == RunStatus("RUNNING")


def test_failed_run_says_why(kfp: KfpDouble, make_engine, pipelines, registered):
    engine = make_engine()
    kfp_run_id = engine.start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)
    kfp.set_run_state(kfp_run_id, "FAILED", error="task train failed: ValueError: bad data")
    status = engine.run_status("tj1-aaaaaaaa")
    assert status == RunStatus("FAILED", error="pipeline run ended FAILED: task train failed: ValueError: bad data")
    assert status.ended_at == _parsed(kfp.runs[kfp_run_id]["finished_at"])


def test_the_run_log_is_the_run_and_its_tasks_state_changes_in_time_order(kfp: KfpDouble, make_engine, pipelines,
                                                                          registered):
    """KFP's API keeps no container output: the log of a KFP run is what the API records, each state change of the
    run and of its tasks, with their errors."""
    engine = make_engine()
    kfp_run_id = engine.start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)
    first = engine.run_log("tj1-aaaaaaaa", 0, 1 << 20)
    assert first.data.decode().endswith(" run PENDING\n") and first.size == len(first.data)
    kfp.set_run_state(kfp_run_id, "RUNNING")
    kfp.runs[kfp_run_id]["run_details"] = {"task_details": [{
        "display_name": "train",
        "state_history": [{"update_time": "2030-01-01T00:00:01Z", "state": "RUNNING"},
                          {"update_time": "2030-01-01T00:00:02Z", "state": "FAILED",
                           "error": {"code": 2, "message": "ValueError: bad data"}}],
    }]}
    kfp.set_run_state(kfp_run_id, "FAILED", error="task train failed")
    for change, moment in zip(kfp.runs[kfp_run_id]["state_history"], ("00:00:00", "00:00:00.5", "00:00:03")):
        change["update_time"] = f"2030-01-01T{moment}Z"
    lines = engine.run_log("tj1-aaaaaaaa", 0, 1 << 20).data.decode().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "run PENDING", "run RUNNING", "task train RUNNING", "task train FAILED: ValueError: bad data", "run FAILED",
        "error: task train failed"]
    assert engine.run_log("tj1-aaaaaaaa", len(first.data), 1 << 20).data.decode().startswith(lines[1]), \
        "read on from an offset: the text grew at its end"
    with pytest.raises(AdapterError, match="unknown run"):
        engine.run_log("tj9-bbbbbbbb", 0, 100)


def test_succeeded_run_has_no_local_model(kfp: KfpDouble, make_engine, pipelines, registered):
    engine = make_engine()
    kfp_run_id = engine.start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)
    kfp.set_run_state(kfp_run_id, "SUCCEEDED")
    status = engine.run_status("tj1-aaaaaaaa")
    assert status == RunStatus("SUCCEEDED", model_path=None, metrics={})
    # The server's record of the end (its finished_at), in UTC.
    assert status.ended_at == _parsed(kfp.runs[kfp_run_id]["finished_at"]) and status.ended_at.tzinfo is not None


def test_an_unset_finish_time_is_unknown(kfp: KfpDouble, make_engine, pipelines, registered):
    """KFP answers a zero timestamp (1970-01-01) for a time it has not recorded."""
    engine = make_engine()
    kfp_run_id = engine.start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)
    kfp.set_run_state(kfp_run_id, "SUCCEEDED")
    kfp.runs[kfp_run_id]["finished_at"] = "1970-01-01T00:00:00Z"
    status = engine.run_status("tj1-aaaaaaaa")
    assert status.state == "SUCCEEDED" and status.ended_at is None


def _parsed(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def test_status_after_a_restart_finds_the_run_by_name(kfp: KfpDouble, make_engine, pipelines, registered):
    kfp_run_id = make_engine().start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)
    make_engine().start_run("tj2-bbbbbbbb", pipelines["training"], registered, PARAMETERS)
    kfp.set_run_state(kfp_run_id, "SUCCEEDED")
    kfp.clear()

    restarted = make_engine()
    assert restarted.run_status("tj1-aaaaaaaa").state == "SUCCEEDED"
    assert restarted.run_status("tj1-aaaaaaaa").state == "SUCCEEDED"

    assert kfp.routes() == [
        ("GET", f"{API}/healthz"),
        ("GET", f"{API}/runs"),
        ("GET", f"{API}/runs/{kfp_run_id}"),
        ("GET", f"{API}/runs/{kfp_run_id}"),  # the mapping is remembered
    ]
    lookup = kfp.calls("GET", f"{API}/runs")[0]
    assert _filter(lookup) == "tj1-aaaaaaaa" and lookup.q("page_size") == "200"


def test_run_is_found_by_name_past_200(kfp: KfpDouble, make_engine, pipelines, registered):
    engine = make_engine()
    for i in range(205):
        engine.start_run(f"tj{i}-filler", pipelines["training"], registered, {})
    kfp_run_id = engine.start_run("tj999-target", pipelines["training"], registered, {})
    kfp.ignore_filters = True
    kfp.clear()

    assert make_engine().run_status("tj999-target") == RunStatus("RUNNING")
    assert [r.q("page_token") for r in kfp.calls("GET", f"{API}/runs")] == ["", "offset-200"]
    assert kfp.calls("GET")[-1].path == f"{API}/runs/{kfp_run_id}"


def test_unknown_run_is_not_retryable(kfp: KfpDouble, make_engine):
    with pytest.raises(AdapterError) as raised:
        make_engine().run_status("tj1-never")
    assert raised.value.retryable is False
    assert kfp.routes() == [("GET", f"{API}/healthz"), ("GET", f"{API}/runs")]


def test_run_deleted_on_the_server_is_unknown(kfp: KfpDouble, make_engine, pipelines, registered):
    engine = make_engine()
    kfp_run_id = engine.start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)
    del kfp.runs[kfp_run_id]
    with pytest.raises(AdapterError) as raised:
        engine.run_status("tj1-aaaaaaaa")
    assert raised.value.retryable is False


# ---------------------------------------------------------------------------------------------------- terminate
def test_terminate_asks_the_server(kfp: KfpDouble, make_engine, pipelines, registered):
    engine = make_engine()
    kfp_run_id = engine.start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)
    kfp.set_run_state(kfp_run_id, "RUNNING")

    engine.terminate("tj1-aaaaaaaa")
    engine.terminate("tj1-aaaaaaaa")  # still CANCELING: asked again, no error

    assert len(kfp.calls("POST", f"{API}/runs/{kfp_run_id}:terminate")) == 2
    assert kfp.runs[kfp_run_id]["state"] == "CANCELING"
    kfp.set_run_state(kfp_run_id, "CANCELED")
    engine.terminate("tj1-aaaaaaaa")
    assert len(kfp.calls("POST", f"{API}/runs/{kfp_run_id}:terminate")) == 2
    assert engine.run_status("tj1-aaaaaaaa") == RunStatus("FAILED", error="pipeline run ended CANCELED")


@pytest.mark.parametrize("state", ["SUCCEEDED", "FAILED"])
def test_terminate_leaves_an_ended_run_alone(kfp: KfpDouble, make_engine, pipelines, registered, state: str):
    engine = make_engine()
    kfp_run_id = engine.start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)
    kfp.set_run_state(kfp_run_id, state)
    engine.terminate("tj1-aaaaaaaa")
    assert kfp.calls("POST", f"{API}/runs/{kfp_run_id}:terminate") == []
    assert kfp.runs[kfp_run_id]["state"] == state


def test_terminate_of_an_unknown_run_does_nothing(kfp: KfpDouble, make_engine):
    make_engine().terminate("tj1-never")
    assert kfp.calls("POST") == []


def test_terminate_after_a_restart(kfp: KfpDouble, make_engine, pipelines, registered):
    kfp_run_id = make_engine().start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)
    make_engine().terminate("tj1-aaaaaaaa")
    assert len(kfp.calls("POST", f"{API}/runs/{kfp_run_id}:terminate")) == 1


# ---------------------------------------------------------------------------------------------------- outages
def _timed(call):
    started = time.monotonic()
    with pytest.raises(AdapterError) as raised:
        call()
    return raised.value, time.monotonic() - started


def test_server_down_is_retryable_and_bounded(kfp: KfpDouble, make_engine, pipelines, registered):
    engine = make_engine(timeout=1.0)
    engine.start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)
    kfp.stop()

    for call in (
        lambda: engine.run_status("tj1-aaaaaaaa"),
        lambda: engine.terminate("tj1-aaaaaaaa"),
        lambda: engine.start_run("tj2-bbbbbbbb", pipelines["training"], registered, PARAMETERS),
        lambda: engine.register_version("qoe", 2, pipelines["retrained"], ""),
        lambda: make_engine(timeout=1.0).run_status("tj1-aaaaaaaa"),  # a client never built: no 5 x 5 s healthz
    ):
        error, seconds = _timed(call)
        assert error.retryable is True, error
        assert seconds < 2.0
    assert engine.ready() is False


def test_server_back_after_an_outage(kfp: KfpDouble, make_engine, pipelines, registered):
    engine = make_engine()
    engine.start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)
    kfp.stop()
    with pytest.raises(AdapterError):
        engine.run_status("tj1-aaaaaaaa")
    kfp.start()
    assert engine.run_status("tj1-aaaaaaaa") == RunStatus("RUNNING")


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_are_tried_three_times(kfp: KfpDouble, make_engine, pipelines, registered, status: int):
    engine = make_engine()
    engine.start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)
    kfp.clear()
    kfp.fail_status = status

    error, seconds = _timed(lambda: engine.run_status("tj1-aaaaaaaa"))

    assert error.retryable is True and str(status) in str(error)
    assert len(kfp.calls()) == 3 and seconds < 2.0


def test_a_passing_server_error_is_retried(kfp: KfpDouble, make_engine, pipelines, registered):
    engine = make_engine()
    engine.start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)
    kfp.clear()
    kfp.fail_next = 2

    assert engine.run_status("tj1-aaaaaaaa") == RunStatus("RUNNING")
    assert len(kfp.calls()) == 3


def test_start_retried_after_a_server_error_starts_once(kfp: KfpDouble, make_engine, pipelines, registered):
    engine = make_engine()
    engine.ready()
    kfp.fail_next = 1  # the first look for the run fails; the next try looks again, then starts
    kfp_run_id = engine.start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)
    assert list(kfp.runs) == [kfp_run_id]
    assert len(kfp.calls("GET", f"{API}/runs")) == 2


@pytest.mark.parametrize("status", [401, 403, 404])
def test_client_errors_are_not_retried(kfp: KfpDouble, make_engine, pipelines, registered, status: int):
    engine = make_engine()
    engine.start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)
    kfp.clear()
    kfp.fail_status = status
    with pytest.raises(AdapterError) as raised:
        engine.run_status("tj1-aaaaaaaa")
    assert raised.value.retryable is False
    assert len(kfp.calls()) == 1


def test_slow_server_times_out(kfp: KfpDouble, make_engine, pipelines, registered):
    engine = make_engine(timeout=0.3)
    engine.start_run("tj1-aaaaaaaa", pipelines["training"], registered, PARAMETERS)
    kfp.clear()
    kfp.slow = 5.0

    error, seconds = _timed(lambda: engine.run_status("tj1-aaaaaaaa"))

    assert error.retryable is True and "ReadTimeoutError" in str(error)
    assert len(kfp.calls()) == 3 and seconds < 2.0
    started = time.monotonic()
    assert engine.ready() is False
    assert time.monotonic() - started < 1.0


def test_slow_server_at_first_use(kfp: KfpDouble, make_engine):
    kfp.slow = 5.0
    error, seconds = _timed(lambda: make_engine(timeout=0.3).run_status("tj1-aaaaaaaa"))
    assert error.retryable is True and seconds < 2.0
    assert kfp.routes() == [("GET", f"{API}/healthz")] * 3
