"""Quality tables: labels posted to the fleet, bytes sent per device, and unified alerts.

Imported by `fleet.quality.routes`, so `create_db` creates them with the rest.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Index, String, UniqueConstraint
from sqlmodel import Field, SQLModel

from fleet.models import UTCDateTime, utcnow

__all__ = ["FleetAlert", "QualityLabel", "TransferBytes"]


class QualityLabel(SQLModel, table=True):
    """A label posted to ``POST /api/v1/labels``, waiting for (or sent to) its device.

    The fleet never joins labels itself: it holds no per-prediction records. Each label goes
    down to its device in a ``label`` command and comes back joined in telemetry.
    """

    __tablename__ = "quality_label"
    __table_args__ = (
        UniqueConstraint("device_id", "key", name="uq_quality_label"),
        Index("ix_quality_label_pending", "sent_at"),
    )
    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(max_length=64)
    #: "id:<prediction id>" or "hash:<input sha256>": a second post of one key is a duplicate
    key: str = Field(max_length=80)
    prediction_id: str | None = Field(default=None, max_length=64)
    input_hash: str | None = Field(default=None, max_length=64)
    model_name: str | None = Field(default=None, max_length=128)
    model_version: int | None = None
    label: Any = Field(sa_type=JSON)
    labeled_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    received_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    sent_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    command_id: str | None = Field(default=None, max_length=64)


class TransferBytes(SQLModel, table=True):
    """Bundle bytes the fleet sent one device, per bundle and UTC day (chunks and retries)."""

    __tablename__ = "quality_transfer_bytes"
    __table_args__ = (
        UniqueConstraint("device_id", "bundle_sha256", "day", "channel", name="uq_transfer_bytes"),
    )
    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(max_length=64)
    bundle_sha256: str = Field(max_length=64, index=True)
    day: str = Field(max_length=10)
    #: "mqtt_chunks" (fleet/transfer.py); HTTP downloads are not counted yet
    channel: str = Field(default="mqtt_chunks", max_length=16)
    bytes: int = Field(default=0, sa_type=BigInteger)
    chunks: int = Field(default=0, sa_type=BigInteger)
    requests: int = Field(default=0, sa_type=BigInteger)


class FleetAlert(SQLModel, table=True):
    """One episode of one alert kind for one model version and cohort (the dedup key).

    Drift alerts stay in their own table (fleet.drift); `fleet.quality.alerts.all_alerts`
    shows both through one record shape.
    """

    __tablename__ = "fleet_alert"
    __table_args__ = (Index("ix_fleet_alert_key", "kind", "model_name", "model_version", "cohort"),)
    id: int | None = Field(default=None, primary_key=True)
    #: quality_drop | quality_estimate_drop | slo_burn | rollout_halted | device_offline
    kind: str = Field(max_length=32)
    model_name: str = Field(default="", max_length=128)
    model_version: int | None = None
    cohort: str = Field(default="fleet", max_length=128)
    #: "firing" | "resolved"
    status: str = Field(default="firing", max_length=16)
    severity: str = Field(default="warning", max_length=16)
    devices: list[str] = Field(default_factory=list, sa_type=JSON)
    summary: str = Field(default="", sa_type=String)
    figures: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    runbook: str = Field(default="", max_length=256)
    fired_count: int = 1
    first_seen: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    last_seen: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    resolved_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
