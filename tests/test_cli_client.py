"""`trainingmgr jobs | featuregroups | pipelines`: the CLI client against a real served instance (`trainingmgr
serve` on SQLite), over HTTP only; its output and its exit codes."""
from __future__ import annotations

import json
import re
import socket
import zipfile
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from tests.processes import free_port, ready_server
from tests.test_run_logs import numbered, talking_pipeline
from tests.test_training_lifecycle import (FEATURES, RETRAINING_YAML, TRAINING_YAML, failing_pipeline, job_request,
                                          slow_pipeline)
from trainingmgr.cli import cli


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-client")
    env = {"TM_DATA_DIR": str(folder / "data"), "TM_WORKERS": "1", "TM_DATABASE_URL": "",
           "TM_WORKER_POLL_SECONDS": "0.1"}
    with ready_server(folder, env) as url:
        yield url, folder


def run(service, *args: str, token: str | None = None, stdin: str | None = None):
    url, _ = service
    env = {"TM_URL": url, **({"TM_TOKEN": token} if token else {})}
    return CliRunner().invoke(cli, list(args), env=env, input=stdin, catch_exceptions=False)


def write(folder: Path, name: str, body: dict) -> str:
    path = folder / name
    path.write_text(json.dumps(body))
    return str(path)


@pytest.fixture(scope="module")
def ready(service):
    """The example's feature group and pipelines, made through the CLI."""
    _, folder = service
    fg = {"featuregroup_name": "cell_kpis", "feature_list": FEATURES, "datalake_source": "CsvSource",
          "measurement": "cell_kpis.csv", "enable_dme": False}
    made = run(service, "featuregroups", "create", "-f", write(folder, "fg.json", fg))
    assert made.exit_code == 0, made.output
    for name, file in (("qoe_training", TRAINING_YAML), ("qoe_retraining", RETRAINING_YAML)):
        uploaded = run(service, "pipelines", "upload", name, str(file), "--description", "example")
        assert uploaded.exit_code == 0 and f"pipeline {name}: version 1 ({name}) uploaded" in uploaded.output, \
            uploaded.output
    return service


def test_create_wait_list_show_and_download_a_job(ready, tmp_path):
    _, folder = ready
    created = run(ready, "jobs", "create", "-f", write(folder, "job.json", job_request()), "--wait",
                  "--timeout", "300")
    assert created.exit_code == 0, created.output
    job_id = int(created.stdout.splitlines()[0])
    assert f"job {job_id} FINISHED" in created.stdout
    assert "TRAINING=IN_PROGRESS" in created.stderr, "waiting shows the steps as they move"

    listed = run(ready, "jobs", "list")
    assert listed.exit_code == 0
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:3] == ["ID", "STATUS", "MODEL"]
    assert any(row.split()[:3] == [str(job_id), "FINISHED", "qoe"] for row in rows)
    as_json = json.loads(run(ready, "jobs", "list", "--json", "--limit", "1").stdout)
    assert [job["id"] for job in as_json] == [job_id]

    shown = run(ready, "jobs", "show", str(job_id))
    assert shown.exit_code == 0
    moment = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"  # with its date: a job may run past midnight
    assert re.search(rf"^TRAINING_AND_TRAINED_MODEL +FINISHED +{moment} +{moment} +[0-9.]+$", shown.stdout, re.M)
    assert re.search(rf"^{moment} +job NOT_STARTED", shown.stdout, re.M)
    assert "DATA_EXTRACTION NOT_STARTED -> IN_PROGRESS" in shown.stdout and "job NOT_STARTED" in shown.stdout

    target = tmp_path / "model.zip"
    downloaded = run(ready, "jobs", "download", str(job_id), "-o", str(target))
    assert downloaded.exit_code == 0, downloaded.output
    assert zipfile.ZipFile(target).namelist() and f"{target} (" in downloaded.stdout


def test_a_failed_job_is_exit_1_and_a_cancelled_one_too(ready, tmp_path):
    url, folder = ready
    failing = failing_pipeline(tmp_path)
    assert run(ready, "pipelines", "upload", "explodes", str(failing)).exit_code == 0
    created = run(ready, "jobs", "create", "-f", write(folder, "bad.json", job_request("bad", pipeline="explodes")))
    job_id = created.stdout.splitlines()[0]
    waited = run(ready, "jobs", "wait", job_id, "--timeout", "300")
    assert waited.exit_code == 1 and "FAILED" in waited.output and "diverged" in waited.output

    assert run(ready, "pipelines", "upload", "naps", str(slow_pipeline(tmp_path, seconds=60))).exit_code == 0
    slow = run(ready, "jobs", "create", "-f", write(folder, "slow.json", job_request("slow", pipeline="naps")))
    slow_id = slow.stdout.splitlines()[0]
    timed_out = run(ready, "jobs", "wait", slow_id, "--timeout", "1")
    assert timed_out.exit_code == 5 and "did not end within 1 s" in timed_out.output
    cancelled = run(ready, "jobs", "cancel", slow_id)
    assert cancelled.exit_code == 0 and f"job {slow_id} CANCELLED" in cancelled.stdout
    assert "reason: cancelled on request" in run(ready, "jobs", "show", slow_id).stdout
    assert run(ready, "jobs", "wait", slow_id).exit_code == 1
    again = run(ready, "jobs", "cancel", slow_id)
    assert again.exit_code == 3 and "409" in again.output and "ended already" in again.output
    assert run(ready, "jobs", "download", slow_id).exit_code == 3


