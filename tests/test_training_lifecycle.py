"""Training jobs end to end through HTTP, with the real kfp.local engine, on SQLite and PostgreSQL.

The rApp's notification endpoint is a real local HTTP server (tests/peers.py).
"""

import concurrent.futures
import io
import json
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.factories import create_feature_group, create_file_feature_group, upload_pipeline as upload
from tests.peers import RAppReceiver
from trainingmgr import PROJECT_ROOT

JOBS = "/ai-ml-model-training/v1/training-jobs"
EXAMPLES = PROJECT_ROOT / "examples"
TRAINING_YAML = EXAMPLES / "pipelines" / "qoe_training.yaml"
RETRAINING_YAML = EXAMPLES / "pipelines" / "qoe_retraining.yaml"
FEATURES = "prbUsageDl,prbUsageUl,activeUes,sinrMean,throughputDl"
TERMINAL = {"FINISHED", "FAILED"}


@pytest.fixture
def rapp():
    receiver = RAppReceiver().start()
    yield receiver
    receiver.stop()


def failing_pipeline(tmp_path: Path) -> Path:
    """A pipeline whose only task raises."""
    from kfp import compiler, dsl

    @dsl.component(install_kfp_package=False, packages_to_install=[], base_image="python:3.11")
    def explode(dataset_uri: str, model: dsl.Output[dsl.Model]):
        raise ValueError("the model diverged")

    @dsl.pipeline(name="explodes")
    def explodes(dataset_uri: str):
        explode(dataset_uri=dataset_uri)

    path = tmp_path / "explodes.yaml"
    compiler.Compiler().compile(explodes, str(path))
    return path


def slow_pipeline(tmp_path: Path, seconds: int = 6) -> Path:
    from kfp import compiler, dsl

    @dsl.component(install_kfp_package=False, packages_to_install=[], base_image="python:3.11")
    def nap(dataset_uri: str, seconds: str, model: dsl.Output[dsl.Model]):
        import os
        import time

        time.sleep(float(seconds))
        os.makedirs(model.path, exist_ok=True)
        with open(os.path.join(model.path, "weights.txt"), "w") as f:
            f.write("slow but done")

    @dsl.pipeline(name="naps")
    def naps(dataset_uri: str, seconds: str = str(seconds)):
        nap(dataset_uri=dataset_uri, seconds=seconds)

    path = tmp_path / "naps.yaml"
    compiler.Compiler().compile(naps, str(path))
    return path


def job_request(model: str = "qoe", version: str = "1", *, pipeline: str = "qoe_training",
                retraining: str = "qoe_retraining", notification_url: str = "", **arguments: str) -> dict[str, Any]:
    return {
        "model_id": {"modelname": model, "modelversion": version},
        "training_config": {
            "description": "QoE throughput model",
            "dataPipeline": {
                "feature_group_name": "cell_kpis",
                "query_filter": "",
                "arguments": {"epochs": "2", **arguments},
            },
            "trainingPipeline": {
                "pipeline_name": pipeline,
                "pipeline_version": "1",
                "retraining_pipeline_name": retraining,
                "retraining_pipeline_version": "1",
            },
        },
        "notification_url": notification_url,
    }


def wait_for(client: Any, job_id: int, states: set[str] = TERMINAL, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"{JOBS}/{job_id}").get_json()
        if job["status"] in states:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']}: {job['steps_state']}"
        time.sleep(0.1)


