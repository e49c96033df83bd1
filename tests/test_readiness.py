"""/readyz checks every configured component; /metrics counts jobs, pending steps and requests."""
import os
import sys

import pytest
from sqlalchemy import select

from tests.processes import started, until
from tests.test_serve import free_port
from tests.test_training_lifecycle import setup  # noqa: F401  (fixture)
from trainingmgr import create_app


def test_ready_lists_every_component(client, worker):
    body = client.get("/readyz").get_json()
    assert body == {"status": "ready", "checks": {"database": "ok", "step_runner": "ok", "object_store": "ok",
                                                  "pipeline_engine": "ok", "data_extraction": "ok"}}


def test_no_step_runner_alive_is_not_ready_where_serve_keeps_one(client):
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["checks"]["step_runner"] == "none alive" and body["checks"]["database"] == "ok"
    assert body["detail"] == "Not ready: step_runner none alive"


def test_with_separate_workers_no_step_runner_alive_is_said_but_ready(build_app):
    response = build_app(embedded_worker=False).test_client().get("/readyz")
    assert response.status_code == 200 and response.get_json()["checks"]["step_runner"] == "none alive"


def test_a_step_runner_of_another_process_counts_while_it_lives(build_app, settings, tmp_path):
    """`trainingmgr worker` in a process of its own, on the test's database: seen from here (a session of its
    name in pg_stat_activity; its pipe beside the SQLite file) as long as it lives, also when it is killed."""
    client = build_app().test_client()
    env = {**os.environ, "TM_DATABASE_URL": settings.database_url, "TM_DATA_DIR": str(tmp_path / "worker"),
           "TM_SECRET_KEY": settings.secret_key, "TM_LOG_LEVEL": "WARNING"}
    with started([sys.executable, "-m", "trainingmgr", "worker"], log_path=tmp_path / "worker.log",
                 env=env) as process:
        assert until(lambda: process.poll() is not None or client.get("/readyz").status_code == 200, 90)
        assert process.poll() is None, (tmp_path / "worker.log").read_text()
        process.kill()
        process.wait(30)
        assert until(lambda: client.get("/readyz").status_code == 503, 60)
    assert client.get("/readyz").get_json()["checks"]["step_runner"] == "none alive"


def test_an_unreachable_object_store_makes_the_service_not_ready(settings):
    app = create_app(settings.replace(object_store="s3", s3_endpoint=f"127.0.0.1:{free_port()}", http_timeout=1.0))
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["checks"]["object_store"] == "unreachable" and body["checks"]["database"] == "ok"
    assert "object_store" in body["detail"]


def test_metrics_count_jobs_steps_and_requests(setup_job_client):
    client, job_id = setup_job_client
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    text = response.get_data(as_text=True)
    assert 'trainingmgr_training_jobs{status="NOT_STARTED"} 1.0' in text
    assert 'trainingmgr_training_jobs{status="FINISHED"} 0.0' in text
    assert 'trainingmgr_pending_steps{kind="extract"} 1.0' in text
    assert 'trainingmgr_step_queue_delay_seconds{kind="start_run"} 0.0' in text  # none waiting
    assert 'trainingmgr_http_requests_total{endpoint="training_jobs.create_training_job",method="POST",status="201"} 1.0' \
        in text
    client.get(f"/ai-ml-model-training/v1/training-jobs/{job_id + 1000}")
    assert 'endpoint="training_jobs.get_training_job",method="GET",status="404"} 1.0' in \
        client.get("/metrics").get_data(as_text=True)


def test_metrics_show_how_long_due_steps_wait_for_a_worker(setup_job_client, app):
    """No worker runs here: the job's extraction step is due and waits; once a worker holds it, it no longer counts."""
    from datetime import timedelta

    from trainingmgr.extensions import db
    from trainingmgr.models import WorkItem
    from trainingmgr.models.base import utcnow

    client, job_id = setup_job_client
    with app.app_context():
        item = db.session.scalars(select(WorkItem).where(WorkItem.job_id == job_id)).one()
        item_id = item.id
        item.due_at = utcnow() - timedelta(seconds=90)
        db.session.commit()
    assert 90 <= _gauge(client, "trainingmgr_step_queue_delay_seconds", "extract") < 200
    with app.app_context():
        item = db.session.get(WorkItem, item_id)
        item.lease_owner, item.lease_until = "worker-1", utcnow() + timedelta(seconds=30)
        db.session.commit()
    assert _gauge(client, "trainingmgr_step_queue_delay_seconds", "extract") == 0.0


def _gauge(client, name: str, kind: str) -> float:
    for line in client.get("/metrics").get_data(as_text=True).splitlines():
        if line.startswith(f'{name}{{kind="{kind}"}} '):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{{kind={kind!r}}} not in /metrics")


@pytest.fixture
def setup_job_client(setup):
    from tests.test_training_lifecycle import JOBS, job_request

    job = setup.post(JOBS, json=job_request())
    assert job.status_code == 201
    return setup, job.get_json()["id"]
