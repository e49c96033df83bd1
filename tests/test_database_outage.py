"""Database outages (issue 9 item 4): while the database is away every request that needs it is a 503 ProblemDetails
with Retry-After, /readyz says so, the workers back off and log the outage once instead of a traceback per poll,
and everything recovers when the database is back.

The outage is real: a PostgreSQL cluster of the test's own (tests/private_postgres.py, initdb in a temporary folder
on a free port) that the test stops (fast shutdown: sessions cut, connections refused) and starts again, under
`trainingmgr serve` (gunicorn, embedded worker threads) as deployed.
"""
from __future__ import annotations

import json
import logging
import re
import sqlite3
import time
from pathlib import Path

import psycopg2
import pytest
import requests
from sqlalchemy import exc, text

from tests.conftest import REQUIRE_POSTGRES
from tests.private_postgres import pg_bin, private_cluster
from tests.processes import assert_ready, free_port, served
from tests.test_training_lifecycle import FEATURES, JOBS, RETRAINING_YAML, TRAINING_YAML, job_request
from trainingmgr.errors import RETRY_AFTER_SECONDS, database_unavailable
from trainingmgr.extensions import db
from trainingmgr.workers import runner
from trainingmgr.workers.runner import OUTAGE_LOG_INTERVAL, DatabaseOutage, next_outage_delay

FG_V1 = "/ai-ml-model-training/v1/featureGroup"
STEP_THREADS, NOTIFY_THREADS = 2, 1
IDLE_SECONDS = 8.0  # outage measured with no request at all: only the workers poll


@pytest.fixture
def cluster():
    if pg_bin() is None:
        message = "no PostgreSQL server binaries (initdb) on this machine: the outage test needs a cluster it can stop"
        if REQUIRE_POSTGRES:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    with private_cluster() as c:
        yield c


def _log(path: Path, start: int = 0) -> str:
    return path.read_bytes()[start:].decode("utf-8", errors="replace")


def _worker_lines(text_: str) -> list[dict]:
    return [json.loads(line) for line in text_.splitlines()
            if line.startswith("{") and '"logger": "trainingmgr.workers.runner"' in line]


def _assert_503_problem(response: requests.Response, what: str) -> dict:
    assert response.status_code == 503, f"{what}: {response.status_code} {response.text[:300]}"
    assert response.headers.get("Content-Type", "").startswith("application/problem+json"), what
    assert response.headers.get("Retry-After") == str(RETRY_AFTER_SECONDS), f"{what}: {dict(response.headers)}"
    body = response.json()
    assert body["status"] == 503 and body["title"] == "Service Unavailable" and body["detail"], (what, body)
    assert "Traceback" not in response.text and "psycopg2" not in response.text, (what, body)
    return body


