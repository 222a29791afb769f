"""Every message on the wire: frozen, versioned pydantic models with a discriminated ``kind``.

Rules for both sides:
- unknown fields from a newer peer are ignored (``extra="ignore"``);
- a missing or malformed required field is a `MessageDecodeError` naming the field;
- each payload has a size limit, checked before parsing;
- ``schema_version`` is the major version of the message layout: a peer refuses a higher
  major version instead of guessing.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from protocol.errors import MessageDecodeError, MessageTooLargeError, TopicError
from protocol.limits import MAX_FEATURES, MAX_MESSAGE_BYTES, MAX_TELEMETRY_BYTES
from protocol.sketch import SketchWire
from protocol.topics import validate_device_id

__all__ = [
    "SCHEMA_VERSION",
    "BatteryReading",
    "Command",
    "DeployCommand",
    "Heartbeat",
    "InstallState",
    "Message",
    "Presence",
    "ReasonCode",
    "RollbackCommand",
    "StatusEvent",
    "TelemetryWindow",
    "decode_command",
    "decode_message",
    "encode_message",
    "new_id",
    "utcnow",
]

SCHEMA_VERSION = 1

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, Field(min_length=1, max_length=128)]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", str_max_length=4096)

    schema_version: int = SCHEMA_VERSION
    message_id: str = Field(default_factory=new_id, min_length=1, max_length=64)
    device_id: str
    sent_at: datetime = Field(default_factory=utcnow)

    @field_validator("device_id")
    @classmethod
    def _device_id_ok(cls, v: str) -> str:
        try:
            return validate_device_id(v)
        except TopicError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("schema_version")
    @classmethod
    def _major_ok(cls, v: int) -> int:
        if v < 1 or v > SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {v} is not supported (this side speaks 1..{SCHEMA_VERSION})"
            )
        return v


# -- commands (fleet -> device) ----------------------------------------------------------


class DeployCommand(_Wire):
    """Install this bundle (or run it in shadow beside the active model)."""

    kind: Literal["deploy"] = "deploy"
    command_id: str = Field(default_factory=new_id, min_length=1, max_length=64)
    bundle_sha256: Sha256Hex
    bundle_size: int = Field(ge=1)
    bundle_url: str = Field(max_length=2048)
    model_name: Name
    model_version: int = Field(ge=1)
    rollout_id: str | None = Field(default=None, max_length=64)
    shadow: bool = False
    shadow_sample_rate: float = Field(default=0.1, gt=0.0, le=1.0)


class RollbackCommand(_Wire):
    """Go back to a bundle this device ran before (its previous one when none is named)."""

    kind: Literal["rollback"] = "rollback"
    command_id: str = Field(default_factory=new_id, min_length=1, max_length=64)
    target_bundle_sha256: Sha256Hex | None = None
    rollout_id: str | None = Field(default=None, max_length=64)
    reason: str = Field(default="", max_length=512)


Command = Annotated[DeployCommand | RollbackCommand, Field(discriminator="kind")]


# -- events (device -> fleet) ------------------------------------------------------------


class InstallState(StrEnum):
    """States of the agent's install state machine, reported on each transition."""

    RECEIVED = "received"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    SELF_TEST = "self_test"
    SWITCHED = "switched"
    HEALTH_CHECK = "health_check"
    COMMITTED = "committed"  # the only state that means "the new version runs"
    REVERTED = "reverted"  # the new version failed after switching; the old one runs again
    REJECTED = "rejected"  # refused before touching the running model
    FAILED = "failed"  # gave up before switching; the old model still runs
    ROLLED_BACK = "rolled_back"  # an explicit rollback command completed


class ReasonCode(StrEnum):
    OK = "ok"
    BAD_COMMAND = "bad_command"
    DOWNLOAD_FAILED = "download_failed"
    TOO_LARGE = "too_large"
    BAD_SIGNATURE = "bad_signature"
    BAD_HASH = "bad_bundle_hash"
    BAD_FORMAT = "bad_bundle_format"
    EXPIRED = "bundle_expired"
    WRONG_TARGET = "wrong_target"
    OLD_VERSION = "old_version"
    DISK_FULL = "disk_full"
    LOAD_FAILED = "load_failed"
    SELF_TEST_FAILED = "self_test_failed"
    HEALTH_FAILED = "health_failed"
    NOTHING_TO_ROLL_BACK = "nothing_to_roll_back"
    INTERNAL = "internal_error"


class StatusEvent(_Wire):
    kind: Literal["status"] = "status"
    command_id: str | None = Field(default=None, max_length=64)
    rollout_id: str | None = Field(default=None, max_length=64)
    state: InstallState
    reason: ReasonCode = ReasonCode.OK
    detail: str = Field(default="", max_length=2048)
    bundle_sha256: Sha256Hex | None = None
    model_name: str | None = Field(default=None, max_length=128)
    model_version: int | None = None
    #: the bundle the device serves after this transition
    active_bundle_sha256: Sha256Hex | None = None
    progress: float | None = Field(default=None, ge=0.0, le=1.0)


