"""Ingest: apply one upward MQTT message to the database, or say why it was refused.

`handle` is the core: it decodes with `protocol.messages`, checks that the message's
device id is the topic's, and applies heartbeats, presence, status events and telemetry to
the given session without committing (the caller batches many messages in one
transaction). Problems with a message never raise: they come back as a rejected
`IngestResult`. Database errors do raise; the worker retries such messages one by one.

`IngestStats` keeps this process's counters for ``/metrics`` and ``/api/v1/stats``.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel
from sqlmodel import Session, select

from fleet.models import Bundle, Command, Device, DeviceEvent, TelemetryRecord, utcnow
from protocol.errors import MessageDecodeError, SketchError, TopicError
from protocol.messages import (
    Heartbeat,
    InstallState,
    Presence,
    StatusEvent,
    TelemetryWindow,
    decode_message,
)
from protocol.sketch import FeatureSketch
from protocol.topics import Channel, parse_topic

__all__ = ["IngestResult", "IngestStats", "Outcome", "Reason", "handle"]

log = logging.getLogger(__name__)

_EXPECTED: dict[Channel, type[BaseModel]] = {
    Channel.STATUS: StatusEvent,
    Channel.TELEMETRY: TelemetryWindow,
    Channel.HEARTBEAT: Heartbeat,
    Channel.PRESENCE: Presence,
}
#: after these transitions the device serves a different bundle than before
_BUNDLE_CHANGING = {InstallState.COMMITTED, InstallState.ROLLED_BACK, InstallState.REVERTED}


class Outcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


class Reason:
    """Rejection reasons (label values of ``edgefleet_fleet_messages_rejected_total``)."""

    BAD_TOPIC = TopicError.code  # "bad_topic"
    WRONG_CHANNEL = "wrong_channel"
    BAD_MESSAGE = MessageDecodeError.code  # "bad_message"
    TOO_LARGE = "message_too_large"
    DEVICE_MISMATCH = "device_mismatch"
    BAD_SKETCH = SketchError.code  # "bad_sketch"
    INTERNAL = "internal_error"


@dataclass(frozen=True, slots=True, kw_only=True)
class IngestResult:
    outcome: Outcome
    #: the message kind ("telemetry", ...) when it decoded, else None
    kind: str | None = None
    device_id: str | None = None
    reason: str | None = None
    detail: str = ""

    @staticmethod
    def rejected(
        reason: str, detail: str, *, kind: str | None = None, device_id: str | None = None
    ) -> IngestResult:
        return IngestResult(
            outcome=Outcome.REJECTED, reason=reason, detail=detail, kind=kind, device_id=device_id
        )


class IngestStats:
    """Thread-safe counters of what this process ingested."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._received = 0
        self._stored: Counter[str] = Counter()
        self._duplicates: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()

    def record(self, result: IngestResult) -> None:
        """Count one handled message (call after its transaction committed)."""
        with self._lock:
            self._received += 1
            kind = result.kind or "unknown"
            if result.outcome is Outcome.STORED:
                self._stored[kind] += 1
            elif result.outcome is Outcome.DUPLICATE:
                self._duplicates[kind] += 1
            else:
                self._rejected[result.reason or Reason.INTERNAL] += 1

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy: received, stored/duplicates by kind, rejected by reason."""
        with self._lock:
            return {
                "received": self._received,
                "stored": dict(self._stored),
                "duplicates": dict(self._duplicates),
                "rejected": dict(self._rejected),
            }


def handle(
    topic: str, payload: bytes, session: Session, *, now: datetime | None = None
) -> IngestResult:
    """Decode and apply one message to ``session`` (not committed); never raises for bad input."""
    now = now or utcnow()
    try:
        parsed = parse_topic(topic)
    except TopicError as exc:
        return IngestResult.rejected(Reason.BAD_TOPIC, str(exc))
    expected = _EXPECTED.get(parsed.channel)
    if expected is None:
        return IngestResult.rejected(
            Reason.WRONG_CHANNEL,
            f"topic {topic!r} is a downward channel; the fleet ingests only upward ones",
            device_id=parsed.device_id,
        )
    try:
        msg = decode_message(payload, expect=expected)
    except MessageDecodeError as exc:
        return IngestResult.rejected(exc.code, str(exc), device_id=parsed.device_id)
    if msg.device_id != parsed.device_id:
        return IngestResult.rejected(
            Reason.DEVICE_MISMATCH,
            f"message says device {msg.device_id!r} but came on {parsed.device_id!r}'s topic",
            kind=msg.kind,
            device_id=parsed.device_id,
        )
    if isinstance(msg, Heartbeat):
        return _heartbeat(msg, session, now)
    if isinstance(msg, Presence):
        return _presence(msg, session, now)
    if isinstance(msg, StatusEvent):
        return _status(msg, session, now)
    assert isinstance(msg, TelemetryWindow)
    return _telemetry(msg, session, now)


def _utc(value: datetime) -> datetime:
    """Device clocks may send naive timestamps; the wire contract means UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _device(
    session: Session, device_id: str, now: datetime, *, profile: str | None = None
) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        # TODO(trust issue): enrollment. In this spine any device id that may publish on
        # its own topic (broker ACL) registers itself with its first message.
        device = Device(id=device_id, profile=profile, auto_registered=True, registered_at=now)
        session.add(device)
        # rows that reference it may follow in this flush; without ORM relationships the
        # unit of work does not order inserts by foreign key
        session.flush()
        log.info("device %s registered itself (profile %s)", device_id, profile or "unknown")
    return device


