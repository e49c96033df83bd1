"""A job's history (GET .../training-jobs/{id}/events) and its steps' times, written by the state machine in the
transaction of each change."""
from __future__ import annotations

import time
from datetime import datetime

import pytest
from sqlalchemy import func, select

from tests.test_training_lifecycle import (JOBS, failing_pipeline, job_request, rapp, setup,  # noqa: F401
                                          upload, wait_for)
from trainingmgr.extensions import db
from trainingmgr.models import JobEvent, TrainingJob
from trainingmgr.models import lifecycle as lc
from trainingmgr.models.lifecycle import JobStateMachine

STEPS = list(lc.STEPS)


def events_of(client, job_id: int, limit: int = 100) -> list[dict]:
    """Every event, page after page through the Link header."""
    collected, url = [], f"{JOBS}/{job_id}/events?limit={limit}"
    while url:
        answer = client.get(url)
        assert answer.status_code == 200, answer.get_json()
        collected += answer.get_json()
        link = answer.headers.get("Link")
        url = link[1:link.index(">")] if link else None
    return collected


def test_a_finished_job_tells_its_whole_history_and_its_steps_times(setup, worker):
    client = setup
    job = wait_for(client, client.post(JOBS, json=job_request()).get_json()["id"])
    assert job["status"] == "FINISHED"
    events = events_of(client, job["id"], limit=3)
    assert [e["seq"] for e in events] == list(range(1, 11))
    assert (events[0]["step"], events[0]["from"], events[0]["to"], events[0]["reason"]) == (None, None, "NOT_STARTED",
                                                                                            "created")
    moves = [(e["step"], e["from"], e["to"]) for e in events[1:]]
    assert moves == [
        ("DATA_EXTRACTION", "NOT_STARTED", "IN_PROGRESS"), ("DATA_EXTRACTION", "IN_PROGRESS", "FINISHED"),
        ("DATA_EXTRACTION_AND_TRAINING", "NOT_STARTED", "IN_PROGRESS"),
        ("DATA_EXTRACTION_AND_TRAINING", "IN_PROGRESS", "FINISHED"),
        ("TRAINING", "NOT_STARTED", "IN_PROGRESS"), ("TRAINING", "IN_PROGRESS", "FINISHED"),
        ("TRAINING_AND_TRAINED_MODEL", "NOT_STARTED", "IN_PROGRESS"),
        ("TRAINING_AND_TRAINED_MODEL", "IN_PROGRESS", "FINISHED"), ("TRAINED_MODEL", "NOT_STARTED", "FINISHED")]
    times = [datetime.fromisoformat(e["time"]) for e in events]
    assert times == sorted(times) and len({e["id"] for e in events}) == len(events)
    # The steps' times are those of their events; the job's span covers them.
    steps = job["steps"]
    assert [s["name"] for s in steps] == STEPS and all(s["state"] == "FINISHED" for s in steps)
    by_change = {(e["step"], e["to"]): e["time"] for e in events}
    for step in steps:
        start = by_change.get((step["name"], "IN_PROGRESS"), by_change[(step["name"], "FINISHED")])
        assert (step["started_at"], step["finished_at"]) == (start, by_change[(step["name"], "FINISHED")])
        assert step["duration_seconds"] == pytest.approx(
            (datetime.fromisoformat(step["finished_at"]) - datetime.fromisoformat(step["started_at"])).total_seconds(),
            abs=0.001)
    assert job["started_at"] == steps[0]["started_at"] and job["finished_at"] == steps[-1]["finished_at"]
    training = next(s for s in steps if s["name"] == "TRAINING")
    assert training["duration_seconds"] > 0.5, "the pipeline run takes its time"
    # steps_state, which the framework's clients read, is as it was.
    assert job["steps_state"] == {step: "FINISHED" for step in STEPS}


def test_steps_stored_before_their_durations_were_kept_still_show_them(setup, worker, app):
    client = setup
    job = wait_for(client, client.post(JOBS, json=job_request()).get_json()["id"])
    assert job["status"] == "FINISHED"
    with app.app_context():
        stored = db.session.get(TrainingJob, job["id"])
        assert all("seconds" in entry for entry in stored.step_times.values()), "kept when a step ends"
        # As a job that ended before this release has them: the start and end times only.
        stored.step_times = {step: {k: v for k, v in entry.items() if k != "seconds"}
                             for step, entry in stored.step_times.items()}
        db.session.commit()
    again = client.get(f"{JOBS}/{job['id']}").get_json()
    assert again["steps"] == job["steps"]
    assert all(step["duration_seconds"] is not None for step in again["steps"])


