"""MQTT 5 packet framing: the few packets EdgeFleet's lean clients build and read.

paho-mqtt is the general client (TLS, QoS 2, reconnection policies); its Python costs
~100 us per message in and out, which the two hot paths cannot afford: the fleet's shared
telemetry subscription (`fleet/mqtt_receiver.py`) and the load generator's publishers
(`edgefleet/loadgen.py`), each thousands of messages a second on one core. Both build and
parse packets here: CONNECT, PUBLISH (QoS 0 and 1), PUBACK, SUBSCRIBE, UNSUBSCRIBE,
PINGREQ, DISCONNECT out; everything a broker sends back in.

Standard library only (protocol/ imports nothing of ours). Layouts are MQTT 5.0 (OASIS,
2019) section 3; every length read from the wire is checked against the buffer and
`MAX_PACKET_BYTES` before it is used.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from protocol.limits import MAX_TELEMETRY_BYTES

__all__ = [
    "CONNACK",
    "CONNECT",
    "DISCONNECT",
    "MAX_PACKET_BYTES",
    "PINGREQ",
    "PINGREQ_PACKET",
    "PINGRESP",
    "PUBACK",
    "PUBLISH",
    "SUBACK",
    "SUBSCRIBE",
    "UNSUBACK",
    "UNSUBSCRIBE",
    "MqttProtocolError",
    "Packet",
    "Will",
    "connect_packet",
    "disconnect_packet",
    "parse_packets",
    "properties_length",
    "puback_packet",
    "publish_head",
    "read_varint",
    "subscribe_packet",
    "unsubscribe_packet",
    "varint",
]

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 10, 11, 12, 13, 14
#: the largest packet a client accepts (a telemetry message plus its topic and header)
MAX_PACKET_BYTES = MAX_TELEMETRY_BYTES + 64 * 1024
PINGREQ_PACKET = bytes([PINGREQ << 4, 0])


class MqttProtocolError(Exception):
    """The peer sent something a client does not accept (the connection is dropped)."""


@dataclass(frozen=True, slots=True)
class Will:
    """A last will: published by the broker when the connection drops without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def varint(n: int) -> bytes:
    """``n`` as an MQTT variable byte integer (1-4 bytes)."""
    if not 0 <= n < 1 << 28:
        raise ValueError(f"{n} does not fit a variable byte integer")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack(">H", len(raw)) + raw


