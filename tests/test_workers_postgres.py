"""Several worker processes share one PostgreSQL: each step is done exactly once, and a killed worker's steps
are taken over when its leases expire. Real processes (`trainingmgr worker`), real kfp.local runs.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.peers import RAppReceiver
from tests.test_training_lifecycle import JOBS, job_request, setup, slow_pipeline, upload, wait_for  # noqa: F401

N_JOBS = 6


@pytest.fixture
def pg_only(backend):
    if backend != "postgresql":
        pytest.skip("worker processes sharing a database: a PostgreSQL test")


def start_workers(settings, count: int, tmp_path: Path, lease: int = 3) -> list[subprocess.Popen]:
    env = {
        **os.environ,
        "TM_DATABASE_URL": settings.database_url,
        "TM_DATA_DIR": settings.data_dir,  # one data folder: runs, datasets and models are shared
        "TM_SECRET_KEY": settings.secret_key,
        "TM_WORKER_THREADS": "3",
        "TM_WORKER_POLL_SECONDS": "0.05",
        "TM_LEASE_SECONDS": str(lease),
        "TM_LOG_LEVEL": "INFO",
    }
    return [
        subprocess.Popen([sys.executable, "-m", "trainingmgr", "worker"], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(count)
    ]


def stop(processes: list[subprocess.Popen]) -> list[str]:
    outputs = []
    for p in processes:
        if p.poll() is None:
            p.terminate()
        out, _ = p.communicate(timeout=30)
        outputs.append(out)
    return outputs


def test_two_worker_processes_do_each_job_exactly_once(pg_only, setup, settings, tmp_path):
    client = setup
    rapp = RAppReceiver().start()
    workers = start_workers(settings, 2, tmp_path)
    try:
        jobs = [client.post(JOBS, json=job_request(f"shared_{i}", notification_url=rapp.url)).get_json()
                for i in range(N_JOBS)]
        done = [wait_for(client, job["id"], timeout=120) for job in jobs]
        deadline = time.monotonic() + 15
        while len(rapp.requests) < 5 * N_JOBS and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        outputs = stop(workers)
        rapp.stop()
    assert [job["status"] for job in done] == ["FINISHED"] * N_JOBS
    started = [m for out in outputs for m in re.findall(r'"message": "pipeline run started".*?"trainingjob_id": (\d+)', out)]
    assert sorted(map(int, started)) == sorted(job["id"] for job in jobs), "each job's run started exactly once"
    assert all(started_in for started_in in (re.findall("pipeline run started", out) for out in outputs)), \
        "both workers took work"
    # Every step's notification went out once: 5 per job, no duplicate.
    assert len(rapp.requests) == 5 * N_JOBS
    delivery_ids = [r.headers["X-TM-Delivery-Id"] for r in rapp.requests]
    assert len(set(delivery_ids)) == len(delivery_ids)


def test_a_killed_workers_steps_are_taken_over(pg_only, setup, settings, tmp_path):
    client = setup
    upload(client, "naps", slow_pipeline(tmp_path, seconds=3))
    first = start_workers(settings, 1, tmp_path, lease=2)
    job = client.post(JOBS, json=job_request("orphan", pipeline="naps")).get_json()
    deadline = time.monotonic() + 60
    while client.get(f"{JOBS}/{job['id']}/status").get_json()["TRAINING"] != "IN_PROGRESS":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first[0].send_signal(signal.SIGKILL)  # dies holding its leases
    stop(first)
    second = start_workers(settings, 1, tmp_path, lease=2)
    try:
        done = wait_for(client, job["id"], timeout=60)
    finally:
        stop(second)
    assert done["status"] == "FINISHED", done
