"""The rollout tables. Imported by `fleet.models` so `create_db` creates them with the rest.

- `Rollout`: one row per rollout: its plan, its machine state, a revision (every write
  checks and bumps it) and a lease (which fleet process may step it now).
- `RolloutDevice`: the rollout's device table: stage, phase, attempt, the bundle the
  device ran before (the rollback target), deadline.
- `RolloutDecision`: every decision with its figures (gates, cohorts), append-only.
- `RolloutRequest`: an operator's approve / pause / abort / rollback, applied by the
  process holding the lease, in the same transaction as the state it changes.
- `CommandOutbox`: every command the fleet decided to send, written in the transaction that
  decided it; a dispatcher publishes and marks it sent. The id is the command id.
- `DeviceReconcile`: when the reconciler last re-sent a device its desired bundle.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Index, Integer, String
from sqlmodel import Field, SQLModel

from fleet.models import UTCDateTime, utcnow

__all__ = [
    "CommandOutbox",
    "DeviceReconcile",
    "Rollout",
    "RolloutDecision",
    "RolloutDevice",
    "RolloutRequest",
]

_BIG_PK = BigInteger().with_variant(Integer(), "sqlite")


class Rollout(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=64)
    bundle_sha256: str = Field(foreign_key="bundle.sha256", index=True, max_length=64)
    model_name: str = Field(max_length=128)
    model_version: int
    #: the validated `RolloutCreate`, seed filled in
    plan: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    phase: str = Field(index=True, max_length=32)
    stage: int = -1
    stage_started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    bake_started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    pause_kind: str = Field(default="", max_length=64)
    reason: str = Field(default="", sa_type=String)
    rollback_started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    rollback_final: str = Field(default="rolled_back", max_length=32)
    last_control: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    device_count: int = 0
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    #: bumped by every state write; a write that finds another revision is refused
    revision: int = 0
    lease_owner: str | None = Field(default=None, max_length=128)
    lease_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    #: device events ingested at or after this (minus a margin) are read at the next step
    events_seen_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class RolloutDevice(SQLModel, table=True):
    __table_args__ = (Index("ix_rolloutdevice_rollout_phase", "rollout_id", "phase"),)
    rollout_id: str = Field(foreign_key="rollout.id", primary_key=True, max_length=64)
    device_id: str = Field(foreign_key="device.id", primary_key=True, index=True, max_length=64)
    stage: int
    position: int
    phase: str = Field(max_length=32)
    previous_sha256: str | None = Field(default=None, max_length=64)
    attempt: int = 0
    timeouts: int = 0
    deadline: datetime | None = Field(default=None, sa_type=UTCDateTime)
    command_id: str | None = Field(default=None, max_length=64)
    online: bool = False
    reported_sha256: str | None = Field(default=None, max_length=64)
    reported_failure: bool = False
    reason: str = Field(default="", max_length=512)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class RolloutDecision(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True, sa_type=_BIG_PK)
    rollout_id: str = Field(foreign_key="rollout.id", index=True, max_length=64)
    stage: int
    outcome: str = Field(max_length=32)
    reason: str = Field(default="", sa_type=String)
    figures: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    #: the rollout revision this decision was written with (at most one write per revision)
    revision: int
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class RolloutRequest(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=64)
    rollout_id: str = Field(foreign_key="rollout.id", index=True, max_length=64)
    action: str = Field(max_length=16)
    reason: str = Field(default="", max_length=512)
    actor: str = Field(default="", max_length=128)
    keep_devices: bool = False
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    applied_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class CommandOutbox(SQLModel, table=True):
    __table_args__ = (Index("ix_commandoutbox_unsent", "sent_at", "created_at"),)
    #: the command id (deterministic for rollout commands)
    id: str = Field(primary_key=True, max_length=64)
    rollout_id: str | None = Field(default=None, index=True, max_length=64)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=64)
    kind: str = Field(max_length=16)  # deploy | rollback
    stage: int | None = None
    attempt: int = 1
    #: deploy: the bundle; rollback: the target (None: the device's previous)
    bundle_sha256: str | None = Field(default=None, max_length=64)
    #: the encoded wire message, so a re-send is byte-for-byte the same command
    payload: str = Field(sa_type=String)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    sent_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    #: publishes (more than 1 only after a crash between publishing and recording it)
    send_count: int = 0
    claimed_by: str | None = Field(default=None, max_length=128)
    claimed_until: datetime | None = Field(default=None, sa_type=UTCDateTime)


class DeviceReconcile(SQLModel, table=True):
    device_id: str = Field(foreign_key="device.id", primary_key=True, max_length=64)
    desired_sha256: str = Field(max_length=64)
    sent_count: int = 0
    last_sent_at: datetime = Field(sa_type=UTCDateTime)