def _binary(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def connect_packet(
    client_id: str,
    *,
    clean_start: bool,
    keepalive_s: int,
    username: str | None = None,
    password: str | None = None,
    session_expiry_s: int | None = None,
    receive_maximum: int | None = None,
    max_packet_bytes: int | None = MAX_PACKET_BYTES,
    will: Will | None = None,
) -> bytes:
    """CONNECT. Properties are sent only when given (the broker's defaults otherwise)."""
    flags = (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    if clean_start:
        flags |= 0x02
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    props = b""
    if session_expiry_s is not None:
        props += b"\x11" + struct.pack(">I", session_expiry_s)
    if receive_maximum is not None:
        props += b"\x21" + struct.pack(">H", receive_maximum)
    if max_packet_bytes is not None:
        props += b"\x27" + struct.pack(">I", max_packet_bytes)
    body = b"\x00\x04MQTT\x05" + bytes([flags]) + struct.pack(">H", keepalive_s)
    body += varint(len(props)) + props + _utf8(client_id)
    if will is not None:
        body += b"\x00" + _utf8(will.topic) + _binary(will.payload)  # no will properties
    if username is not None:
        body += _utf8(username)
    if password is not None:
        body += _utf8(password)
    return _packet(CONNECT << 4, body)


def publish_head(topic: bytes, payload_len: int, *, pid: int, retain: bool = False) -> bytes:
    """Everything of a PUBLISH before its payload: QoS 1 with packet id ``pid``, or QoS 0
    when ``pid`` is 0; no properties. The caller sends the payload right after it, so a
    large payload is never copied into a packet of its own."""
    if pid:
        first = (PUBLISH << 4) | 0x02 | (1 if retain else 0)
        rest = struct.pack(">H", len(topic)) + topic + struct.pack(">H", pid) + b"\x00"
    else:
        first = (PUBLISH << 4) | (1 if retain else 0)
        rest = struct.pack(">H", len(topic)) + topic + b"\x00"
    return bytes([first]) + varint(len(rest) + payload_len) + rest


def puback_packet(pid: int) -> bytes:
    """PUBACK for packet id ``pid``, reason Success (the short form)."""
    return bytes([PUBACK << 4, 2, pid >> 8, pid & 0xFF])


def subscribe_packet(pid: int, filters: Sequence[str], *, qos: int = 1) -> bytes:
    body = struct.pack(">H", pid) + b"\x00" + b"".join(_utf8(f) + bytes([qos]) for f in filters)
    return _packet((SUBSCRIBE << 4) | 2, body)


def unsubscribe_packet(pid: int, filters: Sequence[str]) -> bytes:
    body = struct.pack(">H", pid) + b"\x00" + b"".join(_utf8(f) for f in filters)
    return _packet((UNSUBSCRIBE << 4) | 2, body)


def disconnect_packet(*, end_session: bool) -> bytes:
    """DISCONNECT, normal; ``end_session`` sets the Session Expiry Interval to 0."""
    props = b"\x11\x00\x00\x00\x00" if end_session else b""
    return _packet(DISCONNECT << 4, b"\x00" + varint(len(props)) + props)


def read_varint(buf: bytearray | bytes, at: int, end: int) -> tuple[int, int] | None:
    """(value, bytes used) of the variable byte integer at ``at``; None if cut off."""
    value = shift = 0
    for i in range(4):
        if at + i >= end:
            return None
        byte = buf[at + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    raise MqttProtocolError("malformed variable byte integer")


def properties_length(body: bytes, at: int) -> int:
    """Bytes taken by the property block at ``at`` (its length field included)."""
    got = read_varint(body, at, len(body))
    if got is None or at + got[0] + got[1] > len(body):
        raise MqttProtocolError("cut-off properties")
    return got[0] + got[1]


@dataclass(frozen=True, slots=True)
class Packet:
    """One packet other than PUBLISH: its type, flags and body."""

    kind: int
    flags: int
    body: bytes


def parse_packets(
    buf: bytearray, on_publish: Callable[[str, bytes, int, int], None]
) -> tuple[int, list[Packet]]:
    """Parse the whole packets at the start of ``buf``; PUBLISHes go to ``on_publish(topic,
    payload, packet id, qos)`` as they are read, the rest are returned. Returns how many
    bytes were consumed (a packet cut off at the end waits for more)."""
    pos, end = 0, len(buf)
    others: list[Packet] = []
    while end - pos >= 2:
        first = buf[pos]
        size = read_varint(buf, pos + 1, end)
        if size is None:
            break
        length, used = size
        if length > MAX_PACKET_BYTES:
            raise MqttProtocolError(f"a {length}-byte packet; the limit is {MAX_PACKET_BYTES}")
        start = pos + 1 + used
        stop = start + length
        if stop > end:
            break
        kind = first >> 4
        if kind == PUBLISH:
            qos = (first >> 1) & 3
            if qos == 3 or length < 2:
                raise MqttProtocolError("malformed PUBLISH")
            tlen = (buf[start] << 8) | buf[start + 1]
            at = start + 2 + tlen
            pid = 0
            if qos:
                pid = (buf[at] << 8) | buf[at + 1] if at + 2 <= stop else -1
                at += 2
            props = read_varint(buf, at, stop)
            if props is None or at + props[1] + props[0] > stop or pid < 0 or tlen == 0:
                raise MqttProtocolError("malformed PUBLISH")
            try:
                topic = buf[start + 2 : start + 2 + tlen].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MqttProtocolError("PUBLISH topic is not UTF-8") from exc
            on_publish(topic, bytes(buf[at + props[1] + props[0] : stop]), pid, qos)
        else:
            others.append(Packet(kind, first & 0x0F, bytes(buf[start:stop])))
        pos = stop
    return pos, others
