from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from sqlalchemy import JSON, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from .base import NEVER_REUSED_IDS, Base, UtcDateTime, utcnow


class WorkItem(Base):
    """A step of a training job still to be done, recorded in the same transaction as the job's state change.

    Workers claim an item by taking its lease (row locks on PostgreSQL); an item whose lease ran out (its worker
    died) is claimed again. The item is deleted when its step is done.
    """

    __tablename__ = "work_items"
    __table_args__ = NEVER_REUSED_IDS

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("training_jobs.id", ondelete="CASCADE"), nullable=False, index=True)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    due_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow, index=True)
    # The step fails when it is not done by then.
    deadline_at: Mapped[Optional[datetime]] = mapped_column(UtcDateTime)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    lease_owner: Mapped[Optional[str]] = mapped_column(String(128))
    lease_until: Mapped[Optional[datetime]] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow)
