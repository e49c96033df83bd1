"""Changing a job's steps: the one place that moves steps_state, derives the status, and queues the rApp's
notification in the same transaction (so a notification is never lost nor sent for a change that rolled back).
"""
from __future__ import annotations

import json
import logging
import uuid

from sqlalchemy.orm import Session

from ..models import TrainingJob
from ..workers.queue import NOTIFY, WorkQueue, utcnow
from . import lifecycle as lc

log = logging.getLogger(__name__)


def notification_body(steps_state: dict[str, str]) -> str:
    """The rApp's body: the steps_state serialised to a JSON string (sent as a JSON string literal)."""
    return json.dumps(lc.ordered(steps_state))


class JobTransitions:
    def __init__(self, session: Session):
        self.session = session
        self.queue = WorkQueue(session)

    def move(self, job: TrainingJob, *changes: tuple[str, str], notify: bool = True) -> None:
        """Apply (step, state) changes in order; InvalidTransition if one is not forward."""
        steps = dict(job.steps_state)
        for step, state in changes:
            steps = lc.advance(steps, step, state)
        job.steps_state = steps
        job.status = lc.overall_status(steps)
        job.waiting = None  # a step moved: whatever it waited for is over
        if job.status == lc.FINISHED:
            job.finished_at = utcnow()
        log.info(
            "job steps changed",
            extra={"trainingjob_id": job.id, "changes": dict(changes), "job_status": job.status},
        )
        if notify:
            self._notify(job)

    def fail(self, job: TrainingJob, reason: str) -> bool:
        """Fail the step in progress (or the first not finished); False if the job had ended already."""
        steps = lc.ordered(job.steps_state)
        if lc.overall_status(steps) in (lc.FINISHED, lc.FAILED):
            return False
        step = lc.step_in_progress(steps) or next(s for s in lc.STEPS if steps[s] != lc.FINISHED)
        job.failure_reason = reason[:4000]
        self.move(job, (step, lc.FAILED))
        log.warning("job failed", extra={"trainingjob_id": job.id, "step": step, "reason": reason[:500]})
        return True

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
