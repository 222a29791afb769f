"""Drift tables: tiles (merged sketches per model version, cohort, feature, time bucket),
alerts, and the tiler's cursor. Imported by `fleet.drift.routes`, so `create_db` (which runs
after the app registered its routers) creates them with the rest."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Index, String, UniqueConstraint
from sqlmodel import Field, SQLModel

from fleet.models import UTCDateTime, utcnow

__all__ = ["DriftAlert", "DriftAlertPublic", "DriftCursor", "DriftTile"]

#: tile feature names for prediction drift (input features never start with "__")
CONFIDENCE_FEATURE = "__confidence__"
CLASSES_FEATURE = "__classes__"


class DriftTile(SQLModel, table=True):
    """Every device window of one model version whose time falls in one bucket, merged."""

    __tablename__ = "drift_tile"
    __table_args__ = (
        UniqueConstraint(
            "model_name", "model_version", "cohort", "feature", "bucket_start", name="uq_drift_tile"
        ),
        Index("ix_drift_tile_lookup", "model_name", "model_version", "bucket_start"),
    )
    id: int | None = Field(default=None, primary_key=True)
    model_name: str = Field(max_length=128)
    model_version: int
    cohort: str = Field(default="all", max_length=64)
    feature: str = Field(max_length=128)
    bucket_start: datetime = Field(sa_type=UTCDateTime)
    bucket_s: int
    #: "kll" (sketch in ``sketch``) or "classes" (counts in ``class_counts``)
    kind: str = Field(default="kll", max_length=16)
    count: int = Field(default=0, sa_type=BigInteger)
    nan_count: int = Field(default=0, sa_type=BigInteger)
    windows: int = 0
    #: SketchWire JSON of the merged KLL sketch
    sketch: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    class_counts: list[int] | None = Field(default=None, sa_type=JSON)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class DriftCursor(SQLModel, table=True):
    """How far the tiler has read the telemetry table (by row id)."""

    __tablename__ = "drift_cursor"
    name: str = Field(primary_key=True, max_length=64)
    last_id: int = Field(default=0, sa_type=BigInteger)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    #: the fleet process that tiles and evaluates drift now (one at a time; a lease)
    owner: str | None = Field(default=None, max_length=128)
    lease_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class DriftAlertPublic(SQLModel):
    id: int
    model_name: str
    model_version: int
    scope: str
    status: str
    worst_features: list[str]
    max_severity: float
    drifted_count: int
    first_seen: datetime
    last_seen: datetime
    resolved_at: datetime | None


class DriftAlert(SQLModel, table=True):
    """One drift episode of one scope: fired after N drifted windows, resolved after M calm."""

    __tablename__ = "drift_alert"
    __table_args__ = (Index("ix_drift_alert_model", "model_name", "model_version", "status"),)
    id: int | None = Field(default=None, primary_key=True)
    model_name: str = Field(max_length=128)
    model_version: int
    #: "fleet", "cohort:<name>" or "device:<id>"
    scope: str = Field(default="fleet", max_length=128)
    #: "firing" | "resolved"
    status: str = Field(default="firing", max_length=16)
    worst_features: list[str] = Field(default_factory=list, sa_type=JSON)
    max_severity: float = 0.0
    drifted_count: int = 0
    first_seen: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    last_seen: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    resolved_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    detail: str = Field(default="", sa_type=String)