def test_logs_follow_a_running_job_on_the_command_line_and_as_one_streamed_answer(ready, tmp_path):
    """`jobs logs --follow` reads on until the job ends; `?follow=true` is one chunked answer that the server's
    event hub writes (the connection is handed over: it holds no request thread) and ends with the job."""
    url, folder = ready
    assert run(ready, "pipelines", "upload", "talks", str(talking_pipeline(tmp_path, 20, 0.2))).exit_code == 0
    created = run(ready, "jobs", "create", "-f", write(folder, "talk.json", job_request("talker", pipeline="talks")))
    job_id = created.stdout.splitlines()[0]
    streamed = bytearray()
    with requests.get(f"{url}/ai-ml-model-training/v1/training-jobs/{job_id}/logs?follow=true&offset=0",
                      stream=True, timeout=(10, 120)) as answer:
        assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/plain")
        assert answer.headers.get("Transfer-Encoding") == "chunked"
        for chunk in answer.iter_content(chunk_size=None):
            streamed += chunk
    followed = run(ready, "jobs", "logs", job_id, "--follow")
    assert followed.exit_code == 0, followed.output
    assert numbered(streamed.decode()) == list(range(20)), "streamed to the end of the job's run"
    assert followed.stdout_bytes == bytes(streamed), "the whole output, as kept with the finished job"
    assert run(ready, "jobs", "wait", job_id, "--timeout", "60").exit_code == 0
    assert run(ready, "jobs", "logs", "999999").exit_code == 3


def test_an_http_1_0_follow_ends_with_the_connection_when_the_job_ends(ready, tmp_path):
    url, folder = ready
    assert run(ready, "pipelines", "upload", "talks10", str(talking_pipeline(tmp_path, 10, 0.2))).exit_code == 0
    created = run(ready, "jobs", "create", "-f", write(folder, "talk10.json", job_request("old_http",
                                                                                        pipeline="talks10")))
    job_id = created.stdout.splitlines()[0]
    host, port = url.removeprefix("http://").split(":")
    received = bytearray()
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.sendall(f"GET /ai-ml-model-training/v1/training-jobs/{job_id}/logs?follow=true&offset=0 HTTP/1.0\r\n"
                     f"Host: {host}\r\n\r\n".encode())
        while chunk := sock.recv(65536):  # the body ends when the server closes the connection
            received += chunk
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head.lower()
    assert numbered(body.decode()) == list(range(10))
    kept = requests.get(f"{url}/ai-ml-model-training/v1/training-jobs/{job_id}/logs?offset=0", timeout=30)
    assert kept.headers["X-Log-Complete"] == "true" and kept.content == body


def test_feature_groups_and_pipelines(ready):
    listed = run(ready, "featuregroups", "list")
    assert listed.exit_code == 0 and "cell_kpis" in listed.stdout and "CsvSource" in listed.stdout
    shown = json.loads(run(ready, "featuregroups", "show", "cell_kpis").stdout)
    assert shown["featuregroup_name"] == "cell_kpis"
    assert "qoe_training" in run(ready, "pipelines", "list").stdout
    assert run(ready, "pipelines", "versions", "qoe_training").stdout.split() == ["qoe_training"]
    temporary = run(ready, "featuregroups", "create", "-f", "-", stdin=json.dumps(
        {"featuregroup_name": "short_lived", "feature_list": "a", "datalake_source": "CsvSource",
         "measurement": "cell_kpis.csv", "enable_dme": False}))
    assert temporary.exit_code == 0, temporary.output
    assert run(ready, "featuregroups", "delete", "short_lived").exit_code == 0
    assert run(ready, "featuregroups", "show", "short_lived").exit_code == 3
    # A name is one path segment: "cell_kpis?x" is refused as a name (unescaped it would have read cell_kpis).
    odd = run(ready, "featuregroups", "show", "cell_kpis?x")
    assert odd.exit_code == 3 and "'cell_kpis?x'" in odd.output


def test_exit_codes_for_refusals_and_unreachable_services(ready, tmp_path):
    missing = run(ready, "jobs", "show", "999999")
    assert missing.exit_code == 3 and "404" in missing.output
    bad = run(ready, "jobs", "create", "-f", write(tmp_path, "bad.json", {"model_id": {}}))
    assert bad.exit_code == 3 and "400" in bad.output
    assert run(ready, "jobs", "create", "-f", str(tmp_path / "nothing.json")).exit_code == 2
    port = free_port()
    nobody = CliRunner().invoke(cli, ["jobs", "list", "--url", f"http://127.0.0.1:{port}"], env={"TM_URL": None})
    assert nobody.exit_code == 4 and "cannot be reached" in nobody.output
    no_scheme = CliRunner().invoke(cli, ["jobs", "list", "--url", f"127.0.0.1:{port}"], env={"TM_URL": None})
    assert no_scheme.exit_code == 2 and "is not a service URL" in no_scheme.output
    not_deleted = run(ready, "featuregroups", "delete", "no_such_group")
    assert not_deleted.exit_code == 3 and "were not deleted" in not_deleted.output


def test_tokens_are_sent_and_their_absence_is_explained(tmp_path):
    env = {"TM_DATA_DIR": str(tmp_path / "data"), "TM_WORKERS": "1", "TM_DATABASE_URL": "", "TM_AUTH": "token"}
    added = CliRunner().invoke(cli, ["auth", "add-token", "ops", "reader"], env=env)
    token = added.stdout.strip()
    with ready_server(tmp_path, env) as url:
        service = (url, tmp_path)
        refused = run(service, "jobs", "list")
        assert refused.exit_code == 3 and "401" in refused.output and "--token or set TM_TOKEN" in refused.output
        assert run(service, "jobs", "list", token=token).exit_code == 0
        forbidden = run(service, "jobs", "cancel", "1", token=token)
        assert forbidden.exit_code == 3 and "403" in forbidden.output
