"""Every message on the wire: frozen, versioned pydantic models with a discriminated ``kind``.

Rules for both sides:
- unknown fields from a newer peer are ignored (``extra="ignore"``);
- a missing or malformed required field is a `MessageDecodeError` naming the field;
- each payload has a size limit, checked before parsing;
- ``schema_version`` is the major version of the message layout: a peer refuses a higher
  major version instead of guessing.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from protocol.errors import MessageDecodeError, MessageTooLargeError, TopicError
from protocol.limits import (
    MAX_CHUNK_BYTES,
    MAX_CHUNK_INDEXES,
    MAX_FEATURES,
    MAX_MESSAGE_BYTES,
    MAX_TELEMETRY_BYTES,
)
from protocol.sketch import FeatureSketch, SketchWire
from protocol.sketchpack import MAX_PACK_TEXT, read_pack
from protocol.topics import validate_device_id

__all__ = [
    "LABEL_LAG_BOUNDS_S",
    "SCHEMA_VERSION",
    "TELEMETRY_MAGIC",
    "BatteryReading",
    "BenchResult",
    "ChunkHeader",
    "ChunkRequest",
    "Command",
    "ConfidenceSums",
    "DeployCommand",
    "Heartbeat",
    "InstallState",
    "LabelCommand",
    "LabelEntry",
    "LabelReport",
    "LabelStats",
    "Message",
    "Presence",
    "ReasonCode",
    "RollbackCommand",
    "ShadowStats",
    "StatusEvent",
    "TelemetryWindow",
    "TrustRootCommand",
    "decode_chunk",
    "decode_command",
    "decode_message",
    "encode_chunk",
    "encode_message",
    "new_id",
    "split_telemetry_frame",
    "telemetry_json",
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
    #: how to fetch: chunks over MQTT (HTTP range as fallback) or HTTP only; None = agent's choice
    transfer: Literal["mqtt", "http"] | None = None


class RollbackCommand(_Wire):
    """Go back to a bundle this device ran before (its previous one when none is named)."""

    kind: Literal["rollback"] = "rollback"
    command_id: str = Field(default_factory=new_id, min_length=1, max_length=64)
    target_bundle_sha256: Sha256Hex | None = None
    rollout_id: str | None = Field(default=None, max_length=64)
    reason: str = Field(default="", max_length=512)


class TrustRootCommand(_Wire):
    """Install newer trust roots: root documents (JSON text), each version's successor.

    The device walks them from its installed version with `TrustRoot.update_chain`; a chain
    that does not verify is refused and the installed root stays.
    """

    kind: Literal["trust_root"] = "trust_root"
    command_id: str = Field(default_factory=new_id, min_length=1, max_length=64)
    roots: tuple[Annotated[str, Field(max_length=MAX_MESSAGE_BYTES)], ...] = Field(
        min_length=1, max_length=64
    )
    model_config = ConfigDict(frozen=True, extra="ignore", str_max_length=MAX_MESSAGE_BYTES)


class LabelEntry(BaseModel):
    """One true label for a prediction the device made, named by id or by input hash."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    prediction_id: str | None = Field(default=None, min_length=1, max_length=64)
    input_hash: Sha256Hex | None = None
    #: class index, class name, or one of those per row of a batched prediction
    label: int | str | list[int | str]
    labeled_at: datetime | None = None


class LabelCommand(_Wire):
    """Ground truth that reached the fleet (REST): the device joins it to its predictions."""

    kind: Literal["label"] = "label"
    command_id: str = Field(default_factory=new_id, min_length=1, max_length=64)
    labels: tuple[LabelEntry, ...] = Field(min_length=1, max_length=1000)


Command = Annotated[
    DeployCommand | RollbackCommand | TrustRootCommand | LabelCommand, Field(discriminator="kind")
]


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
    SHADOWING = "shadowing"  # a shadow deploy is installed beside the active model (not served)


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