def test_a_failure_is_an_event_with_its_reason_and_attempt(setup, worker, tmp_path):
    client = setup
    upload(client, "explodes", failing_pipeline(tmp_path))
    job = wait_for(client, client.post(JOBS, json=job_request("bad", pipeline="explodes")).get_json()["id"])
    assert job["status"] == "FAILED" and job["finished_at"]
    last = events_of(client, job["id"])[-1]
    assert (last["step"], last["from"], last["to"]) == ("TRAINING", "IN_PROGRESS", "FAILED")
    assert last["reason"] == job["failure_reason"] and "diverged" in last["reason"]
    assert last["attempt"] >= 1
    training = next(s for s in job["steps"] if s["name"] == "TRAINING")
    assert training["state"] == "FAILED" and training["duration_seconds"] is not None
    later = next(s for s in job["steps"] if s["name"] == "TRAINED_MODEL")
    assert (later["started_at"], later["finished_at"], later["duration_seconds"]) == (None, None, None)


def test_a_new_job_has_its_creation_and_nothing_else(client):
    from tests.factories import create_file_feature_group, upload_pipeline
    from tests.test_training_lifecycle import FEATURES, RETRAINING_YAML, TRAINING_YAML

    create_file_feature_group(client, "cell_kpis", measurement="cell_kpis.csv", feature_list=FEATURES)
    upload_pipeline(client, "qoe_training", TRAINING_YAML)
    upload_pipeline(client, "qoe_retraining", RETRAINING_YAML)
    job = client.post(JOBS, json=job_request()).get_json()  # no worker: nothing moves
    assert [(e["seq"], e["to"]) for e in events_of(client, job["id"])] == [(1, "NOT_STARTED")]
    assert job["started_at"] is None and job["finished_at"] is None
    assert all(s["started_at"] is None and s["duration_seconds"] is None for s in job["steps"])


def test_an_event_is_written_only_with_its_change(setup, app):
    """The event and the change share a transaction: a change that rolls back leaves no event."""
    client = setup
    job_id = client.post(JOBS, json=job_request()).get_json()["id"]
    with app.app_context():
        job = db.session.get(TrainingJob, job_id)
        JobStateMachine(db.session).move(job, (lc.DATA_EXTRACTION, lc.IN_PROGRESS))
        db.session.rollback()
        assert db.session.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id == job_id)) == 1
        job = db.session.get(TrainingJob, job_id)
        assert job.event_count == 1 and job.steps_state[lc.DATA_EXTRACTION] == lc.NOT_STARTED
        JobStateMachine(db.session).move(job, (lc.DATA_EXTRACTION, lc.IN_PROGRESS))
        db.session.commit()
    assert [e["seq"] for e in events_of(client, job_id)] == [1, 2]


def test_deleting_a_job_deletes_its_history(setup, app):
    client = setup
    job_id = client.post(JOBS, json=job_request()).get_json()["id"]
    assert client.delete(f"{JOBS}/{job_id}").status_code == 204
    assert client.get(f"{JOBS}/{job_id}/events").status_code == 404
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id == job_id)) == 0


@pytest.mark.parametrize("path,status", [("abc/events", 400), ("99999/events", 404), ("1" * 25 + "/events", 404),
                                         ("1/events?limit=0", 400), ("1/events?cursor=%%%", 400)])
def test_bad_event_requests(client, path, status):
    answer = client.get(f"{JOBS}/{path}")
    assert answer.status_code == status, answer.get_json()
    assert answer.mimetype == "application/problem+json"