def wait_for_step(client: Any, job_id: int, step: str, state: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.get(f"{JOBS}/{job_id}/status").get_json()[step] != state:
        assert time.monotonic() < deadline, f"job {job_id}: {step} never became {state}"
        time.sleep(0.05)


@pytest.fixture
def setup(client):
    create_file_feature_group(client, "cell_kpis", measurement="cell_kpis.csv", feature_list=FEATURES)
    upload(client, "qoe_training", TRAINING_YAML)
    upload(client, "qoe_retraining", RETRAINING_YAML)
    return client


def test_training_then_retraining_end_to_end(setup, worker, rapp):
    client = setup
    created = client.post(JOBS, json=job_request(notification_url=rapp.url))
    assert created.status_code == 201, created.get_json()
    job = created.get_json()
    assert created.headers["Location"] == f"{JOBS}/{job['id']}"
    assert job["modelId"]["artifactversion"] == "1.0.0" and job["is_retraining"] is False

    done = wait_for(client, job["id"])
    assert done["status"] == "FINISHED", done
    assert set(done["steps_state"].values()) == {"FINISHED"}
    assert done["model_url"] == "http://tm.example:32002/model/qoe/1/1.0.0/Model.zip"
    metrics = client.get(f"{JOBS}/get-model-metrics/{job['id']}").get_json()
    assert metrics["r2"] > 0.5

    download = client.get("/model/qoe/1/1.0.0/Model.zip")
    assert download.status_code == 200 and download.mimetype == "application/zip"
    assert int(download.headers["Content-Length"]) == len(download.data)
    assert "attachment" in download.headers["Content-Disposition"]
    names = zipfile.ZipFile(io.BytesIO(download.data)).namelist()
    assert "model.joblib" in names and "metadata.json" in names

    # The rApp heard of each step, in order; the wire body is a JSON string holding the steps.
    deadline = time.monotonic() + 10
    while not any(set(b.values()) == {"FINISHED"} for b in rapp.bodies()) and time.monotonic() < deadline:
        time.sleep(0.05)
    bodies = rapp.bodies()
    assert len(bodies) == 5  # extraction started, then each step's end
    assert bodies[0]["DATA_EXTRACTION"] == "IN_PROGRESS"
    assert bodies[-1] == {step: "FINISHED" for step in bodies[-1]}
    assert list(bodies[-1]) == ["DATA_EXTRACTION", "DATA_EXTRACTION_AND_TRAINING", "TRAINING",
                                "TRAINING_AND_TRAINED_MODEL", "TRAINED_MODEL"]
    assert isinstance(json.loads(rapp.requests[0].body), str)
    assert rapp.requests[0].headers["Content-Type"] == "application/json"

    # A second training of the same model is a retraining with a bumped artifact version.
    again = client.post(JOBS, json=job_request()).get_json()
    assert again["modelId"]["artifactversion"] == "1.1.0" and again["is_retraining"] is True
    retrained = wait_for(client, again["id"])
    assert retrained["status"] == "FINISHED", retrained
    zipped = client.get("/model/qoe/1/1.1.0/Model.zip")
    metadata = json.loads(zipfile.ZipFile(io.BytesIO(zipped.data)).read("metadata.json"))
    assert metadata["artifactversion"] == "1.1.0"

    listed = client.get(f"{JOBS}/qoe/1").get_json()
    assert [j["id"] for j in listed] == [again["id"], job["id"]]
    legacy = client.get("/trainingjobs/qoe/2").get_json()["trainingjob"]
    assert legacy["id"] == again["id"] and legacy["steps_state"]["TRAINED_MODEL"] == "FINISHED"


def test_a_run_ending_is_noticed_at_once_not_at_the_next_look(setup, worker, app):
    """The engine announces the end of a run this process started: the job moves on without waiting for the next
    regular look (here made 10 minutes away, so only the announcement can end the job in time)."""
    app.extensions["trainingmgr"].engine.watch_interval = 600
    client = setup
    job = client.post(JOBS, json=job_request()).get_json()
    done = wait_for(client, job["id"], timeout=120)
    assert done["status"] == "FINISHED", done


def test_failing_pipeline_fails_the_job_and_tells_the_rapp(setup, worker, rapp, tmp_path):
    client = setup
    upload(client, "explodes", failing_pipeline(tmp_path))
    job = client.post(JOBS, json=job_request("bad_model", pipeline="explodes", notification_url=rapp.url)).get_json()
    done = wait_for(client, job["id"])
    assert done["status"] == "FAILED"
    assert done["steps_state"]["TRAINING"] == "FAILED"
    assert "diverged" in done["failure_reason"]
    deadline = time.monotonic() + 10
    while not any("FAILED" in b.values() for b in rapp.bodies()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rapp.bodies()[-1]["TRAINING"] == "FAILED"
    assert client.get("/model/bad_model/1/1.0.0/Model.zip").status_code == 404


def test_duplicate_and_late_callbacks_change_nothing(setup, worker):
    client = setup
    job = client.post(JOBS, json=job_request()).get_json()
    done = wait_for(client, job["id"])
    assert done["status"] == "FINISHED"
    for body in ({"trainingjob_id": job["id"]}, {"trainingjob_id": str(job["id"])}):
        response = client.post("/trainingjob/dataExtractionNotification", json=body)
        assert response.status_code == 200 and "nothing to do" in response.get_json()["result"]
    for status in ("SUCCEEDED", "FAILED", "SUCCEEDED"):
        response = client.post("/trainingjob/pipelineNotification",
                               json={"trainingjob_id": str(job["id"]), "run_status": status})
        assert response.status_code == 200
    after = client.get(f"{JOBS}/{job['id']}").get_json()
    assert after["steps_state"] == done["steps_state"] and after["status"] == "FINISHED"


def test_a_failure_callback_is_a_wake_up_not_a_verdict(setup, worker, tmp_path):
    # Before: an anonymous FAILED callback terminated a healthy run and failed its job.
    client = setup
    upload(client, "naps", slow_pipeline(tmp_path, seconds=20))
    job = client.post(JOBS, json=job_request("napper", pipeline="naps")).get_json()
    wait_for_step(client, job["id"], "TRAINING", "IN_PROGRESS")
    for status in ("TERMINATED", "FAILED"):
        response = client.post("/trainingjob/pipelineNotification",
                               json={"trainingjob_id": job["id"], "run_status": status})
        assert response.status_code == 200
    time.sleep(1.0)  # the watch step has looked at the engine by now (it was made due at once)
    running = client.get(f"{JOBS}/{job['id']}").get_json()
    assert running["status"] == "IN_PROGRESS" and running["steps_state"]["TRAINING"] == "IN_PROGRESS"
    assert client.delete(f"{JOBS}/{job['id']}").status_code == 204


def test_a_callback_about_another_run_is_ignored(setup, worker, tmp_path, monkeypatch):
    from trainingmgr.models.work_queue import WorkQueue

    client = setup
    upload(client, "naps", slow_pipeline(tmp_path, seconds=20))
    job = client.post(JOBS, json=job_request("napper", pipeline="naps")).get_json()
    wait_for_step(client, job["id"], "TRAINING", "IN_PROGRESS")
    run_id = client.get(f"{JOBS}/{job['id']}").get_json()["run_id"]
    woken = []
    make_due = WorkQueue.make_due
    monkeypatch.setattr(WorkQueue, "make_due", lambda self, *a: (woken.append(a), make_due(self, *a))[1])
    for status in ("SUCCEEDED", "FAILED"):
        answer = client.post("/trainingjob/pipelineNotification",
                             json={"trainingjob_id": job["id"], "run_status": status, "run_id": "made-up-run"})
        assert answer.status_code == 200 and "not the job's current run" in answer.get_json()["result"]
    assert woken == [], "a callback about another run makes nothing due"
    answer = client.post("/trainingjob/pipelineNotification",
                         json={"trainingjob_id": job["id"], "run_status": "FAILED", "run_id": run_id})
    assert answer.status_code == 200 and "handled" in answer.get_json()["result"]
    assert woken == [(job["id"], "watch_run")]
    time.sleep(1.0)  # the watch step has looked at the engine by now
    assert client.get(f"{JOBS}/{job['id']}").get_json()["status"] == "IN_PROGRESS", "the engine says it runs"
    assert client.delete(f"{JOBS}/{job['id']}").status_code == 204


def test_a_failed_job_leaves_no_files_behind(setup, worker, app, tmp_path):
    # Before: the run's folder (and the extracted dataset) stayed after the job failed.
    client = setup
    upload(client, "explodes", failing_pipeline(tmp_path))
    job = client.post(JOBS, json=job_request("bad_model", pipeline="explodes")).get_json()
    done = wait_for(client, job["id"])
    assert done["status"] == "FAILED" and done["run_id"]
    data = Path(app.extensions["trainingmgr"].settings.data_path)
    # The files go right after the failure is committed (the row is the record): give the worker a moment.
    deadline = time.monotonic() + 20
    while ((data / "runs" / done["run_id"]).exists() or list((data / "datasets").glob("*"))) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (data / "runs" / done["run_id"]).exists()
    assert list((data / "datasets").glob("*")) == []


def test_delete_during_a_run_terminates_it_and_removes_the_job(setup, worker, tmp_path, app):
    client = setup
    upload(client, "naps", slow_pipeline(tmp_path, seconds=30))
    job = client.post(JOBS, json=job_request("napper", pipeline="naps")).get_json()
    wait_for_step(client, job["id"], "TRAINING", "IN_PROGRESS")
    run_id = client.get(f"{JOBS}/{job['id']}").get_json()["run_id"]
    run_dir = Path(app.extensions["trainingmgr"].settings.data_path) / "runs" / run_id
    pid = int((run_dir / "pid").read_text())
    assert client.delete(f"{JOBS}/{job['id']}").status_code == 204
    assert client.get(f"{JOBS}/{job['id']}").status_code == 404
    assert client.delete(f"{JOBS}/{job['id']}").status_code == 404
    assert not run_dir.exists()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and "Z" not in _proc_state(pid):
        assert time.monotonic() < deadline, "the run's process is still alive"
        time.sleep(0.1)


def test_delete_and_a_concurrent_worker_step_do_not_deadlock(setup, worker, app, tmp_path, pg_only):
    """Delete terminates the run, then removes the job's work items and the job. A worker step that took the job's
    row meanwhile (as the watch step does when the terminated run ends) finishes its own item afterwards: unless
    delete also takes the job's row first, the two deadlock on PostgreSQL and delete answers 500. A run that ignores
    SIGTERM keeps delete in terminate for the engine's grace period, so the step surely starts inside it."""
    import threading

    from sqlalchemy import delete, select, update

    from trainingmgr.extensions import db
    from trainingmgr.models import TrainingJob, WorkItem

    app.extensions["trainingmgr"].engine.terminate_grace = 1.0
    client = setup
    upload(client, "stubborn", stubborn_pipeline(tmp_path))
    holding = tmp_path / "holding"
    job_id = client.post(JOBS, json=job_request("stubborn", pipeline="stubborn", marker=str(holding))).get_json()["id"]
    deadline = time.monotonic() + 60
    while not holding.exists():  # the task runs and ignores SIGTERM from now on
        assert time.monotonic() < deadline, "the stubborn task did not start"
        time.sleep(0.05)
    answer, step_error = [], []
    deleting = threading.Thread(target=lambda: answer.append(client.delete(f"{JOBS}/{job_id}").status_code))
    deleting.start()
    with app.app_context():
        deadline = time.monotonic() + 10
        while not db.session.scalar(select(TrainingJob.deletion_in_progress).where(TrainingJob.id == job_id)):
            assert time.monotonic() < deadline, "the delete did not start"
            db.session.rollback()
            time.sleep(0.01)
        db.session.rollback()
        try:  # a worker step: update the job, then (after delete has moved on) finish the job's items
            db.session.execute(update(TrainingJob).where(TrainingJob.id == job_id).values(notification_url=""))
            time.sleep(3.0)
            db.session.execute(delete(WorkItem).where(WorkItem.job_id == job_id))
            db.session.commit()
        except Exception as e:  # the deadlock victim
            step_error.append(e)
            db.session.rollback()
        finally:
            db.session.remove()
    deleting.join(60)
    assert step_error == [] and answer == [204]
    assert client.get(f"{JOBS}/{job_id}").status_code == 404


def stubborn_pipeline(tmp_path: Path) -> Path:
    """A pipeline whose task ignores SIGTERM: terminating it takes the engine's whole grace period."""
    from kfp import compiler, dsl

    @dsl.component(install_kfp_package=False, packages_to_install=[], base_image="python:3.11")
    def hold_on(dataset_uri: str, marker: str, model: dsl.Output[dsl.Model]):
        import signal
        import time

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open(marker, "w").close()
        time.sleep(120)

    @dsl.pipeline(name="stubborn")
    def stubborn(dataset_uri: str, marker: str):
        hold_on(dataset_uri=dataset_uri, marker=marker)

    path = tmp_path / "stubborn.yaml"
    compiler.Compiler().compile(stubborn, str(path))
    return path


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "Z"


def test_restart_in_the_middle_of_a_run_still_ends_the_job(setup, settings, tmp_path):
    """The service stops (its worker threads gone, leases held) while a run goes on; a new one finishes it."""
    from trainingmgr import create_app

    client = setup
    upload(client, "naps", slow_pipeline(tmp_path, seconds=4))
    first = create_app(settings.replace(lease_seconds=1))
    first_worker = first.extensions["trainingmgr"].start_worker(first)
    job = client.post(JOBS, json=job_request("napper", pipeline="naps")).get_json()
    wait_for_step(client, job["id"], "TRAINING", "IN_PROGRESS")
    first_worker.stop()  # the process is gone: nothing finishes its leases

    second = create_app(settings.replace(lease_seconds=1))
    try:
        second.extensions["trainingmgr"].start_worker(second)
        done = wait_for(second.test_client(), job["id"])
    finally:
        second.extensions["trainingmgr"].stop_worker()
    assert done["status"] == "FINISHED", done


def test_eight_concurrent_creations_for_one_new_model(setup, app):
    """All succeed; each gets its own artifact version; exactly one is the first training."""
    def post(_: int) -> Any:
        with app.test_client() as c:
            return c.post(JOBS, json=job_request("fresh_model"))

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(post, range(8)))
    assert [r.status_code for r in responses] == [201] * 8, [r.get_json() for r in responses]
    jobs = [r.get_json() for r in responses]
    versions = sorted(j["modelId"]["artifactversion"] for j in jobs)
    assert versions == sorted(f"1.{n}.0" for n in range(8))
    assert sum(not j["is_retraining"] for j in jobs) == 1
