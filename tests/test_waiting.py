"""No silent waiting: while a step retries a peer that fails, the job says why, how often, when next and until
when (its `waiting`), and the log says so at WARNING; a data source that cannot be reached at all fails the job
within TM_SOURCE_UNREACHABLE_TIMEOUT, with the reason, instead of after the hour-long extraction deadline."""
from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

import pandas as pd
import pytest

from tests.extraction_doubles import InfluxDouble
from tests.factories import FG_V1
from tests.processes import free_port
from tests.test_training_lifecycle import (JOBS, RETRAINING_YAML, TRAINING_YAML, job_request, upload, wait_for,
                                           wait_for_step)

GRACE = 3  # TM_SOURCE_UNREACHABLE_TIMEOUT of these tests, seconds

# The README's own feature group: an InfluxDB at host "influxdb", which nothing here resolves.
README_FEATURE_GROUP = {
    "featuregroup_name": "cell_kpis", "feature_list": "pdcpBytesDl,pdcpBytesUl,prbUsage",
    "datalake_source": "InfluxSource", "host": "influxdb", "port": "8086", "bucket": "pm",
    "token": "my-influx-token", "db_org": "primary", "measurement": "cell_kpis", "enable_dme": False}


def start(client, feature_group: dict) -> dict:
    assert client.post(FG_V1, json=feature_group).status_code == 201
    upload(client, "qoe_training", TRAINING_YAML)
    upload(client, "qoe_retraining", RETRAINING_YAML)
    created = client.post(JOBS, json=job_request())
    assert created.status_code == 201, created.get_json()
    return created.get_json()


def waiting_of(client, job_id: int, seconds: float = 30) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        job = client.get(f"{JOBS}/{job_id}").get_json()
        if job["waiting"] is not None or job["status"] == "FAILED":
            return job
        assert time.monotonic() < deadline, f"job {job_id} never said it was waiting: {job}"
        time.sleep(0.05)


@pytest.mark.parametrize("host, port, why", [("influxdb", "8086", "unknown host"),
                                             ("127.0.0.1", None, "connection refused")])
def test_an_unreachable_influxdb_is_shown_while_retried_then_fails_the_job(build_app, caplog, host, port, why):
    app = build_app(source_unreachable_timeout=GRACE)
    client = app.test_client()
    job = start(client, {**README_FEATURE_GROUP, "host": host, "port": port or str(free_port())})
    assert job["waiting"] is None
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="trainingmgr.workers.steps"):
        app.extensions["trainingmgr"].start_worker(app)
        shown = waiting_of(client, job["id"])
        waiting = shown["waiting"]
        assert shown["status"] == "IN_PROGRESS" and waiting is not None, shown
        assert waiting["step"] == "DATA_EXTRACTION"
        assert waiting["reason"].startswith("data extraction failed: InfluxDB at ")
        assert f"is not reachable ({why})" in waiting["reason"]
        assert waiting["attempts"] >= 1
        created = datetime.fromisoformat(shown["created_at"])
        next_at = datetime.fromisoformat(waiting["next_attempt_at"])
        gives_up = datetime.fromisoformat(waiting["gives_up_at"])
        assert created <= next_at <= gives_up <= created + timedelta(seconds=GRACE + 30)
        done = wait_for(client, job["id"], timeout=60)
    took = time.monotonic() - began
    assert done["status"] == "FAILED" and done["steps_state"]["DATA_EXTRACTION"] == "FAILED"
    assert f"is not reachable ({why})" in done["failure_reason"]
    assert f"TM_SOURCE_UNREACHABLE_TIMEOUT={GRACE}" in done["failure_reason"] and "gave up after" in done["failure_reason"]
    assert done["waiting"] is None
    assert took < GRACE + 30, f"failed after {took:.0f} s"
    warnings = [r for r in caplog.records if r.getMessage() == "step waiting to retry a peer"]
    assert warnings and warnings[0].levelno == logging.WARNING
    assert warnings[0].trainingjob_id == job["id"] and why in warnings[0].reason
    assert "my-influx-token" not in caplog.text


def test_an_unreachable_data_extraction_service_fails_the_job_in_bounded_time(build_app):
    app = build_app(source_unreachable_timeout=GRACE, data_extraction="remote",
                   data_extraction_url=f"http://127.0.0.1:{free_port()}")
    client = app.test_client()
    job = start(client, README_FEATURE_GROUP)
    app.extensions["trainingmgr"].start_worker(app)
    waiting = waiting_of(client, job["id"])["waiting"]
    assert "the data-extraction service at 127.0.0.1:" in waiting["reason"] and "is not reachable" in waiting["reason"]
    done = wait_for(client, job["id"], timeout=60)
    assert done["status"] == "FAILED" and "gave up after" in done["failure_reason"]