class BatteryReading(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    level_pct: float | None = Field(default=None, ge=0.0, le=100.0)
    charging: bool | None = None
    power_w: float | None = None


class TelemetryWindow(_Wire):
    """What one device saw in one time window. ``seq`` lets the fleet drop duplicates."""

    kind: Literal["telemetry"] = "telemetry"
    #: identifies one run of the device's state (new when its state directory is new), so a
    #: wiped device restarting at seq 0 is not mistaken for a replay; dedup key is
    #: (device_id, stream_id, seq)
    stream_id: str = Field(default="", max_length=64)
    seq: int = Field(ge=0)
    window_start: datetime
    window_end: datetime
    bundle_sha256: Sha256Hex | None = None
    model_name: str | None = Field(default=None, max_length=128)
    model_version: int | None = None
    inference_count: int = Field(ge=0)
    error_counts: dict[Annotated[str, Field(max_length=64)], int] = Field(default_factory=dict)
    latency_ms: SketchWire | None = None
    input_sketches: dict[Annotated[str, Field(max_length=128)], SketchWire] = Field(
        default_factory=dict
    )
    output_class_counts: list[int] = Field(default_factory=list, max_length=4096)
    confidence: SketchWire | None = None
    #: absent means the device has no battery (or cannot read it), never "full"
    battery: BatteryReading | None = None
    cpu_temp_c: float | None = None
    load_1m: float | None = None
    mem_rss_bytes: int | None = None
    #: windows merged into this one when the outbox was full, and windows dropped
    merged_windows: int = Field(default=1, ge=1)
    dropped_windows: int = Field(default=0, ge=0)
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("input_sketches")
    @classmethod
    def _feature_limit(cls, v: dict[str, SketchWire]) -> dict[str, SketchWire]:
        if len(v) > MAX_FEATURES:
            raise ValueError(f"{len(v)} input sketches; at most {MAX_FEATURES}")
        return v


class Heartbeat(_Wire):
    """Periodic; carries the reported state that the fleet reconciles with the desired one."""

    kind: Literal["heartbeat"] = "heartbeat"
    profile: str = Field(max_length=64)
    agent_version: str = Field(max_length=64)
    active_bundle_sha256: Sha256Hex | None = None
    model_name: str | None = Field(default=None, max_length=128)
    model_version: int | None = None
    uptime_s: float = Field(ge=0.0)
    tags: tuple[Annotated[str, Field(max_length=64)], ...] = Field(default=(), max_length=32)


class Presence(_Wire):
    """Retained; the broker publishes the offline one as the device's last will."""

    kind: Literal["presence"] = "presence"
    online: bool


Message = Annotated[
    DeployCommand | RollbackCommand | StatusEvent | TelemetryWindow | Heartbeat | Presence,
    Field(discriminator="kind"),
]

_ADAPTER: TypeAdapter[Any] = TypeAdapter(Message)
_LIMITS = {"telemetry": MAX_TELEMETRY_BYTES}


def encode_message(msg: BaseModel) -> bytes:
    """Serialize a message to its JSON wire bytes."""
    data = msg.model_dump_json(exclude_none=False).encode("utf-8")
    kind = getattr(msg, "kind", "")
    limit = _LIMITS.get(kind, MAX_MESSAGE_BYTES)
    if len(data) > limit:
        raise MessageTooLargeError(f"{kind} message is {len(data)} bytes; the limit is {limit}")
    return data


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"]) or "<message>"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - 5
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def decode_message(raw: bytes, *, expect: type[BaseModel] | None = None) -> Any:
    """Parse wire bytes into a message, or raise MessageDecodeError naming the problem.

    ``expect`` restricts the accepted kind (e.g. a command topic carries only commands).
    """
    limit = MAX_TELEMETRY_BYTES if expect is TelemetryWindow else max(_LIMITS.values())
    if len(raw) > limit:
        raise MessageTooLargeError(f"message is {len(raw)} bytes; the limit is {limit}")
    try:
        msg = _ADAPTER.validate_json(raw)
    except ValidationError as exc:
        raise MessageDecodeError(f"invalid message: {_describe(exc)}") from exc
    kind_limit = _LIMITS.get(msg.kind, MAX_MESSAGE_BYTES)
    if len(raw) > kind_limit:
        raise MessageTooLargeError(
            f"{msg.kind} message is {len(raw)} bytes; the limit is {kind_limit}"
        )
    if expect is not None and not isinstance(msg, expect):
        raise MessageDecodeError(f"expected a {expect.__name__} message, got kind {msg.kind!r}")
    return msg


def decode_command(raw: bytes) -> DeployCommand | RollbackCommand:
    """Parse a command (deploy or rollback); anything else is a MessageDecodeError."""
    msg = decode_message(raw)
    if not isinstance(msg, DeployCommand | RollbackCommand):
        raise MessageDecodeError(f"expected a command, got kind {msg.kind!r}")
    return msg
