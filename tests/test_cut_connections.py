"""Pooled connections are not pinged before each use (a round trip per request), only after a second idle: a
connection that PostgreSQL cut while it sat in the pool (a restart, pg_terminate_backend, a proxy's idle timeout) is
replaced then, or, used sooner, noticed when used: a read is then tried once more on a new connection, so its client
sees nothing; a write is not tried twice (503, Retry-After); the workers go on with their next look."""
from __future__ import annotations

import time

import psycopg2
from sqlalchemy.engine import make_url

from tests.test_training_lifecycle import JOBS, job_request, setup, wait_for  # noqa: F401
from trainingmgr.app import PING_AFTER_IDLE_SECONDS


def cut_every_connection_but_ours(settings) -> int:
    """pg_terminate_backend on every other session of the test's database: as if the server had dropped them."""
    url = make_url(settings.sqlalchemy_url)
    conn = psycopg2.connect(host=url.host, port=url.port or 5432, user=url.username, dbname=url.database)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                           "WHERE datname = current_database() AND pid <> pg_backend_pid()")
            return cursor.fetchone()[0]
    finally:
        conn.close()


def test_reads_on_cut_connections_are_answered_without_an_error(setup, worker, pg_only, settings, app):
    client = setup
    job = wait_for(client, client.post(JOBS, json=job_request()).get_json()["id"])
    assert job["status"] == "FINISHED"
    for _ in range(3):
        assert client.get(f"{JOBS}/{job['id']}").status_code == 200  # the pool holds connections now
        assert cut_every_connection_but_ours(settings) >= 1
        for path in (f"{JOBS}/{job['id']}", f"{JOBS}/{job['id']}/status", JOBS, "/ai-ml-model-training/v1/featureGroup"):
            answer = client.get(path)
            assert answer.status_code == 200, (path, answer.get_json())
    # The workers lost their connections too (the listener's, the watchers'): new work is still taken. After the
    # second a pooled connection waits before it is pinged, the write finds a new one.
    cut_every_connection_but_ours(settings)
    time.sleep(PING_AFTER_IDLE_SECONDS + 0.2)
    again = wait_for(client, client.post(JOBS, json=job_request()).get_json()["id"])
    assert again["status"] == "FINISHED"


def test_a_write_on_a_cut_connection_is_not_repeated(client, pg_only, settings):
    """A write is not tried twice (it may have been done): on a connection cut since its last use a moment ago,
    its answer is the 503 of an unavailable database, and the next try works."""
    assert client.get("/ai-ml-model-training/v1/featureGroup").status_code == 200
    cut_every_connection_but_ours(settings)
    body = {"featuregroup_name": "after_cut", "feature_list": "a", "datalake_source": "CsvSource",
            "measurement": "cell_kpis.csv", "enable_dme": False}
    first = client.post("/ai-ml-model-training/v1/featureGroup", json=body)
    assert first.status_code == 503 and first.headers["Retry-After"] == "5", first.get_json()
    second = client.post("/ai-ml-model-training/v1/featureGroup", json=body)
    assert second.status_code == 201, second.get_json()


def test_a_connection_idle_for_a_while_is_pinged_so_a_write_finds_a_new_one(client, pg_only, settings):
    assert client.get("/ai-ml-model-training/v1/featureGroup").status_code == 200
    cut_every_connection_but_ours(settings)
    time.sleep(PING_AFTER_IDLE_SECONDS + 0.2)
    body = {"featuregroup_name": "after_idle", "feature_list": "a", "datalake_source": "CsvSource",
            "measurement": "cell_kpis.csv", "enable_dme": False}
    answer = client.post("/ai-ml-model-training/v1/featureGroup", json=body)
    assert answer.status_code == 201, answer.get_json()