class ShadowStats(BaseModel):
    """How a shadow candidate compared with the served model on sampled real inputs."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    bundle_sha256: Sha256Hex
    samples: int = Field(ge=0)
    #: fraction of samples where both models' top-1 class agree (classifiers only)
    top1_agreement: float | None = Field(default=None, ge=0.0, le=1.0)
    #: mean absolute difference of the first output, over every value of every sample
    mean_abs_error: float | None = Field(default=None, ge=0.0)
    latency_ms: SketchWire | None = None
    errors: int = Field(default=0, ge=0)
    #: samples skipped because the shadow queue was full (the served path never waits)
    skipped: int = Field(default=0, ge=0)


#: upper bounds (s) of the label-lag histogram buckets; one more bucket counts the rest
LABEL_LAG_BOUNDS_S: tuple[float, ...] = (
    60.0, 300.0, 900.0, 3600.0, 3 * 3600.0, 6 * 3600.0, 12 * 3600.0, 86400.0, 2 * 86400.0,
    7 * 86400.0,
)  # fmt: skip


class LabelStats(BaseModel):
    """Labels joined on the device to predictions of one model, made in one hour.

    Everything merges by addition: ``confusion`` holds [predicted, true, count] cells (a
    sparse confusion matrix), ``lag_counts`` a histogram over `LABEL_LAG_BOUNDS_S`.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")
    bundle_sha256: Sha256Hex | None = None
    model_name: str | None = Field(default=None, max_length=128)
    model_version: int | None = None
    #: start of the hour (UTC) in which the labelled predictions were made
    predicted_hour: datetime
    confusion: list[tuple[int, int, int]] = Field(default_factory=list, max_length=4096)
    lag_counts: list[int] = Field(default_factory=list, max_length=64)
    lag_sum_s: float = Field(default=0.0, ge=0.0)
    #: joined labels whose lag exceeded the device's late threshold (still counted once)
    late: int = Field(default=0, ge=0)


class LabelReport(BaseModel):
    """Ground truth received by the device in one window: joined cells and refusals."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    joined: list[LabelStats] = Field(default_factory=list, max_length=256)
    #: labels not joined, by reason: unknown_prediction, duplicate, wrong_type
    rejected: dict[Annotated[str, Field(max_length=64)], int] = Field(default_factory=dict)


class ConfidenceSums(BaseModel):
    """The window's predictions summed for a label-free accuracy estimate (merge: add)."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    rows: int = Field(ge=0)
    #: sum over rows of the calibrated top-1 probability (estimated correct predictions)
    calibrated_max_sum: float = Field(ge=0.0)
    #: the same before calibration (softmax of the raw outputs)
    raw_max_sum: float = Field(ge=0.0)
    #: per class, the sum of calibrated predicted probabilities
    class_prob_sums: list[float] = Field(default_factory=list, max_length=4096)
    #: False when the bundle carries no calibration map (calibrated = raw)
    calibrated: bool = False


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
    #: per-feature input sketches as JSON objects (agents before the pack; still accepted)
    input_sketches: dict[Annotated[str, Field(max_length=128)], SketchWire] = Field(
        default_factory=dict
    )
    #: the same sketches packed (`protocol.sketchpack`): what agents send now, as raw bytes
    #: after the JSON in a telemetry frame (see `encode_message`); base64 text in the JSON
    #: form. Its structure is checked where it is read (`sketches()`, the fleet's drift
    #: tiler), not on every decode: ingest stores it as received and stays cheap.
    input_pack: str | bytes | None = Field(default=None, max_length=MAX_PACK_TEXT)
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
    shadow: ShadowStats | None = None
    #: ground truth joined on the device (absent: no labels arrived in this window)
    labels: LabelReport | None = None
    #: confidence sums for the label-free accuracy estimate (classifiers only)
    estimate: ConfidenceSums | None = None
    #: CPU time the agent's process used in the window (user + system), absent if unknown
    cpu_time_s: float | None = Field(default=None, ge=0.0)

    @field_validator("input_sketches")
    @classmethod
    def _feature_limit(cls, v: dict[str, SketchWire]) -> dict[str, SketchWire]:
        if len(v) > MAX_FEATURES:
            raise ValueError(f"{len(v)} input sketches; at most {MAX_FEATURES}")
        return v

    @field_serializer("input_pack", when_used="json")
    def _pack_as_text(self, v: str | bytes | None) -> str | None:
        # the JSON form (a REST body, a log line) carries the pack as base64 text
        return base64.b64encode(v).decode("ascii") if isinstance(v, bytes) else v

    @model_validator(mode="after")
    def _one_form(self) -> TelemetryWindow:
        if self.input_sketches and self.input_pack:
            raise ValueError("input_sketches and input_pack are two forms of one thing; send one")
        return self

    def sketches(self) -> dict[str, FeatureSketch]:
        """The input sketches, from whichever form the window carries (raises SketchError)."""
        if self.input_pack:
            return read_pack(self.input_pack).sketches()
        return {name: FeatureSketch.from_wire(w) for name, w in self.input_sketches.items()}


