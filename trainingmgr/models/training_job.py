from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .base import NEVER_REUSED_IDS, Base, TimestampMixin, UtcDateTime
from .feature_group import FeatureGroup


class Model(TimestampMixin, Base):
    """A model known to the service: (modelname, modelversion); each training run adds an artifact version."""

    __tablename__ = "models"
    __table_args__ = (
        UniqueConstraint("modelname", "modelversion", name="uq_models_name_version"),
        NEVER_REUSED_IDS,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    modelname: Mapped[str] = mapped_column(String(128), nullable=False)
    modelversion: Mapped[str] = mapped_column(String(64), nullable=False)
    model_location: Mapped[Optional[str]] = mapped_column(Text)
    # Number of training runs started so far; bumped atomically to hand out artifact versions.
    training_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)


class TrainingJob(TimestampMixin, Base):
    """One training (or retraining) run of a model."""

    __tablename__ = "training_jobs"
    __table_args__ = NEVER_REUSED_IDS

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"), nullable=False, index=True)
    # RESTRICT: a feature group in use by a job cannot be deleted.
    feature_group_id: Mapped[int] = mapped_column(
        ForeignKey("feature_groups.id", ondelete="RESTRICT"), nullable=False, index=True
    )
    artifact_version: Mapped[str] = mapped_column(String(32), nullable=False)
    is_retraining: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    training_config: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    # The training_config as the client sent it (its spellings), answered back; training_config is the normal form.
    training_config_sent: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON)
    model_location: Mapped[Optional[str]] = mapped_column(Text)
    training_dataset: Mapped[Optional[str]] = mapped_column(Text)
    validation_dataset: Mapped[Optional[str]] = mapped_column(Text)
    notification_url: Mapped[Optional[str]] = mapped_column(Text)
    consumer_rapp_id: Mapped[Optional[str]] = mapped_column(String(255))
    producer_rapp_id: Mapped[Optional[str]] = mapped_column(String(255))
    steps_state: Mapped[dict[str, str]] = mapped_column(JSON, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="NOT_STARTED", index=True)
    run_id: Mapped[Optional[str]] = mapped_column(String(255))
    model_url: Mapped[Optional[str]] = mapped_column(Text)
    metrics: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON)
    failure_reason: Mapped[Optional[str]] = mapped_column(Text)
    # While a step retries a failing peer: what failed last, how often, when it is tried next and until when
    # (written by StepExecutor._retry_or_fail, cleared when a step moves); None when nothing is being retried.
    waiting: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON)
    deletion_in_progress: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    # The pipeline version the run used (the training or the retraining pipeline).
    pipeline_version_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("pipeline_versions.id", ondelete="RESTRICT"), index=True
    )
    run_started_at: Mapped[Optional[datetime]] = mapped_column(UtcDateTime)
    run_ended_at: Mapped[Optional[datetime]] = mapped_column(UtcDateTime)
    # When the first step started, and when the job ended (FINISHED, FAILED or CANCELLED).
    started_at: Mapped[Optional[datetime]] = mapped_column(UtcDateTime)
    finished_at: Mapped[Optional[datetime]] = mapped_column(UtcDateTime)
    # {step: {"started_at": ISO time, "ended_at": ISO time}} as the steps moved (JobStateMachine).
    step_times: Mapped[Optional[dict[str, dict[str, str]]]] = mapped_column(JSON)
    # Events written so far: the next event's seq is this plus one (bumped in the row the change updates anyway).
    event_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")

    model: Mapped[Model] = relationship(lazy="joined")
    feature_group: Mapped[FeatureGroup] = relationship(lazy="joined")

    # As a row of JOB_VIEW has them (services.training_jobs): what a job's representation shows of its model.
    @property
    def modelname(self) -> str:
        return self.model.modelname

    @property
    def modelversion(self) -> str:
        return self.model.modelversion


class JobEvent(Base):
    """One change of a job's state, written in the transaction that made it (JobStateMachine): the job's history,
    and what the event stream serves. `id` orders every job's events (the stream's cursor); `seq` numbers one job's
    events from 1."""

    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_events_job_seq"), NEVER_REUSED_IDS)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("training_jobs.id", ondelete="CASCADE"), nullable=False,
                                        index=True)
    seq: Mapped[int] = mapped_column(Integer, nullable=False)
    at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    step: Mapped[Optional[str]] = mapped_column(String(40))  # None: the job as a whole (created, cancelled ...)
    from_state: Mapped[Optional[str]] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16), nullable=False)
    reason: Mapped[Optional[str]] = mapped_column(Text)
    attempt: Mapped[Optional[int]] = mapped_column(Integer)


class JobLog(Base):
    """The output of a job's pipeline run, kept when the run ends (its folder on the engine's side goes then): at
    most TM_RUN_LOG_MAX_BYTES, the end of it when the run wrote more. Deleted with its job."""

    __tablename__ = "job_logs"

    job_id: Mapped[int] = mapped_column(ForeignKey("training_jobs.id", ondelete="CASCADE"), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)  # bytes the run wrote in all
    content: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)  # its last bytes: size - len(content) cut
    kept_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
