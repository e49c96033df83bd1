"""Benchmark: POST to FINISHED for the bundled example pipeline, and the service's own overhead.

Runs the service in-process (create_app + the embedded worker, SQLite in a temporary folder, or
--database-url) and drives it through HTTP with Flask's test client. After one job alone (a service that has
run a job: its SQL is compiled; that job's overhead is printed too), for 1 and for 10 concurrent jobs it prints,
per job:
  total    = POST answered -> status FINISHED seen by the client
  pipeline = the pipeline's own time: kfp.local's first line in the run's log ("Running pipeline") -> the run's
             result written; the end is the engine's record (result.json's time), not the moment the service looked
  overhead = total - pipeline: extraction, queueing, starting the run's process (issue 12: runner start-up counts
             here), noticing the end, zipping and storing the model.
  runner start-up = the run started (its process spawned) -> kfp.local's first line (Python, kfp's import, the
             pipeline file loaded): issue 12's "run start" target is < 100 ms.
  after the end = the run's result written -> the job FINISHED (docs/performance.md: within 1 s for 10 runs).
Usage: python bench/lifecycle_bench.py [--jobs 1,10] [--database-url URL] [--log-level DEBUG]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainingmgr import create_app  # noqa: E402
from trainingmgr.config import Settings  # noqa: E402
from trainingmgr.extensions import db  # noqa: E402
from trainingmgr.models import JobLog, TrainingJob  # noqa: E402
from trainingmgr.schema import upgrade  # noqa: E402

JOBS = "/ai-ml-model-training/v1/training-jobs"
FIRST_LINE = re.compile(rb"^(\d\d:\d\d:\d\d\.\d{3}) - INFO - Running pipeline", re.M)


def setup(client) -> None:
    fg = {
        "featuregroup_name": "bench_kpis", "feature_list": "prbUsageDl,prbUsageUl,activeUes,sinrMean,throughputDl",
        "datalake_source": "CsvSource", "measurement": "cell_kpis.csv", "enable_dme": False,
    }
    assert client.post("/ai-ml-model-training/v1/featureGroup", json=fg).status_code == 201
    for name in ("qoe_training", "qoe_retraining"):
        data = (ROOT / "examples" / "pipelines" / f"{name}.yaml").read_bytes()
        r = client.post(f"/pipelines/{name}/upload", data={"file": (io.BytesIO(data), f"{name}.yaml")},
                        content_type="multipart/form-data")
        assert r.status_code == 200, r.get_json()


def body(model: str) -> dict:
    return {
        "model_id": {"modelname": model, "modelversion": "1"},
        "training_config": {
            "description": "bench",
            "dataPipeline": {"feature_group_name": "bench_kpis", "query_filter": "", "arguments": {"epochs": "2"}},
            "trainingPipeline": {"pipeline_name": "qoe_training", "pipeline_version": "1",
                                 "retraining_pipeline_name": "qoe_retraining", "retraining_pipeline_version": "1"},
        },
    }


def pipeline_started(log: bytes, run_started_at: datetime) -> datetime:
    """The time of kfp.local's first line in the run's kept log ("HH:MM:SS.mmm - INFO - Running pipeline ..."),
    on the day the run started (kfp.local prints local time; the bench runs in UTC like the service's clock)."""
    match = FIRST_LINE.search(log)
    if match is None:
        raise SystemExit(f"no 'Running pipeline' line in the run's log: {log[:300]!r}")
    clock = datetime.strptime(match.group(1).decode(), "%H:%M:%S.%f").time()
    moment = datetime.combine(run_started_at.date(), clock, tzinfo=timezone.utc)
    return moment if moment >= run_started_at - timedelta(hours=12) else moment + timedelta(days=1)


def wait_for_warm_runner(app, seconds: float = 60.0) -> None:
    """A service that ran a job in the last 15 minutes has its fork server ready (it starts with the first run and
    imports kfp once, in seconds): the steady state is measured."""
    launcher = getattr(app.extensions["trainingmgr"].engine, "launcher", None)
    if launcher is not None:
        launcher.start()
    deadline = time.monotonic() + seconds
    while launcher is not None and not Path(launcher.socket_path or "/nonexistent").exists():
        if time.monotonic() > deadline:
            print("the warm runner was not ready: runs start cold")
            return
        time.sleep(0.05)


def one_job(app, model: str) -> tuple[int, float]:
    client = app.test_client()
    started = time.perf_counter()
    job = client.post(JOBS, json=body(model)).get_json()
    while True:
        state = client.get(f"{JOBS}/{job['id']}").get_json()["status"]
        if state in ("FINISHED", "FAILED"):
            break
        time.sleep(0.01)
    assert state == "FINISHED", client.get(f"{JOBS}/{job['id']}").get_json()
    return job["id"], time.perf_counter() - started


def run(concurrency: int, database_url: str | None, log_level: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=tmp, database_url=database_url or "", secret_key="bench",
                            log_level=log_level,
                            max_concurrent_runs=max(4, concurrency), worker_threads=max(4, concurrency),
                            worker_poll_seconds=0.05)
        app = create_app(settings)
        upgrade(app)
        setup(app.test_client())
        app.extensions["trainingmgr"].start_worker(app)
        wait_for_warm_runner(app)
        try:
            # A service that has run a job before: its statements are compiled (SQLAlchemy caches them per
            # engine), as in any process that has served a while. The first job's overhead is printed apart.
            first_id, first_total = one_job(app, f"bench_{concurrency}_first")
            with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
                results = list(pool.map(lambda i: one_job(app, f"bench_{concurrency}_{i}"), range(concurrency)))
        finally:
            app.extensions["trainingmgr"].stop_worker()
        with app.app_context():
            jobs = {j.id: j for j in db.session.scalars(select(TrainingJob))}
            logs = {log.job_id: log.content for log in db.session.scalars(select(JobLog))}

            def pipeline_seconds(job_id: int) -> tuple[float, float]:
                """The runner's start-up and the pipeline's own time."""
                job = jobs[job_id]
                first_line = pipeline_started(logs.get(job_id, b""), job.run_started_at)
                return ((first_line - job.run_started_at).total_seconds(),
                        (job.run_ended_at - first_line).total_seconds())

            first_overhead = first_total - pipeline_seconds(first_id)[1]
            totals, pipelines, overheads, before, startups, after = [], [], [], [], [], []
            for job_id, total in results:
                job = jobs[job_id]
                startup, pipeline = pipeline_seconds(job_id)
                totals.append(total)
                pipelines.append(pipeline)
                startups.append(startup)
                overheads.append(total - pipeline)
                before.append((job.run_started_at - job.created_at).total_seconds())
                after.append((job.finished_at - job.run_ended_at).total_seconds())
            ends = [jobs[j].finished_at for j, _ in results]
            spread = (max(ends) - min(ends)).total_seconds()
    ms = lambda xs: f"median {statistics.median(xs) * 1000:7.0f} ms  max {max(xs) * 1000:7.0f} ms"  # noqa: E731
    print(f"{concurrency:2d} concurrent job(s), after one job alone (its overhead, with nothing compiled yet: "
          f"{first_overhead * 1000:.0f} ms)")
    print(f"   POST -> FINISHED : {ms(totals)}")
    print(f"   pipeline run     : {ms(pipelines)}")
    print(f"   service overhead : {ms(overheads)}")
    print(f"     of which before the run (extraction, queue, start): {ms(before)}")
    print(f"     of which the runner's start-up (to kfp.local's first line): {ms(startups)}")
    print(f"     of which after the run ended (noticed, model zipped and stored): {ms(after)}")
    if concurrency > 1:
        print(f"   FINISHED spread  : {spread * 1000:.0f} ms between the first and the last job (runs end at different "
              "times: they share the CPUs)")
    late = [a for a in after if a > 1.0]
    print(f"   target: every job FINISHED within 1 s of its run's end: {len(after) - len(late)} of {len(after)} "
          f"(slowest {max(after) * 1000:.0f} ms)")
    return {"jobs": concurrency, "overhead_median_ms": statistics.median(overheads) * 1000,
            "first_job_overhead_ms": first_overhead * 1000,
            "startup_median_ms": statistics.median(startups) * 1000, "startup_max_ms": max(startups) * 1000,
            "finished_within_1s": len(after) - len(late), "after_max_ms": max(after) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", default="1,10", help="comma-separated concurrency levels")
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temporary folder")
    parser.add_argument("--log-level", default="WARNING", help="the service's log level (DEBUG shows each step's time)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    figures = [run(level, args.database_url, args.log_level) for level in (int(x) for x in args.jobs.split(","))]
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