class BenchResult(BaseModel):
    """``edgefleet agent bench``: the installed model measured on the device itself."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    bundle_sha256: Sha256Hex
    measured_at: datetime
    backend: str = Field(max_length=256)
    batch: int = Field(ge=1)
    runs: int = Field(ge=1)
    latency_p50_ms: float = Field(ge=0.0)
    latency_p90_ms: float = Field(ge=0.0)
    latency_p99_ms: float = Field(ge=0.0)
    throughput_per_s: float = Field(ge=0.0)
    #: resident memory of the bench process after loading and running the model
    mem_rss_bytes: int | None = None
    load_ms: float | None = None


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
    #: the latest on-device benchmark of the active model, if one was run
    bench: BenchResult | None = None


class Presence(_Wire):
    """Retained; the broker publishes the offline one as the device's last will."""

    kind: Literal["presence"] = "presence"
    online: bool


class ChunkRequest(_Wire):
    """Device -> fleet on ``chunk_req``: send these chunks of a bundle on my ``chunk`` topic."""

    kind: Literal["chunk_request"] = "chunk_request"
    bundle_sha256: Sha256Hex
    chunk_size: int = Field(ge=4096, le=MAX_CHUNK_BYTES)
    indexes: tuple[Annotated[int, Field(ge=0)], ...] = Field(
        min_length=1, max_length=MAX_CHUNK_INDEXES
    )


class ChunkHeader(_Wire):
    """The JSON header of one chunk frame (fleet -> device on ``chunk``); raw bytes follow.

    ``error`` set means no data: the fleet cannot serve this bundle (e.g. unknown bundle).
    """

    kind: Literal["chunk"] = "chunk"
    bundle_sha256: Sha256Hex
    index: int = Field(ge=0)
    chunk_size: int = Field(ge=4096, le=MAX_CHUNK_BYTES)
    total_size: int = Field(ge=0)
    sha256: Sha256Hex | None = None
    error: str | None = Field(default=None, max_length=512)


Message = Annotated[
    DeployCommand
    | RollbackCommand
    | TrustRootCommand
    | LabelCommand
    | StatusEvent
    | TelemetryWindow
    | Heartbeat
    | Presence
    | ChunkRequest
    | ChunkHeader,
    Field(discriminator="kind"),
]

_ADAPTER: TypeAdapter[Any] = TypeAdapter(Message)
#: a telemetry frame's first bytes (a JSON message starts with "{")
TELEMETRY_MAGIC = b"EFT1"
_LIMITS = {"telemetry": MAX_TELEMETRY_BYTES}


def encode_message(msg: BaseModel) -> bytes:
    """Serialize a message to its wire bytes: JSON, or a telemetry frame.

    A `TelemetryWindow` whose ``input_pack`` is bytes goes out as a frame: ``EFT1`` +
    4-byte big-endian JSON length + the window's JSON without the pack + the pack's raw
    bytes. Base64 inside JSON would cost the wire a third more and the fleet a decode of
    every window (~90 us each here, the larger part of merging it for drift).
    """
    kind = getattr(msg, "kind", "")
    pack = getattr(msg, "input_pack", None)
    if isinstance(pack, bytes):
        head = msg.model_dump_json(exclude={"input_pack"}).encode("utf-8")
        data = TELEMETRY_MAGIC + len(head).to_bytes(4, "big") + head + pack
    else:
        data = msg.model_dump_json(exclude_none=False).encode("utf-8")
    limit = _LIMITS.get(kind, MAX_MESSAGE_BYTES)
    if len(data) > limit:
        raise MessageTooLargeError(f"{kind} message is {len(data)} bytes; the limit is {limit}")
    return data


def split_telemetry_frame(raw: bytes) -> tuple[bytes, bytes | None]:
    """A message's JSON and, for a telemetry frame, its pack bytes (None for plain JSON).

    Raises MessageDecodeError for a frame whose header does not fit the payload.
    """
    n = _frame_json_length(raw)
    if n is None:
        return raw, None
    return raw[8 : 8 + n], raw[8 + n :]


