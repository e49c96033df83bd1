from __future__ import annotations

from typing import Optional

from sqlalchemy import Boolean, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from .base import NEVER_REUSED_IDS, Base, TimestampMixin


class FeatureGroup(TimestampMixin, Base):
    """Where a model's training data lives (an InfluxDB measurement, a CSV or Parquet file)."""

    __tablename__ = "feature_groups"
    __table_args__ = NEVER_REUSED_IDS

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Byte-order collation on PostgreSQL, as SQLite's: the keyset paging order is the same on both.
    name: Mapped[str] = mapped_column(
        String(63).with_variant(String(63, collation="C"), "postgresql"), unique=True, nullable=False
    )
    feature_list: Mapped[str] = mapped_column(Text, nullable=False)
    datalake_source: Mapped[str] = mapped_column(String(32), nullable=False)
    host: Mapped[str] = mapped_column(String(255), nullable=False, default="")
    port: Mapped[str] = mapped_column(String(5), nullable=False, default="")
    bucket: Mapped[str] = mapped_column(String(255), nullable=False, default="")
    # Encrypted with the configured key (see trainingmgr.secrets); never the clear token.
    token_encrypted: Mapped[str] = mapped_column(Text, nullable=False, default="")
    db_org: Mapped[str] = mapped_column(String(255), nullable=False, default="")
    measurement: Mapped[str] = mapped_column(String(255), nullable=False, default="")
    enable_dme: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    measured_obj_class: Mapped[Optional[str]] = mapped_column(String(255))
    dme_port: Mapped[Optional[str]] = mapped_column(String(5))
    source_name: Mapped[Optional[str]] = mapped_column(String(255))

    @property
    def features(self) -> list[str]:
        """feature_list as names (it is stored as the comma-separated text clients send)."""
        return split_names(self.feature_list)


def split_names(text: str) -> list[str]:
    """A comma-separated list of names, trimmed, empty ones dropped."""
    return [name.strip() for name in text.split(",") if name.strip()]
