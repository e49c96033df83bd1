"""A job's pipeline run output: `GET .../training-jobs/{id}/logs` (and `?follow=true`), kept with the job when its
run ends (the run's folder goes then), bounded, and deleted with the job."""

import threading
import time
from pathlib import Path

import pytest

from tests.factories import create_file_feature_group
from tests.test_training_lifecycle import (FEATURES, JOBS, failing_pipeline, job_request, setup,  # noqa: F401
                                          upload, wait_for, wait_for_step)
from trainingmgr.extensions import db
from trainingmgr.models import JobLog


def talking_pipeline(tmp_path: Path, line_count: int, pause_seconds: float, name: str = "talks") -> Path:
    """A pipeline whose task prints `lines` numbered lines, `pause` seconds apart, then stores a model. (Its
    parameters are strings: what the service passes.)"""
    from kfp import compiler, dsl

    @dsl.component(install_kfp_package=False, packages_to_install=[], base_image="python:3.11")
    def talk(dataset_uri: str, lines: str, pause: str, model: dsl.Output[dsl.Model]):
        import os
        import time

        for number in range(int(lines)):
            print(f"line {number:06d} " + "x" * 40, flush=True)
            time.sleep(float(pause))
        os.makedirs(model.path, exist_ok=True)
        with open(os.path.join(model.path, "weights.txt"), "w") as f:
            f.write("talked")

    @dsl.pipeline(name=name)
    def talks(dataset_uri: str, lines: str = str(line_count), pause: str = str(pause_seconds)):
        talk(dataset_uri=dataset_uri, lines=lines, pause=pause)

    path = tmp_path / f"{name}.yaml"
    compiler.Compiler().compile(talks, str(path))
    return path


@pytest.fixture
def app(build_app, request):
    """The app, with the settings a test names through `indirect` parametrisation."""
    return build_app(**getattr(request, "param", {}))


def numbered(text: str) -> list[int]:
    return [int(line.split()[1]) for line in text.splitlines() if line.strip().startswith("line ")]


def test_a_finished_job_keeps_its_run_output_after_the_run_folder_is_gone(setup, worker, app, tmp_path):
    client = setup
    upload(client, "talks", talking_pipeline(tmp_path, line_count=5, pause_seconds=0))
    job = wait_for(client, client.post(JOBS, json=job_request("talker", pipeline="talks")).get_json()["id"])
    assert job["status"] == "FINISHED", job
    runs_dir = app.extensions["trainingmgr"].engine.runs_dir
    deadline = time.monotonic() + 30  # removed right after the job's last change commits
    while (runs_dir / job["run_id"]).exists():
        assert time.monotonic() < deadline, "the run's folder is cleaned up"
        time.sleep(0.05)
    answer = client.get(f"{JOBS}/{job['id']}/logs")
    assert answer.status_code == 200 and answer.mimetype == "text/plain"
    text = answer.get_data(as_text=True)
    assert numbered(text) == [0, 1, 2, 3, 4], text
    assert answer.headers["X-Log-Complete"] == "true"
    size = int(answer.headers["X-Log-Offset"])
    assert size == len(answer.get_data())
    # A reader that had the first part asks for the rest only.
    half = size // 2
    rest = client.get(f"{JOBS}/{job['id']}/logs?offset={half}")
    assert rest.get_data() == answer.get_data()[half:] and rest.headers["X-Log-Offset"] == str(size)
    # Kept as long as the job: deleting the job deletes it.
    assert client.delete(f"{JOBS}/{job['id']}").status_code == 204
    with app.app_context():
        assert db.session.get(JobLog, job["id"]) is None
    assert client.get(f"{JOBS}/{job['id']}/logs").status_code == 404


def test_a_failed_run_keeps_the_exception_it_printed(setup, worker, tmp_path):
    client = setup
    upload(client, "explodes", failing_pipeline(tmp_path))
    job = wait_for(client, client.post(JOBS, json=job_request("bad", pipeline="explodes")).get_json()["id"])
    assert job["status"] == "FAILED"
    text = client.get(f"{JOBS}/{job['id']}/logs").get_data(as_text=True)
    assert "ValueError: the model diverged" in text
    assert text.rstrip().splitlines()[-1].startswith("run FAILED: "), "the runner says so last"


