"""MQTT topic builders and parsers: ``edgefleet/v1/<device_id>/<channel>``.

One level per device keeps every device inside its own subtree, so one broker ACL line
(``pattern readwrite edgefleet/v1/%u/#``) confines it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from protocol.errors import TopicError
from protocol.limits import MAX_DEVICE_ID_CHARS

__all__ = [
    "PREFIX",
    "Channel",
    "ParsedTopic",
    "all_devices_topic",
    "device_topic",
    "parse_topic",
    "shared_subscription",
    "validate_device_id",
]

PREFIX = "edgefleet/v1"

# Letters, digits, dot, dash and underscore: never MQTT wildcards, separators or control
# characters, and safe as a file name and a broker user name.
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class Channel(StrEnum):
    """The last topic level. Down: fleet to device. Up: device to fleet."""

    COMMAND = "cmd"  # down: deploy / rollback commands
    STATUS = "status"  # up: install state machine transitions
    TELEMETRY = "telemetry"  # up: one message per time window
    HEARTBEAT = "heartbeat"  # up: periodic, carries the reported state
    PRESENCE = "presence"  # up: retained; the last will says offline
    CHUNK_REQUEST = "chunk_req"  # up: the agent asks for bundle chunks (ChunkRequest)
    CHUNK = "chunk"  # down: one bundle chunk (binary frame, see protocol.messages.encode_chunk)

    @property
    def upward(self) -> bool:
        return self not in (Channel.COMMAND, Channel.CHUNK)


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    device_id: str
    channel: Channel


def validate_device_id(device_id: str) -> str:
    """Return device_id if it is a safe identifier, else raise TopicError saying why."""
    if not isinstance(device_id, str) or not device_id:
        raise TopicError("device id must be a non-empty string")
    if len(device_id) > MAX_DEVICE_ID_CHARS:
        raise TopicError(
            f"device id is {len(device_id)} characters; the limit is {MAX_DEVICE_ID_CHARS}"
        )
    if not _DEVICE_ID.fullmatch(device_id):
        bad = sorted({c for c in device_id if not re.fullmatch(r"[A-Za-z0-9._-]", c)})
        shown = ", ".join(repr(c) for c in bad) if bad else "a leading '.', '-' or '_'"
        raise TopicError(
            f"device id {device_id!r} has forbidden characters ({shown}); use letters, "
            "digits, '.', '-' and '_', starting with a letter or digit"
        )
    return device_id


def device_topic(device_id: str, channel: Channel | str) -> str:
    """The topic of one device's channel."""
    return f"{PREFIX}/{validate_device_id(device_id)}/{Channel(channel).value}"


def all_devices_topic(channel: Channel | str) -> str:
    """Subscription filter for one channel of every device."""
    return f"{PREFIX}/+/{Channel(channel).value}"


def shared_subscription(group: str, channel: Channel | str) -> str:
    """An MQTT 5 shared subscription, so N fleet workers split one channel's load."""
    validate_device_id(group)
    return f"$share/{group}/{all_devices_topic(channel)}"


def parse_topic(topic: str) -> ParsedTopic:
    """Split a concrete topic into device id and channel, or raise TopicError."""
    parts = topic.split("/")
    if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != PREFIX:
        raise TopicError(f"topic {topic!r} is not of the form {PREFIX}/<device_id>/<channel>")
    device_id = validate_device_id(parts[2])
    try:
        channel = Channel(parts[3])
    except ValueError:
        allowed = ", ".join(c.value for c in Channel)
        raise TopicError(
            f"topic {topic!r} has unknown channel {parts[3]!r}; one of {allowed}"
        ) from None
    return ParsedTopic(device_id=device_id, channel=channel)