def test_an_outage_is_503_with_retry_after_logged_once_and_recovered_from(cluster, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    env = {"TM_DATABASE_URL": cluster.url, "TM_DATA_DIR": str(tmp_path / "data"), "TM_SECRET_KEY": "outage",
           "TM_WORKERS": "1", "TM_WORKER_THREADS": str(STEP_THREADS), "TM_NOTIFY_THREADS": str(NOTIFY_THREADS),
           # Polling every 50 ms: before the fix each poll of each thread was a traceback (~8 KB) while the
           # database was away.
           "TM_WORKER_POLL_SECONDS": "0.05", "TM_LOG_LEVEL": "INFO", "TM_DB_POOL_TIMEOUT": "5"}
    with served(tmp_path, port, env) as server:
        assert_ready(url, server, 120, log_path)
        fg = {"featuregroup_name": "cell_kpis", "datalake_source": "CsvSource", "measurement": "cell_kpis.csv",
              "feature_list": FEATURES, "enable_dme": False}
        assert requests.post(url + FG_V1, json=fg, timeout=30).status_code == 201
        for name, path in (("qoe_training", TRAINING_YAML), ("qoe_retraining", RETRAINING_YAML)):
            with open(path, "rb") as f:
                assert requests.post(f"{url}/pipelines/{name}/upload", files={"file": (path.name, f)},
                                     timeout=60).status_code == 200

        # --- the database goes away; nobody calls the service: only the idle workers poll
        before = log_path.stat().st_size
        outage_started = time.monotonic()
        cluster.stop()
        time.sleep(max(0.0, IDLE_SECONDS - (time.monotonic() - outage_started)))
        idle_log = _log(log_path, before)
        idle_bytes = len(idle_log.encode())
        worker_lines = _worker_lines(idle_log)
        print(f"\nidle outage, {IDLE_SECONDS:.0f} s: {idle_log.count(chr(10))} log lines, {idle_bytes} bytes")
        assert "Traceback" not in idle_log
        assert [line["message"] for line in worker_lines] == ["database unreachable, retrying in 0.5 s"], worker_lines
        assert worker_lines[0]["level"] == "WARNING"
        assert idle_bytes < 2000, idle_log[:3000]  # before: ~8 KB per poll, MBs in these seconds

        # --- requests that need the database: 503 ProblemDetails with Retry-After, one log line each
        before = log_path.stat().st_size
        calls = [("GET", JOBS, None), ("GET", f"{JOBS}/1", None), ("GET", f"{JOBS}/1/status", None),
                 ("POST", JOBS, job_request("outage_model")), ("GET", FG_V1, None),
                 ("POST", FG_V1, {**fg, "featuregroup_name": "other"}),
                 ("GET", "/pipelines", None), ("GET", "/metrics", None)]
        for method, path, body in calls:
            _assert_503_problem(requests.request(method, url + path, json=body, timeout=30), f"{method} {path}")
        ready = requests.get(url + "/readyz", timeout=30)
        assert _assert_503_problem(ready, "/readyz")["checks"]["database"] == "unreachable"
        assert requests.get(url + "/healthz", timeout=30).status_code == 200  # alive, not ready
        request_log = _log(log_path, before)
        per_request = len(request_log.encode()) / (len(calls) + 2)
        print(f"{len(calls) + 2} requests during the outage: {len(request_log.encode())} log bytes "
              f"({per_request:.0f} per request)")
        assert "Traceback" not in request_log
        assert per_request < 1500, request_log[:3000]
        assert request_log.count("request failed: database unavailable") == len(calls)

        # --- the database is back: requests and workers recover on their own
        cluster.start()
        outage_seconds = time.monotonic() - outage_started
        assert_ready(url, server, 30, log_path)
        created = requests.post(url + JOBS, json=job_request("after_outage"), timeout=30)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        deadline = time.monotonic() + 60
        while requests.get(f"{url}{JOBS}/{job_id}/status", timeout=30).json()["DATA_EXTRACTION"] != "FINISHED":
            assert time.monotonic() < deadline, "the workers did not take the new job's first step within 60 s"
            time.sleep(0.2)
        deadline = time.monotonic() + 45  # a thread may be in its longest backoff (30 s) when the database returns
        while not (back := [line for line in _worker_lines(_log(log_path)) if line["level"] == "INFO"
                            and line["message"].startswith("database reachable again")]):
            assert time.monotonic() < deadline, _log(log_path)[-3000:]
            time.sleep(0.2)
    all_worker_lines = [line for line in _worker_lines(_log(log_path)) if "database" in line["message"]]
    assert [line["level"] for line in all_worker_lines] == ["WARNING", "INFO"], all_worker_lines
    # Backoff, not polling: each thread tried about log2(outage / 0.5 s) times (+1 for the try that succeeds
    # late), where polling every 50 ms made it ~20 tries a second each.
    threads = STEP_THREADS + NOTIFY_THREADS
    failed = back[0]["failed_attempts"]
    print(f"outage of {outage_seconds:.1f} s: {failed} failed attempts by {threads} threads")
    assert 1 <= failed <= threads * 8, back[0]
    assert "Traceback" not in _log(log_path)


def test_no_free_pooled_connection_is_503_with_retry_after(pg_only, build_app):
    """A pool timeout (every connection taken for TM_DB_POOL_TIMEOUT) is a passing state too, not a 500."""
    app = build_app(db_pool_size=1, db_max_overflow=0, db_pool_timeout=1)
    client = app.test_client()
    with app.app_context():
        held = db.engine.connect()  # the pool's only connection
        try:
            response = client.get(JOBS)
        finally:
            held.close()
    assert response.status_code == 503 and response.mimetype == "application/problem+json"
    assert response.headers["Retry-After"] == str(RETRY_AFTER_SECONDS)
    assert response.get_json()["status"] == 503
    assert client.get(JOBS).status_code == 200  # the connection is back in the pool


def _wrapped(orig: Exception, cls: type = exc.OperationalError, **kwargs) -> exc.DBAPIError:
    return cls("SELECT 1", {}, orig, **kwargs)


def test_which_database_errors_are_outages():
    # Connection level: refused or lost (no SQLSTATE), invalidated connections, pool timeouts.
    assert database_unavailable(_wrapped(psycopg2.OperationalError("connection to server failed: refused")))
    assert database_unavailable(_wrapped(psycopg2.InterfaceError("connection already closed"), exc.InterfaceError))
    assert database_unavailable(_wrapped(Exception("gone"), exc.DBAPIError, connection_invalidated=True))
    assert database_unavailable(exc.TimeoutError("QueuePool limit reached"))
    # Not outages: statement errors, and SQLite's own (a locked or missing file is not a server that is away).
    assert not database_unavailable(_wrapped(psycopg2.errors.UniqueViolation("duplicate"), exc.IntegrityError))
    assert not database_unavailable(_wrapped(sqlite3.OperationalError("database is locked")))
    assert not database_unavailable(_wrapped(sqlite3.OperationalError("unable to open database file")))
    assert not database_unavailable(ValueError("not a database error"))


def test_server_side_errors_are_told_apart(pg_only, app):
    """On a real server: a session the server ends (57P01) is an outage; a cancelled or failing statement is not."""
    with app.app_context():
        with db.engine.connect() as conn:
            with pytest.raises(exc.DBAPIError) as ended:
                conn.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        assert database_unavailable(ended.value), repr(ended.value)
        with db.engine.connect() as conn:
            conn.execute(text("SET statement_timeout = 50"))
            with pytest.raises(exc.OperationalError) as cancelled:
                conn.execute(text("SELECT pg_sleep(2)"))
        assert getattr(cancelled.value.orig, "pgcode", None) == "57014"
        assert not database_unavailable(cancelled.value)
        with db.engine.connect() as conn:
            with pytest.raises(exc.DBAPIError) as failed:
                conn.execute(text("SELECT 1 / 0"))
        assert not database_unavailable(failed.value)


def test_the_backoff_doubles_from_half_a_second_to_thirty():
    delays, delay = [], 0.0
    for _ in range(9):
        delay = next_outage_delay(delay)
        delays.append(delay)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_an_outage_is_logged_once_per_interval(caplog):
    now = [1000.0]
    outage = DatabaseOutage(clock=lambda: now[0])
    error = _wrapped(psycopg2.OperationalError("connection refused"))
    caplog.set_level(logging.INFO, logger=runner.__name__)
    assert OUTAGE_LOG_INTERVAL == 60
    for _ in range(200):  # 200 failures over 100 s, from several threads
        outage.failed(error, 0.5)
        now[0] += 0.5
    outage.succeeded()
    outage.succeeded()
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert messages[0] == ("WARNING", "database unreachable, retrying in 0.5 s")
    assert messages[1][0] == "WARNING" and re.fullmatch(r"database still unreachable after 60 s, retrying in 0.5 s",
                                                        messages[1][1]), messages
    assert messages[2] == ("INFO", "database reachable again after 100.0 s")
    assert len(messages) == 3  # 100 s of outage: the first line, one after OUTAGE_LOG_INTERVAL, the end
    assert caplog.records[2].failed_attempts == 200
    assert not any(r.exc_info for r in caplog.records)