def telemetry_json(raw: bytes) -> bytes:
    """A message's JSON alone (a frame's pack is not copied); as `split_telemetry_frame`."""
    n = _frame_json_length(raw)
    return raw if n is None else raw[8 : 8 + n]


def _frame_json_length(raw: bytes) -> int | None:
    if raw[:4] != TELEMETRY_MAGIC:
        return None
    n = int.from_bytes(raw[4:8], "big") if len(raw) >= 8 else -1
    if n < 2 or 8 + n > len(raw):
        raise MessageDecodeError(
            f"telemetry frame says its JSON is {n} bytes; the frame has {len(raw)}"
        )
    return n


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
    text, pack = split_telemetry_frame(raw)
    try:
        msg = _ADAPTER.validate_json(text)
    except ValidationError as exc:
        raise MessageDecodeError(f"invalid message: {_describe(exc)}") from exc
    if pack is not None:
        if not isinstance(msg, TelemetryWindow):
            raise MessageDecodeError(f"a telemetry frame holds a {msg.kind!r} message")
        if msg.input_pack is not None or msg.input_sketches:
            raise MessageDecodeError("telemetry frame's JSON carries sketches of its own")
        if len(pack) > MAX_PACK_TEXT:
            raise MessageTooLargeError(f"telemetry frame's pack is {len(pack)} bytes")
        if pack:
            # set on the just-validated message in place: model_copy cost ~20 us a window
            object.__setattr__(msg, "input_pack", pack)
            msg.__pydantic_fields_set__.add("input_pack")
    kind_limit = _LIMITS.get(msg.kind, MAX_MESSAGE_BYTES)
    if len(raw) > kind_limit:
        raise MessageTooLargeError(
            f"{msg.kind} message is {len(raw)} bytes; the limit is {kind_limit}"
        )
    if expect is not None and not isinstance(msg, expect):
        raise MessageDecodeError(f"expected a {expect.__name__} message, got kind {msg.kind!r}")
    return msg


def decode_command(
    raw: bytes,
) -> DeployCommand | RollbackCommand | TrustRootCommand | LabelCommand:
    """Parse a command (deploy, rollback, trust root, label); else a MessageDecodeError."""
    msg = decode_message(raw)
    if not isinstance(msg, DeployCommand | RollbackCommand | TrustRootCommand | LabelCommand):
        raise MessageDecodeError(f"expected a command, got kind {msg.kind!r}")
    return msg


# -- chunk frames: a small binary framing, so chunk bytes are not base64-inflated ---------

CHUNK_MAGIC = b"EFC1"
_CHUNK_HEADER_MAX = 4096


def encode_chunk(header: ChunkHeader, data: bytes) -> bytes:
    """``EFC1`` + 4-byte big-endian header length + header JSON + raw chunk bytes."""
    if len(data) > MAX_CHUNK_BYTES:
        raise MessageTooLargeError(f"chunk is {len(data)} bytes; the limit is {MAX_CHUNK_BYTES}")
    head = header.model_dump_json().encode("utf-8")
    if len(head) > _CHUNK_HEADER_MAX:
        raise MessageTooLargeError(f"chunk header is {len(head)} bytes")
    return CHUNK_MAGIC + len(head).to_bytes(4, "big") + head + data


def decode_chunk(raw: bytes) -> tuple[ChunkHeader, bytes]:
    """Split a chunk frame; MessageDecodeError if malformed, MessageTooLargeError if too big.

    The data's sha256 is NOT checked here (the receiver does, against ``header.sha256``).
    """
    if len(raw) > MAX_CHUNK_BYTES + _CHUNK_HEADER_MAX + 8:
        raise MessageTooLargeError(f"chunk frame is {len(raw)} bytes; too large")
    if len(raw) < 8 or raw[:4] != CHUNK_MAGIC:
        raise MessageDecodeError("not a chunk frame (missing EFC1 magic)")
    n = int.from_bytes(raw[4:8], "big")
    if n > _CHUNK_HEADER_MAX or 8 + n > len(raw):
        raise MessageDecodeError(f"chunk frame header length {n} is invalid")
    try:
        header = ChunkHeader.model_validate_json(raw[8 : 8 + n])
    except ValidationError as exc:
        raise MessageDecodeError(f"invalid chunk header: {_describe(exc)}") from exc
    data = raw[8 + n :]
    if len(data) > header.chunk_size:
        raise MessageDecodeError(f"chunk {header.index} carries more than chunk_size bytes")
    return header, data
