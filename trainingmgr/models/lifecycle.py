"""A training job's state machine: the one module that owns the job's states, the step order, the pipeline run's
state vocabulary, which work kind drives which step, and the only code that changes a job's state.

Steps run in order; each is NOT_STARTED, IN_PROGRESS, FINISHED, FAILED or CANCELLED, and only ever moves forward.
The overall status is derived from the steps (any FAILED -> FAILED; any CANCELLED -> CANCELLED; all FINISHED ->
FINISHED; anything started -> IN_PROGRESS; else NOT_STARTED) and stored beside them so lists can filter on it. A
job that is FINISHED, FAILED or CANCELLED has ended: nothing of it moves any more.

JobStateMachine.move is where steps change: it derives the status, and queues the rApp's notification in the same
transaction (so a notification is never lost nor sent for a change that rolled back).
"""
from __future__ import annotations

import enum
import json
import logging
import uuid
from datetime import datetime
from typing import Mapping

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .base import utcnow
from .training_job import JobEvent, TrainingJob
from .work_queue import EXTRACT, NOTIFY, START_RUN, WATCH_RUN, WorkQueue

log = logging.getLogger(__name__)

DATA_EXTRACTION = "DATA_EXTRACTION"
DATA_EXTRACTION_AND_TRAINING = "DATA_EXTRACTION_AND_TRAINING"
TRAINING = "TRAINING"
TRAINING_AND_TRAINED_MODEL = "TRAINING_AND_TRAINED_MODEL"
TRAINED_MODEL = "TRAINED_MODEL"
STEPS = (DATA_EXTRACTION, DATA_EXTRACTION_AND_TRAINING, TRAINING, TRAINING_AND_TRAINED_MODEL, TRAINED_MODEL)

NOT_STARTED = "NOT_STARTED"
IN_PROGRESS = "IN_PROGRESS"
FINISHED = "FINISHED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
ENDED = frozenset({FINISHED, FAILED, CANCELLED})  # a job's statuses (and a step's states) that are final
_RANK = {NOT_STARTED: 0, IN_PROGRESS: 1, FINISHED: 2, FAILED: 2, CANCELLED: 2}

# The step each kind of work drives (notifications drive none): an extract step moves DATA_EXTRACTION, a start_run
# step DATA_EXTRACTION_AND_TRAINING, a watch_run step TRAINING and then the model's steps.
WORK_KIND_STEP = {EXTRACT: DATA_EXTRACTION, START_RUN: DATA_EXTRACTION_AND_TRAINING, WATCH_RUN: TRAINING,
                  NOTIFY: None}


class RunState(str, enum.Enum):
    """Where a pipeline run is, in the service's words; run_state() reads an engine's or a callback's word."""

    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


# The words that end a run (KFP's, wire-compat: SUCCEEDED is success; these are failures; anything else, PENDING,
# RUNNING, CANCELING, PAUSED ..., is still running); the local engine says SUCCEEDED or FAILED.
_FAILED_RUN_WORDS = frozenset({"FAILED", "ERROR", "SKIPPED", "TERMINATED", "CANCELED", "CANCELLED"})


def run_state(word: str) -> RunState:
    word = word.strip().upper()
    if word == RunState.SUCCEEDED:
        return RunState.SUCCEEDED
    if word in _FAILED_RUN_WORDS:
        return RunState.FAILED
    return RunState.RUNNING


class InvalidTransition(Exception):
    """A change that would move a step backwards or skip ahead: callers treat it as 'nothing to do'."""


def initial_steps() -> dict[str, str]:
    return {step: NOT_STARTED for step in STEPS}


def ordered(steps: Mapping[str, str]) -> dict[str, str]:
    """The steps in their order (JSON columns do not keep key order on every backend)."""
    return {step: steps.get(step, NOT_STARTED) for step in STEPS}


def step_seconds(started_at: str, ended_at: str) -> float:
    """How long a step took, from its step_times entry's ISO times (milliseconds kept)."""
    return round((datetime.fromisoformat(ended_at) - datetime.fromisoformat(started_at)).total_seconds(), 3)


def step_in_progress(steps: Mapping[str, str]) -> str | None:
    """The step IN_PROGRESS now, if any."""
    return next((step for step in STEPS if steps.get(step, NOT_STARTED) == IN_PROGRESS), None)


def overall_status(steps: Mapping[str, str]) -> str:
    states = [steps.get(step, NOT_STARTED) for step in STEPS]
    if FAILED in states:
        return FAILED
    if CANCELLED in states:
        return CANCELLED
    if all(s == FINISHED for s in states):
        return FINISHED
    if any(s != NOT_STARTED for s in states):
        return IN_PROGRESS
    return NOT_STARTED


def advance(steps: Mapping[str, str], step: str, state: str) -> dict[str, str]:
    """A copy of `steps` with `step` moved to `state`, or InvalidTransition if that is not forward.

    The steps before `step` must be FINISHED (a step cannot start before its predecessor ended), except that any
    step may fail or be cancelled.
    """
    current = ordered(steps)
    status = overall_status(current)
    if status in (FAILED, CANCELLED):
        raise InvalidTransition(f"the job has ended ({status}); {step} stays {current[step]}")
    if _RANK[state] <= _RANK[current[step]]:
        raise InvalidTransition(f"{step} is {current[step]} already")
    if state not in (FAILED, CANCELLED):
        before = STEPS[: STEPS.index(step)]
        if any(current[s] != FINISHED for s in before):
            raise InvalidTransition(f"{step} cannot be {state} before the steps ahead of it finished")
    current[step] = state
    return current