# ---------------------------------------------------------------------------------------------- cancel
def test_cancel_during_training_stops_the_run_and_keeps_the_job(setup, worker, tmp_path, app, rapp):
    from pathlib import Path

    from tests.test_training_lifecycle import slow_pipeline, wait_for_step

    client = setup
    upload(client, "naps", slow_pipeline(tmp_path, seconds=60))
    job_id = client.post(JOBS, json=job_request("napper", pipeline="naps", notification_url=rapp.url)).get_json()["id"]
    wait_for_step(client, job_id, "TRAINING", "IN_PROGRESS")
    run_id = client.get(f"{JOBS}/{job_id}").get_json()["run_id"]
    run_dir = Path(app.extensions["trainingmgr"].settings.data_path) / "runs" / run_id
    pid = int((run_dir / "pid").read_text())
    answer = client.post(f"{JOBS}/{job_id}/cancel")
    assert answer.status_code == 200, answer.get_json()
    job = answer.get_json()
    assert job["status"] == "CANCELLED" and job["finished_at"]
    assert job["steps_state"]["TRAINING"] == "CANCELLED" and job["steps_state"]["DATA_EXTRACTION"] == "FINISHED"
    assert client.get(f"{JOBS}/{job_id}").get_json()["status"] == "CANCELLED", "the record stays"
    last = events_of(client, job_id)[-1]
    assert (last["step"], last["from"], last["to"], last["reason"]) == ("TRAINING", "IN_PROGRESS", "CANCELLED",
                                                                        "cancelled on request")
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the run's process is stopped"
    deadline = time.monotonic() + 30  # the rApp hears of the end like of any other
    while not any(b.get("TRAINING") == "CANCELLED" for b in rapp.bodies()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any(b.get("TRAINING") == "CANCELLED" for b in rapp.bodies()), rapp.bodies()
    time.sleep(0.5)  # no step of the job runs any more: nothing moves it
    assert client.get(f"{JOBS}/{job_id}").get_json()["steps_state"]["TRAINING"] == "CANCELLED"
    again = client.post(f"{JOBS}/{job_id}/cancel")
    assert again.status_code == 409 and "ended already" in again.get_json()["detail"]
    assert client.delete(f"{JOBS}/{job_id}").status_code == 204


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (ended, not reaped yet) counts as stopped
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_cancel_before_anything_ran_and_after_the_end(setup, worker):
    client = setup
    job_id = client.post(JOBS, json=job_request()).get_json()["id"]
    # Whatever it reached, it is CANCELLED now or it had FINISHED (a fast machine): then cancel is a 409.
    answer = client.post(f"{JOBS}/{job_id}/cancel")
    if answer.status_code == 409:
        assert client.get(f"{JOBS}/{job_id}").get_json()["status"] == "FINISHED"
    else:
        assert answer.get_json()["status"] == "CANCELLED"
    done = wait_for(client, client.post(JOBS, json=job_request()).get_json()["id"])
    assert client.post(f"{JOBS}/{done['id']}/cancel").status_code == 409
    assert client.post(f"{JOBS}/999999/cancel").status_code == 404


def test_a_job_not_started_is_cancelled_at_its_first_step(setup):
    client = setup  # no worker: nothing moves by itself
    job_id = client.post(JOBS, json=job_request()).get_json()["id"]
    job = client.post(f"{JOBS}/{job_id}/cancel").get_json()
    assert job["status"] == "CANCELLED" and job["steps_state"]["DATA_EXTRACTION"] == "CANCELLED"
    assert [e["to"] for e in events_of(client, job_id)] == ["NOT_STARTED", "CANCELLED"]


def test_a_run_that_starts_while_the_job_is_cancelled_is_stopped(setup, app, monkeypatch):
    """The race: the job is cancelled just before a worker starts its run, so the cancel finds no run to stop; the
    worker stops the run it started once it sees the job ended."""
    from pathlib import Path

    client = setup
    engine = app.extensions["trainingmgr"].engine
    started, terminated = [], []
    start_run, terminate = engine.start_run, engine.terminate

    def cancelled_then_started(run_id, *args, **kwargs):
        assert client.post(f"{JOBS}/{job_id}/cancel").status_code == 200
        start_run(run_id, *args, **kwargs)
        started.append(run_id)

    monkeypatch.setattr(engine, "start_run", cancelled_then_started)
    monkeypatch.setattr(engine, "terminate", lambda run_id: (terminated.append(run_id), terminate(run_id)))
    job_id = client.post(JOBS, json=job_request()).get_json()["id"]
    app.extensions["trainingmgr"].start_worker(app)
    deadline = time.monotonic() + 60
    while not (started and terminated.count(started[0]) >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started and terminated.count(started[0]) == 2, (started, terminated)  # the cancel's, then the worker's
    pid_file = Path(app.extensions["trainingmgr"].settings.data_path) / "runs" / started[0] / "pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid)
    job = client.get(f"{JOBS}/{job_id}").get_json()
    assert job["status"] == "CANCELLED" and job["steps_state"]["TRAINING"] == "NOT_STARTED"


def test_a_worker_that_read_the_job_before_a_cancel_does_not_undo_it(setup, app):
    """A worker step loaded the job, then the job was cancelled (another transaction) while the step asked the
    pipeline engine: the step's change is refused and the job stays CANCELLED."""
    from sqlalchemy.orm import Session

    client = setup
    job_id = client.post(JOBS, json=job_request()).get_json()["id"]
    with app.app_context():
        engine = db.engine
    # A session of its own, outside the requests' app contexts, as a worker thread has.
    with Session(engine, expire_on_commit=False) as worker_session:
        job = worker_session.get(TrainingJob, job_id)  # the step's view, from before the cancel
        assert job.status == lc.NOT_STARTED
        worker_session.commit()  # (a step commits between its reads and its change: SQLite's lock is free)
        assert client.post(f"{JOBS}/{job_id}/cancel").status_code == 200
        with pytest.raises(lc.InvalidTransition, match="ended meanwhile"):
            JobStateMachine(worker_session).move(job, (lc.DATA_EXTRACTION, lc.IN_PROGRESS))
        worker_session.rollback()
    answer = client.get(f"{JOBS}/{job_id}").get_json()
    assert answer["status"] == "CANCELLED" and answer["steps_state"]["DATA_EXTRACTION"] == "CANCELLED"