@pytest.mark.parametrize("app", [{"run_log_max_bytes": 4096}], indirect=True)
def test_a_long_output_keeps_its_end_and_says_what_was_cut(setup, worker, app, tmp_path):
    client = setup  # 400 lines of ~50 bytes: 20 kB, of which 4 kB are kept
    upload(client, "talks", talking_pipeline(tmp_path, line_count=400, pause_seconds=0))
    job = wait_for(client, client.post(JOBS, json=job_request("chatty", pipeline="talks")).get_json()["id"])
    assert job["status"] == "FINISHED", job
    with app.app_context():
        kept = db.session.get(JobLog, job["id"])
        assert 4096 - 100 < len(kept.content) <= 4096 and kept.size > 20_000
    text = client.get(f"{JOBS}/{job['id']}/logs").get_data(as_text=True)
    first, second, *_ = text.splitlines()
    not_kept = kept.size - len(kept.content)
    assert first == f"[{not_kept} bytes of the run's output not kept here (TM_RUN_LOG_MAX_BYTES)]"
    assert second.strip().startswith("line ") and second.endswith("x" * 40), "the kept part starts with a whole line"
    assert numbered(text)[-1] == 399, "the end is kept"
    assert 399 - numbered(text)[0] < 100


def test_follow_streams_the_output_as_the_run_writes_it_and_ends_with_the_job(setup, worker, tmp_path):
    client = setup
    upload(client, "talks", talking_pipeline(tmp_path, line_count=12, pause_seconds=0.25))
    job_id = client.post(JOBS, json=job_request("live", pipeline="talks")).get_json()["id"]
    wait_for_step(client, job_id, "TRAINING", "IN_PROGRESS")
    received: list[tuple[float, bytes]] = []
    failures: list[BaseException] = []

    def follow() -> None:
        try:
            answer = client.get(f"{JOBS}/{job_id}/logs?follow=true&offset=0", buffered=False)
            assert answer.status_code == 200 and answer.mimetype == "text/plain"
            for chunk in answer.response:
                received.append((time.monotonic(), chunk))
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            failures.append(e)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    job = wait_for(client, job_id)
    follower.join(timeout=30)
    assert not follower.is_alive(), "the followed log ended once the job had"
    assert failures == []
    assert job["status"] == "FINISHED"
    streamed = b"".join(chunk for _, chunk in received)
    whole = client.get(f"{JOBS}/{job_id}/logs?offset=0").get_data()
    assert streamed == whole, "followed, the output is the kept output: nothing lost, nothing twice"
    assert numbered(streamed.decode()) == list(range(12))
    assert len([chunk for _, chunk in received if chunk]) > 2, "it came in pieces while the run wrote it"


def test_a_cancelled_job_keeps_what_its_run_wrote(setup, worker, tmp_path):
    client = setup
    upload(client, "talks", talking_pipeline(tmp_path, line_count=600, pause_seconds=0.1))
    job_id = client.post(JOBS, json=job_request("stopped", pipeline="talks")).get_json()["id"]
    wait_for_step(client, job_id, "TRAINING", "IN_PROGRESS")
    deadline = time.monotonic() + 60
    while not numbered(client.get(f"{JOBS}/{job_id}/logs").get_data(as_text=True)):
        assert time.monotonic() < deadline, "the run printed nothing"
        time.sleep(0.2)
    assert client.post(f"{JOBS}/{job_id}/cancel").status_code == 200
    answer = client.get(f"{JOBS}/{job_id}/logs")
    assert answer.headers["X-Log-Complete"] == "true"
    lines = numbered(answer.get_data(as_text=True))
    assert lines and lines == list(range(len(lines))) and len(lines) < 600


def test_a_job_without_a_run_has_an_empty_complete_log(setup, worker):
    client = setup
    create_file_feature_group(client, "nothing", measurement="no_such_file.csv", feature_list=FEATURES)
    request = job_request("nodata")
    request["training_config"]["dataPipeline"]["feature_group_name"] = "nothing"
    job = wait_for(client, client.post(JOBS, json=request).get_json()["id"])
    assert job["status"] == "FAILED" and not job["run_id"], job
    answer = client.get(f"{JOBS}/{job['id']}/logs?follow=true")
    assert answer.status_code == 200 and answer.get_data() == b"" and answer.headers["X-Log-Complete"] == "true"


@pytest.mark.parametrize("query", ["follow=yes", "offset=-1", "offset=abc", "offset=" + "9" * 19])
def test_bad_log_queries_are_400(client, query):
    answer = client.get(f"{JOBS}/1/logs?{query}")
    assert answer.status_code == 400 and answer.mimetype == "application/problem+json"


def test_logs_of_a_missing_job_are_404(client):
    assert client.get(f"{JOBS}/12345/logs").status_code == 404
    assert client.get(f"{JOBS}/abc/logs").status_code == 400