def test_a_peer_that_recovers_clears_the_waiting(build_app):
    """A failing InfluxDB (HTTP 503: up, but failing) is retried within the step's deadline, shown while it fails,
    and the job moves on (waiting null again) once it answers."""
    rows = pd.DataFrame({"_time": pd.to_datetime(["2024-01-01T00:00:00Z", "2024-01-01T00:01:00Z"]),
                         "pdcpBytesDl": [1, 2], "pdcpBytesUl": [3, 4], "prbUsage": [0.5, 0.6]})
    influx = InfluxDouble([rows]).start()
    try:
        influx.status = 503
        app = build_app(source_unreachable_timeout=GRACE)
        client = app.test_client()
        job = start(client, {**README_FEATURE_GROUP, "host": "127.0.0.1", "port": str(influx.port)})
        app.extensions["trainingmgr"].start_worker(app)
        waiting = waiting_of(client, job["id"])["waiting"]
        assert "answered HTTP 503" in waiting["reason"]
        time.sleep(GRACE + 1)  # longer than the unreachable grace: a server that answers is not "unreachable"
        assert client.get(f"{JOBS}/{job['id']}").get_json()["status"] == "IN_PROGRESS"
        influx.status = 200  # answers now
        wait_for_step(client, job["id"], "DATA_EXTRACTION", "FINISHED", timeout=60)
        moved_on = client.get(f"{JOBS}/{job['id']}").get_json()
    finally:
        influx.stop()
    assert moved_on["waiting"] is None and moved_on["failure_reason"] == ""


def test_a_peer_that_answered_since_starts_its_unreachable_time_afresh(build_app):
    """The data-extraction service drops the first starts (unreachable), then starts the task and is polled for
    longer than the grace; one dropped poll after that is a new outage, retried, not 'unreachable for too long'."""
    from tests.extraction_doubles import DataExtractionService

    service = DataExtractionService(accepted_polls=1000).start()
    try:
        service.drop_methods = {"POST"}
        app = build_app(source_unreachable_timeout=GRACE, data_extraction="remote", data_extraction_url=service.url)
        client = app.test_client()
        job = start(client, README_FEATURE_GROUP)
        app.extensions["trainingmgr"].start_worker(app)
        assert "is not reachable" in waiting_of(client, job["id"])["waiting"]["reason"]
        service.drop_methods = set()
        deadline = time.monotonic() + 60
        while not service.tasks:
            assert time.monotonic() < deadline, "the extraction never started"
            time.sleep(0.1)
        time.sleep(GRACE + 1.5)  # polled (answered) for longer than the grace
        polls = len(service.recorded("GET"))
        service.drop_methods = {"GET"}
        deadline = time.monotonic() + 30
        while len(service.recorded("GET")) <= polls:
            assert time.monotonic() < deadline, "no poll after the outage began"
            time.sleep(0.05)
        time.sleep(0.5)
        during = client.get(f"{JOBS}/{job['id']}").get_json()
        assert during["status"] == "IN_PROGRESS", during["failure_reason"]
    finally:
        service.stop()


def test_a_peers_error_that_echoes_the_token_is_shown_without_it(build_app, caplog):
    from tests.extraction_doubles import DataExtractionService

    token = README_FEATURE_GROUP["token"]
    service = DataExtractionService().start()
    try:
        service.start_answer = (500, {"result": f"cannot start: bad influxdb_info {{'token': '{token}'}}"})
        app = build_app(data_extraction="remote", data_extraction_url=service.url)
        client = app.test_client()
        job = start(client, README_FEATURE_GROUP)
        with caplog.at_level(logging.WARNING, logger="trainingmgr.workers.steps"):
            app.extensions["trainingmgr"].start_worker(app)
            waiting = waiting_of(client, job["id"])["waiting"]
            assert "cannot start" in waiting["reason"] and "****" in waiting["reason"]
            assert token not in waiting["reason"]
            service.start_answer = (400, {"result": f"refused: token {token}"})  # not retryable: the job fails
            done = wait_for(client, job["id"], timeout=60)
        assert "refused: token ****" in done["failure_reason"] and token not in done["failure_reason"]
        assert token not in caplog.text
    finally:
        service.stop()