def _seen(device: Device, now: datetime) -> None:
    device.online = True
    if device.last_seen is None or device.last_seen < now:
        device.last_seen = now


def _stored(msg: Any) -> IngestResult:
    return IngestResult(outcome=Outcome.STORED, kind=msg.kind, device_id=msg.device_id)


def _heartbeat(msg: Heartbeat, session: Session, now: datetime) -> IngestResult:
    device = _device(session, msg.device_id, now, profile=msg.profile)
    if device.profile != msg.profile:
        if device.profile is not None:
            log.warning(
                "device %s reports profile %r; it was registered as %r (the device wins)",
                msg.device_id,
                msg.profile,
                device.profile,
            )
        device.profile = msg.profile
    if msg.tags and not set(msg.tags) <= set(device.tags or []):
        device.tags = sorted({*(device.tags or []), *msg.tags})
    device.agent_version = msg.agent_version
    device.reported_bundle_sha256 = msg.active_bundle_sha256
    device.reported_model_name = msg.model_name
    device.reported_model_version = msg.model_version
    _seen(device, now)
    return _stored(msg)


def _presence(msg: Presence, session: Session, now: datetime) -> IngestResult:
    device = _device(session, msg.device_id, now)
    device.online = msg.online
    if msg.online:
        # Presence is retained: an old "online" replayed at subscribe time must not make a
        # long-silent device look fresh, so it counts as seen when it was sent.
        seen_at = min(_utc(msg.sent_at), now)
        if device.last_seen is None or device.last_seen < seen_at:
            device.last_seen = seen_at
    return _stored(msg)


def _status(msg: StatusEvent, session: Session, now: datetime) -> IngestResult:
    device = _device(session, msg.device_id, now)
    dup = session.exec(
        select(DeviceEvent.id).where(
            DeviceEvent.device_id == msg.device_id, DeviceEvent.message_id == msg.message_id
        )
    ).first()
    if dup is not None:
        return IngestResult(outcome=Outcome.DUPLICATE, kind=msg.kind, device_id=msg.device_id)
    session.add(
        DeviceEvent(
            device_id=msg.device_id,
            message_id=msg.message_id,
            command_id=msg.command_id,
            rollout_id=msg.rollout_id,
            state=msg.state.value,
            reason=msg.reason.value,
            detail=msg.detail,
            bundle_sha256=msg.bundle_sha256,
            active_bundle_sha256=msg.active_bundle_sha256,
            model_name=msg.model_name,
            model_version=msg.model_version,
            progress=msg.progress,
            sent_at=_utc(msg.sent_at),
            at=now,
        )
    )
    if msg.command_id is not None:
        command = session.get(Command, msg.command_id)
        if command is not None and command.device_id == msg.device_id:
            command.state = msg.state.value
            command.updated_at = now
    if msg.state in _BUNDLE_CHANGING:
        _update_reported_bundle(device, msg, session)
    _seen(device, now)
    return _stored(msg)


def _update_reported_bundle(device: Device, msg: StatusEvent, session: Session) -> None:
    active = msg.active_bundle_sha256
    if active is None and msg.state is InstallState.COMMITTED:
        active = msg.bundle_sha256
    if active is None:
        return  # the device did not say; its next heartbeat will
    device.reported_bundle_sha256 = active
    known = session.get(Bundle, active)
    if known is not None:
        device.reported_model_name = known.model_name
        device.reported_model_version = known.model_version
    elif msg.state is InstallState.COMMITTED and active == msg.bundle_sha256:
        device.reported_model_name = msg.model_name
        device.reported_model_version = msg.model_version
    else:
        device.reported_model_name = device.reported_model_version = None


def _telemetry(msg: TelemetryWindow, session: Session, now: datetime) -> IngestResult:
    dup = session.exec(
        select(TelemetryRecord.id).where(
            TelemetryRecord.device_id == msg.device_id,
            TelemetryRecord.stream_id == msg.stream_id,
            TelemetryRecord.seq == msg.seq,
        )
    ).first()
    if dup is not None:
        device = session.get(Device, msg.device_id)
        if device is not None:
            _seen(device, now)
        return IngestResult(outcome=Outcome.DUPLICATE, kind=msg.kind, device_id=msg.device_id)
    p50 = p95 = p99 = None
    latency_count = 0
    if msg.latency_ms is not None and msg.latency_ms.count > 0:
        try:
            sketch = FeatureSketch.from_wire(msg.latency_ms)
        except SketchError as exc:
            return IngestResult.rejected(
                Reason.BAD_SKETCH, f"latency_ms: {exc}", kind=msg.kind, device_id=msg.device_id
            )
        latency_count = sketch.count
        if not sketch.empty:
            p50, p95, p99 = sketch.quantiles((0.5, 0.95, 0.99))
    device = _device(session, msg.device_id, now)
    session.add(
        TelemetryRecord(
            device_id=msg.device_id,
            stream_id=msg.stream_id,
            seq=msg.seq,
            window_start=_utc(msg.window_start),
            window_end=_utc(msg.window_end),
            received_at=now,
            bundle_sha256=msg.bundle_sha256,
            model_name=msg.model_name,
            model_version=msg.model_version,
            inference_count=msg.inference_count,
            error_count=sum(msg.error_counts.values()),
            latency_count=latency_count,
            latency_p50_ms=p50,
            latency_p95_ms=p95,
            latency_p99_ms=p99,
            window=msg.model_dump(mode="json"),
        )
    )
    _seen(device, now)
    return _stored(msg)
