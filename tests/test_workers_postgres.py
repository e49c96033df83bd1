"""Several worker processes share one PostgreSQL: each step is done exactly once, and a killed worker's steps
are taken over when its leases expire. Real processes (`trainingmgr worker`), real kfp.local runs.
"""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.peers import RAppReceiver
from tests.processes import stop as stop_process
from tests.test_training_lifecycle import JOBS, job_request, setup, slow_pipeline, upload, wait_for  # noqa: F401

N_JOBS = 6


def start_workers(settings, count: int, tmp_path: Path, lease: int = 3,
                  log_level: str = "INFO") -> list[subprocess.Popen]:
    """Start `count` worker processes and wait until each has said "worker started" (adapters built)."""
    env = {
        **os.environ,
        "TM_DATABASE_URL": settings.database_url,
        "TM_DATA_DIR": settings.data_dir,  # one data folder: runs, datasets and models are shared
        "TM_SECRET_KEY": settings.secret_key,
        "TM_OUTBOUND_ALLOW": settings.outbound_allow,  # the rApp receivers are local servers
        "TM_WORKER_THREADS": "3",
        "TM_WORKER_POLL_SECONDS": "0.05",
        "TM_LEASE_SECONDS": str(lease),
        "TM_LOG_LEVEL": log_level,
    }
    processes = []
    for _ in range(count):
        # Output goes to a file: a pipe nobody reads while the test waits could fill up and stall the worker.
        log_file = tempfile.NamedTemporaryFile("w+", dir=tmp_path, prefix="worker-", suffix=".log", delete=False)
        p = subprocess.Popen([sys.executable, "-m", "trainingmgr", "worker"], env=env, cwd=tmp_path,
                             stdout=log_file, stderr=subprocess.STDOUT, text=True)
        p.log_path = Path(log_file.name)
        processes.append(p)
    try:
        deadline = time.monotonic() + 120
        while not all('"worker started"' in p.log_path.read_text() for p in processes):
            assert all(p.poll() is None for p in processes), [p.log_path.read_text() for p in processes]
            assert time.monotonic() < deadline, "the workers did not start within 120 s"
            time.sleep(0.1)
    except BaseException:
        stop(processes)
        raise
    return processes


def stop(processes: list[subprocess.Popen]) -> list[str]:
    outputs = []
    for p in processes:
        stop_process(p)
        outputs.append(p.log_path.read_text())
    return outputs


def test_two_worker_processes_do_each_job_exactly_once(pg_only, setup, settings, tmp_path):
    client = setup
    rapp = RAppReceiver().start()
    workers = start_workers(settings, 2, tmp_path, log_level="DEBUG")
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
    # Both processes were up before the first job was posted, and a job is many steps (extract, start, several
    # watches, store, five notifications): both take a share.
    steps = [len(re.findall('"message": "step executed"', out)) for out in outputs]
    assert all(steps), f"both workers took work: {steps} steps"
    # Every step's notification went out once: 5 per job, no duplicate.
    assert len(rapp.requests) == 5 * N_JOBS
    delivery_ids = [r.headers["X-TM-Delivery-Id"] for r in rapp.requests]
    assert len(set(delivery_ids)) == len(delivery_ids)


def test_a_killed_workers_steps_are_taken_over(pg_only, setup, settings, tmp_path):
    client = setup
    upload(client, "naps", slow_pipeline(tmp_path, seconds=3))
    first = start_workers(settings, 1, tmp_path, lease=2)
    try:
        job = client.post(JOBS, json=job_request("orphan", pipeline="naps")).get_json()
        deadline = time.monotonic() + 60
        while client.get(f"{JOBS}/{job['id']}/status").get_json()["TRAINING"] != "IN_PROGRESS":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first[0].send_signal(signal.SIGKILL)  # dies holding its leases
    finally:
        stop(first)
    second = start_workers(settings, 1, tmp_path, lease=2)
    try:
        done = wait_for(client, job["id"], timeout=60)
    finally:
        stop(second)
    assert done["status"] == "FINISHED", done
