"""Runs of a job: the run id names its job, and run_ended_at is the engine's record of the end, kept between the
run's start and now."""
from datetime import datetime, timedelta, timezone

from trainingmgr.adapters.base import RunStatus
from trainingmgr.workers.steps import _run_end

START = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


def test_the_engines_end_time_is_kept():
    ended = START + timedelta(seconds=42)
    assert _run_end(RunStatus("SUCCEEDED", ended_at=ended), START) == ended


def test_an_unknown_end_is_now():
    before = datetime.now(timezone.utc)
    assert before <= _run_end(RunStatus("FAILED", error="x"), START) <= datetime.now(timezone.utc)


def test_another_clock_cannot_put_the_end_before_the_start_or_in_the_future():
    assert _run_end(RunStatus("SUCCEEDED", ended_at=START - timedelta(days=700)), START) == START
    far = datetime.now(timezone.utc) + timedelta(hours=1)
    assert _run_end(RunStatus("SUCCEEDED", ended_at=far), START) <= datetime.now(timezone.utc)


def test_a_run_id_names_its_job():
    from trainingmgr.workers.steps import job_id_of_run, new_run_id

    assert job_id_of_run(new_run_id(4711)) == 4711
    assert job_id_of_run("run-ok_1") is None and job_id_of_run("tj12-notahex!") is None
