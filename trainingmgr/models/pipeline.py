from __future__ import annotations

from typing import Optional

from sqlalchemy import ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .base import NEVER_REUSED_IDS, Base, TimestampMixin


class Pipeline(TimestampMixin, Base):
    """A pipeline known to the service. kfp.local has no registry, so the service keeps it (for every engine)."""

    __tablename__ = "pipelines"
    __table_args__ = NEVER_REUSED_IDS

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True, nullable=False)
    description: Mapped[Optional[str]] = mapped_column(Text)
    # The engine's own id for it (a KFP pipeline id); None for the embedded engine.
    engine_ref: Mapped[Optional[str]] = mapped_column(String(255))

    versions: Mapped[list["PipelineVersion"]] = relationship(
        back_populates="pipeline", order_by="PipelineVersion.number", cascade="all, delete-orphan"
    )


class PipelineVersion(TimestampMixin, Base):
    """One uploaded compiled pipeline (YAML). Versions are numbered 1, 2, ... as they come, and named as in Kubeflow:
    the first after the pipeline, later ones "2", "3", ..., unless the uploader names one."""

    __tablename__ = "pipeline_versions"
    __table_args__ = (
        UniqueConstraint("pipeline_id", "number", name="uq_pipeline_versions_pipeline_number"),
        UniqueConstraint("pipeline_id", "name", name="uq_pipeline_versions_pipeline_name"),
        NEVER_REUSED_IDS,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pipeline_id: Mapped[int] = mapped_column(ForeignKey("pipelines.id", ondelete="CASCADE"), nullable=False)
    number: Mapped[int] = mapped_column(Integer, nullable=False)
    name: Mapped[str] = mapped_column(String(128), nullable=False)
    description: Mapped[Optional[str]] = mapped_column(Text)
    # Where the compiled YAML is kept, relative to <TM_DATA_DIR>.
    file_path: Mapped[str] = mapped_column(Text, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    engine_ref: Mapped[Optional[str]] = mapped_column(String(255))

    pipeline: Mapped[Pipeline] = relationship(back_populates="versions")

    @property
    def version(self) -> str:
        return str(self.number)


class Experiment(TimestampMixin, Base):
    __tablename__ = "experiments"
    __table_args__ = NEVER_REUSED_IDS

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True, nullable=False)
    engine_ref: Mapped[Optional[str]] = mapped_column(String(255))
