"""Database tables and the API's request/response models.

Layout after full-stack-fastapi-template: for each thing an ``XBase`` (shared fields), an
``XCreate`` (what a client sends), the table ``X`` (``table=True``; only these are tables)
and an ``XPublic`` (what the API returns). Datetimes are timezone-aware UTC everywhere.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import StringConstraints, model_validator
from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

__all__ = [
    "Bundle",
    "BundlePublic",
    "BundlePublicWithManifest",
    "Command",
    "CommandPublic",
    "Deployment",
    "DeploymentCreate",
    "DeploymentPublic",
    "Device",
    "DeviceBase",
    "DeviceCreate",
    "DeviceDetail",
    "DeviceEvent",
    "DeviceEventPublic",
    "DevicePublic",
    "RollbackCreate",
    "TelemetryRecord",
    "utcnow",
]

Sha256 = str
SHA256_PATTERN = r"^[0-9a-f]{64}$"
Sha256Hex = Annotated[str, StringConstraints(pattern=SHA256_PATTERN)]
#: sqlite only auto-increments an INTEGER PRIMARY KEY; elsewhere 64 bits (telemetry adds up)
_BIG_PK = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out; SQLite stores no zone, so naive values read back as UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# -- bundles ------------------------------------------------------------------------------


class BundleBase(SQLModel):
    sha256: Sha256 = Field(primary_key=True, max_length=64)
    model_name: str = Field(index=True, max_length=128)
    model_version: int
    profile: str = Field(index=True, max_length=64)
    size: int = Field(sa_type=BigInteger)
    created_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)
    uploaded_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Bundle(BundleBase, table=True):
    """A verified bundle in the registry; the file is ``<bundle_dir>/<sha256>.efb``."""

    #: the verified manifest, as JSON (signatures checked at upload)
    manifest: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    path: str = Field(max_length=4096)


class BundlePublic(BundleBase):
    pass


class BundlePublicWithManifest(BundleBase):
    manifest: dict[str, Any]


# -- devices ------------------------------------------------------------------------------


class DeviceBase(SQLModel):
    #: None until the device's first heartbeat says it (auto-registered devices)
    profile: str | None = Field(default=None, index=True, max_length=64)
    tags: list[str] = Field(default_factory=list, sa_type=JSON)
    #: operator-assigned groups (rollout targets); tags come from the device too
    groups: list[str] = Field(default_factory=list, sa_type=JSON)


class DeviceCreate(DeviceBase):
    id: str = Field(max_length=64)
    profile: str = Field(min_length=1, max_length=64)


class Device(DeviceBase, table=True):
    id: str = Field(primary_key=True, max_length=64)
    registered_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    #: registered by its own messages, not by an operator
    # TODO(trust issue): replace auto-registration with enrollment (device certificates).
    auto_registered: bool = False
    last_seen: datetime | None = Field(default=None, sa_type=UTCDateTime)
    #: the last presence/heartbeat said online; the API also applies offline_after_s
    online: bool = False
    agent_version: str | None = Field(default=None, max_length=64)
    reported_bundle_sha256: str | None = Field(default=None, max_length=64)
    reported_model_name: str | None = Field(default=None, max_length=128)
    reported_model_version: int | None = None
    desired_bundle_sha256: str | None = Field(
        default=None, foreign_key="bundle.sha256", max_length=64
    )
    desired_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class DevicePublic(DeviceBase):
    id: str
    registered_at: datetime
    auto_registered: bool
    last_seen: datetime | None
    online: bool
    agent_version: str | None
    reported_bundle_sha256: str | None
    model_name: str | None
    model_version: int | None
    desired_bundle_sha256: str | None
    #: sum over every telemetry window received from the device
    inference_count: int
    #: p95 latency of the device's latest telemetry window (ms), if it reported latency
    latency_p95_ms: float | None
    #: it runs another bundle than the fleet wants (the reconciler re-sends, rate-limited)
    state_mismatch: bool = False


class DeviceEventBase(SQLModel):
    device_id: str = Field(foreign_key="device.id", index=True, max_length=64)
    command_id: str | None = Field(default=None, index=True, max_length=64)
    rollout_id: str | None = Field(default=None, index=True, max_length=64)
    state: str = Field(max_length=32)
    reason: str = Field(default="ok", max_length=64)
    detail: str = Field(default="", sa_type=String)
    bundle_sha256: str | None = Field(default=None, max_length=64)
    active_bundle_sha256: str | None = Field(default=None, max_length=64)
    model_name: str | None = Field(default=None, max_length=128)
    model_version: int | None = None
    progress: float | None = None
    #: the device's clock
    sent_at: datetime = Field(sa_type=UTCDateTime)
    #: the fleet's clock, when ingested
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class DeviceEvent(DeviceEventBase, table=True):
    """One install-state transition a device reported (append-only)."""

    __table_args__ = (
        Index("ix_deviceevent_device_at", "device_id", "at"),
        # QoS 1 redelivers: one row per message the device sent
        UniqueConstraint("device_id", "message_id", name="uq_deviceevent_device_message"),
    )
    id: int | None = Field(default=None, primary_key=True, sa_type=_BIG_PK)
    message_id: str = Field(max_length=64)


class DeviceEventPublic(DeviceEventBase):
    id: int


# -- telemetry ----------------------------------------------------------------------------


class TelemetryRecord(SQLModel, table=True):
    """One telemetry window; ``(device_id, stream_id, seq)`` is unique so redeliveries are
    dropped, while a device whose state was wiped (new stream id, seq from 0) is not."""

    __table_args__ = (
        UniqueConstraint("device_id", "stream_id", "seq", name="uq_telemetry_device_seq"),
        Index("ix_telemetry_device_end", "device_id", "window_end"),
        Index("ix_telemetry_model", "model_name", "model_version"),
    )
    id: int | None = Field(default=None, primary_key=True, sa_type=_BIG_PK)
    device_id: str = Field(foreign_key="device.id", max_length=64)
    stream_id: str = Field(default="", max_length=64)
    seq: int = Field(sa_type=BigInteger)
    window_start: datetime = Field(sa_type=UTCDateTime)
    window_end: datetime = Field(sa_type=UTCDateTime)
    received_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    bundle_sha256: str | None = Field(default=None, max_length=64)
    model_name: str | None = Field(default=None, max_length=128)
    model_version: int | None = None
    inference_count: int = Field(default=0, sa_type=BigInteger)
    error_count: int = Field(default=0, sa_type=BigInteger)
    latency_count: int = Field(default=0, sa_type=BigInteger)
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    #: the window's JSON as received, for later merging and drift (without its sketch pack
    #: when it came in a telemetry frame; a JSON-form window keeps its base64 pack in here)
    window: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    #: the input sketch pack of a framed window, its bytes as received (`protocol.sketchpack`)
    input_pack: bytes | None = Field(default=None, sa_type=LargeBinary)


# -- deployments and commands -------------------------------------------------------------


class DeploymentCreate(SQLModel):
    """Deploy one bundle to the named devices, or to every device of one profile."""

    bundle_sha256: Sha256Hex
    device_ids: list[str] | None = Field(default=None, min_length=1, max_length=10_000)
    profile: str | None = Field(default=None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _one_target(self) -> DeploymentCreate:
        if (self.device_ids is None) == (self.profile is None):
            raise ValueError("give exactly one of device_ids or profile")
        return self


class Deployment(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=64)
    bundle_sha256: str = Field(foreign_key="bundle.sha256", max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    #: how the devices were chosen: {"device_ids": [...]} or {"profile": "..."}
    target: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)


class CommandBase(SQLModel):
    id: str = Field(primary_key=True, max_length=64)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=64)
    kind: str = Field(max_length=16)  # "deploy" | "rollback"
    bundle_sha256: str | None = Field(default=None, max_length=64)
    deployment_id: str | None = Field(
        default=None, foreign_key="deployment.id", index=True, max_length=64
    )
    rollout_id: str | None = Field(default=None, index=True, max_length=64)
    sent_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    #: "sent", then the last InstallState the device reported for it
    state: str = Field(default="sent", max_length=32)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Command(CommandBase, table=True):
    """A command the broker acknowledged (PUBACK); commands that failed to send are not kept."""


class CommandPublic(CommandBase):
    pass


class DeploymentPublic(SQLModel):
    id: str
    bundle_sha256: str
    created_at: datetime
    target: dict[str, Any]
    commands: list[CommandPublic]


class RollbackCreate(SQLModel):
    target_bundle_sha256: Sha256Hex | None = None
    reason: str = Field(default="", max_length=512)


class DeviceDetail(DevicePublic):
    events: list[DeviceEventPublic]
    commands: list[CommandPublic]


# Rollout tables live with the rollout package; importing them here registers them on the
# metadata, so `fleet.db.create_db` creates them too. Last, because they import from here.
from fleet.rollout import table as _rollout_table  # noqa: E402, F401
