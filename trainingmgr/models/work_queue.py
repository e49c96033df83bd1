"""The durable queue of job steps (the work_items table).

Items are written in the same transaction as the job change that calls for them. A worker claims one by taking
its lease in a single UPDATE (with `FOR UPDATE SKIP LOCKED` on PostgreSQL, so concurrent workers never take the
same row); an item whose lease ran out (its worker died) is claimed again. An item is finished by deleting it in
the transaction that records its outcome, and only while the finishing worker still holds its lease, so a step is
never recorded twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, delete, exists, func, or_, select, type_coerce, update
from sqlalchemy.orm import Session, aliased

from .base import UtcDateTime, utcnow
from .work import WorkItem
from .work_wake import RING_NOTIFY, RING_STEPS, announce

EXTRACT = "extract"
START_RUN = "start_run"
WATCH_RUN = "watch_run"
NOTIFY = "notify"
KINDS = (EXTRACT, START_RUN, WATCH_RUN, NOTIFY)
STEP_KINDS = (EXTRACT, START_RUN, WATCH_RUN)  # the work that moves a job; NOTIFY only tells its rApp


@dataclass(frozen=True)
class Claim:
    id: int
    job_id: int
    kind: str
    payload: dict[str, Any]
    attempts: int
    deadline_at: datetime | None
    owner: str


class LeaseLost(Exception):
    """Another worker owns the item now: this worker's outcome must not be recorded."""


class WorkQueue:
    def __init__(self, session: Session):
        self.session = session

    def enqueue(
        self,
        job_id: int,
        kind: str,
        payload: dict[str, Any] | None = None,
        *,
        delay: float = 0.0,
        deadline_at: datetime | None = None,
    ) -> WorkItem:
        """Add an item to the caller's transaction (the caller commits)."""
        assert kind in KINDS, kind
        item = WorkItem(
            job_id=job_id,
            kind=kind,
            payload=payload or {},
            due_at=utcnow() + timedelta(seconds=delay),
            deadline_at=deadline_at,
            attempts=0,
        )
        self.session.add(item)
        self._announce(kind)
        return item

    def _announce(self, kind: str) -> None:
        """Wake the step runners of every process (see work_wake)."""
        announce(self.session, RING_NOTIFY if kind == NOTIFY else RING_STEPS)

    def _of_kinds(self, kinds: tuple[str, ...]) -> list[Any]:
        """Items of `kinds`, in turn: a job's notifications go out in order, so only its oldest pending one counts
        (a later one waits while an earlier one is held or retried)."""
        conditions = [WorkItem.kind.in_(kinds)]
        if NOTIFY in kinds:
            earlier = aliased(WorkItem)
            conditions.append(or_(WorkItem.kind != NOTIFY, ~exists().where(
                earlier.job_id == WorkItem.job_id, earlier.kind == NOTIFY, earlier.id < WorkItem.id)))
        return conditions

    def next_due(self, kinds: tuple[str, ...] = KINDS) -> datetime | None:
        """When the next item of `kinds` may be claimed: its due time, or the end of the lease that holds it;
        None when there is none. A read: it takes no write lock, so idle workers may ask it often."""
        moment = case((WorkItem.lease_until > WorkItem.due_at, WorkItem.lease_until), else_=WorkItem.due_at)
        return self.session.scalar(select(type_coerce(func.min(moment), UtcDateTime)).where(*self._of_kinds(kinds)))

    def claim(self, owner: str, lease_seconds: float, kinds: tuple[str, ...] = KINDS) -> Claim | None:
        """The next due item of one of `kinds` that no live lease holds (in turn: see _of_kinds)."""
        now = utcnow()
        conditions = [WorkItem.due_at <= now, or_(WorkItem.lease_until.is_(None), WorkItem.lease_until < now),
                      *self._of_kinds(kinds)]
        candidate = (
            select(WorkItem.id)
            .where(*conditions)
            .order_by(WorkItem.due_at, WorkItem.id)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        row = self.session.execute(
            update(WorkItem)
            .where(WorkItem.id == candidate)
            .values(lease_owner=owner, lease_until=now + timedelta(seconds=lease_seconds),
                    attempts=WorkItem.attempts + 1)
            .returning(WorkItem.id, WorkItem.job_id, WorkItem.kind, WorkItem.payload, WorkItem.attempts,
                       WorkItem.deadline_at)
            .execution_options(synchronize_session=False)
        ).first()
        self.session.commit()
        if row is None:
            return None
        return Claim(row.id, row.job_id, row.kind, dict(row.payload or {}), row.attempts, row.deadline_at,
                     owner)

    def extend(self, ids: list[int], owner: str, lease_seconds: float) -> None:
        if not ids:
            return
        self.session.execute(
            update(WorkItem)
            .where(WorkItem.id.in_(ids), WorkItem.lease_owner == owner)
            .values(lease_until=utcnow() + timedelta(seconds=lease_seconds))
            .execution_options(synchronize_session=False)
        )
        self.session.commit()

    def finish(self, claim: Claim) -> None:
        """Delete the item in the caller's transaction; LeaseLost if this worker no longer holds it."""
        result = self.session.execute(
            delete(WorkItem)
            .where(WorkItem.id == claim.id, WorkItem.lease_owner == claim.owner)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:
            raise LeaseLost(f"work item {claim.id} is no longer ours")

    def retry_later(self, claim: Claim, delay: float, *, payload: dict[str, Any] | None = None,
                    count_attempt: bool = True) -> None:
        """Give the item back, due after `delay` seconds (the caller commits)."""
        values: dict[str, Any] = {"due_at": utcnow() + timedelta(seconds=delay), "lease_owner": None,
                                  "lease_until": None}
        if payload is not None:
            values["payload"] = payload
        if not count_attempt:
            values["attempts"] = WorkItem.attempts - 1
        result = self.session.execute(
            update(WorkItem)
            .where(WorkItem.id == claim.id, WorkItem.lease_owner == claim.owner)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:
            raise LeaseLost(f"work item {claim.id} is no longer ours")

    def remove_for_job(self, job_id: int, kinds: tuple[str, ...] = KINDS) -> None:
        self.session.execute(
            delete(WorkItem).where(WorkItem.job_id == job_id, WorkItem.kind.in_(kinds))
            .execution_options(synchronize_session=False)
        )

    def make_due(self, job_id: int, kind: str) -> None:
        """Bring a waiting item forward (a callback says there is news)."""
        self.session.execute(
            update(WorkItem)
            .where(WorkItem.job_id == job_id, WorkItem.kind == kind, WorkItem.lease_owner.is_(None))
            .values(due_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        self._announce(kind)