def notification_body(steps_state: Mapping[str, str]) -> str:
    """The rApp's body, as the reference sent it: every step, in step order, serialised to a JSON string (sent as a
    JSON string literal)."""
    return json.dumps(ordered(steps_state))


class JobStateMachine:
    """The only place a job's steps (and so its status) change. Every change writes its event (the job's history)
    and the steps' times in the same transaction."""

    def __init__(self, session: Session):
        self.session = session
        self.queue = WorkQueue(session)

    def created(self, job: TrainingJob) -> None:
        """The job's first event (the job must have its id: flushed)."""
        self._record(job, None, None, NOT_STARTED, utcnow(), reason="created")

    def move(self, job: TrainingJob, *changes: tuple[str, str], notify: bool = True, reason: str | None = None,
             attempt: int | None = None) -> None:
        """Apply (step, state) changes in order; InvalidTransition if one is not forward. `reason` goes with the
        events of the changes (why a step failed ...), `attempt` says which try of the work it was."""
        # The job's row, locked until this transaction ends, as it is now: a change made meanwhile by another
        # transaction (a cancel while a worker asked the pipeline engine) is not overwritten.
        stored = self.session.execute(
            select(TrainingJob.status).where(TrainingJob.id == job.id).with_for_update()
        ).scalar_one_or_none()
        if stored in ENDED and job.status not in ENDED:
            raise InvalidTransition(f"the job has ended meanwhile ({stored})")
        now = utcnow()
        steps = dict(job.steps_state)
        times = {step: dict(entry) for step, entry in (job.step_times or {}).items()}
        moved = []
        for step, state in changes:
            before = ordered(steps)[step]
            steps = advance(steps, step, state)
            entry = times.setdefault(step, {})
            if state == IN_PROGRESS:
                entry["started_at"] = now.isoformat()
            else:  # ended (a step may end without having been seen to start: TRAINED_MODEL)
                entry.setdefault("started_at", now.isoformat())
                entry["ended_at"] = now.isoformat()
                # Kept, so that reads (a job list shows every step of 100 jobs) do not parse both times again.
                entry["seconds"] = step_seconds(entry["started_at"], entry["ended_at"])
            moved.append((step, before, state))
        job.steps_state = steps
        job.step_times = times
        job.status = overall_status(steps)
        job.waiting = None  # a step moved: whatever it waited for is over
        if job.started_at is None:
            job.started_at = now
        if job.status in ENDED:
            job.finished_at = now
        for step, before, state in moved:
            self._record(job, step, before, state, now, reason=reason, attempt=attempt)
        log.info(
            "job steps changed",
            extra={"trainingjob_id": job.id, "changes": dict(changes), "job_status": job.status},
        )
        if notify:
            self._notify(job)

    def fail(self, job: TrainingJob, reason: str, *, attempt: int | None = None) -> bool:
        """Fail the step in progress (or the first not finished); False if the job had ended already."""
        if not self._end(job, FAILED, reason, attempt):
            return False
        job.failure_reason = reason[:4000]
        log.warning("job failed", extra={"trainingjob_id": job.id, "reason": reason[:500]})
        return True

    def cancel(self, job: TrainingJob, reason: str) -> bool:
        """End the job as CANCELLED (the step in progress, or the first not finished, is CANCELLED); False if the
        job had ended already. Its record, history and notification stay as for any end."""
        if not self._end(job, CANCELLED, reason, None):
            return False
        log.info("job cancelled", extra={"trainingjob_id": job.id, "reason": reason[:500]})
        return True

    def _end(self, job: TrainingJob, state: str, reason: str, attempt: int | None) -> bool:
        steps = ordered(job.steps_state)
        if overall_status(steps) in ENDED:
            return False
        step = step_in_progress(steps) or next(s for s in STEPS if steps[s] != FINISHED)
        self.move(job, (step, state), reason=reason[:4000], attempt=attempt)
        return True

    def _record(self, job: TrainingJob, step: str | None, before: str | None, after: str, at: datetime, *,
                reason: str | None = None, attempt: int | None = None) -> None:
        # The job's event counter is bumped in the database (and the row locked), so concurrent changers of one
        # job get distinct numbers, in commit order.
        seq = self.session.execute(
            update(TrainingJob).where(TrainingJob.id == job.id)
            .values(event_count=TrainingJob.event_count + 1).returning(TrainingJob.event_count)
            .execution_options(synchronize_session=False)
        ).scalar_one()
        self.session.add(JobEvent(job_id=job.id, seq=seq, at=at, step=step, from_state=before, to_state=after,
                                  reason=reason, attempt=attempt))

    def _notify(self, job: TrainingJob) -> None:
        if not job.notification_url:
            return
        self.queue.enqueue(
            job.id,
            NOTIFY,
            {
                "url": job.notification_url,
                "body": notification_body(job.steps_state),
                "delivery_id": uuid.uuid4().hex,
            },
        )
