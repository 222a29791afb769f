"""protocol.mqtt_wire's outgoing packets against a real Mosquitto: a CONNECT with a last
will, QoS 0 and QoS 1 PUBLISHes built with `publish_head`, and what the broker answers.

paho is the independent reader here: what it receives is what the packets said.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from protocol.mqtt_wire import (
    CONNACK,
    PUBACK,
    SUBACK,
    Packet,
    Will,
    connect_packet,
    parse_packets,
    publish_head,
    subscribe_packet,
)
from tests.broker import Broker

pytestmark = pytest.mark.integration


class _Raw:
    """A blocking socket speaking only protocol.mqtt_wire."""

    def __init__(self, broker: Broker, packet: bytes) -> None:
        self.sock = socket.create_connection((broker.host, broker.port), timeout=10)
        self.buf = bytearray()
        self.published: list[tuple[str, bytes, int, int]] = []
        self.ready: list[Packet] = []
        self.sock.sendall(packet)

    def next_packet(self) -> Packet:
        while not self.ready:
            data = self.sock.recv(65536)
            assert data, "the broker closed the connection"
            self.buf += data
            used, packets = parse_packets(self.buf, lambda *a: self.published.append(a))
            del self.buf[:used]
            self.ready += packets
        return self.ready.pop(0)


class _Watcher:
    """A paho subscriber that records (topic, payload, qos, retain)."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.got: list[tuple[str, bytes, int, bool]] = []
        self.ready = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:8]}",
                        protocol=mqtt.MQTTv5)  # fmt: skip
        c.on_connect = lambda cl, *_: cl.subscribe(topic, 1)
        c.on_subscribe = lambda *_: self.ready.set()
        c.on_message = lambda _c, _u, m: self.got.append(
            (m.topic, bytes(m.payload), m.qos, bool(m.retain))
        )
        c.connect(broker.host, broker.port)
        c.loop_start()
        self.client = c
        assert self.ready.wait(10)

    def wait(self, n: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.got) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.got) >= n, self.got

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_publishes_arrive_intact_and_qos1_is_acknowledged(mosquitto: Broker) -> None:
    topic = f"wiretest/{uuid.uuid4().hex[:8]}/telemetry"
    watcher = _Watcher(mosquitto, topic)
    raw = _Raw(mosquitto, connect_packet("wire-pub", clean_start=True, keepalive_s=30))
    try:
        ack = raw.next_packet()
        assert ack.kind == CONNACK and ack.body[1] == 0
        payloads = [b"", b"x", bytes(range(256)) * 40, b"\x00" * 200_000]
        for i, p in enumerate(payloads):
            raw.sock.sendall(publish_head(topic.encode(), len(p), pid=i + 1) + p)
            puback = raw.next_packet()
            assert puback.kind == PUBACK and (puback.body[0] << 8 | puback.body[1]) == i + 1
        raw.sock.sendall(publish_head(topic.encode(), 3, pid=0) + b"qos")  # QoS 0: no answer
        watcher.wait(len(payloads) + 1)
        assert [g[1] for g in watcher.got] == [*payloads, b"qos"]
        assert [g[2] for g in watcher.got] == [1] * len(payloads) + [0]
    finally:
        raw.sock.close()
        watcher.close()


def test_last_will_is_published_retained_when_the_connection_drops(mosquitto: Broker) -> None:
    will_topic = f"wiretest/{uuid.uuid4().hex[:8]}/presence"
    will = Will(will_topic, b'{"online":false}', qos=1, retain=True)
    raw = _Raw(mosquitto, connect_packet("wire-will", clean_start=True, keepalive_s=30, will=will))
    assert raw.next_packet().kind == CONNACK
    # it can also subscribe, and the broker answers with granted QoS 1
    raw.sock.sendall(subscribe_packet(7, ["wiretest/none"]))
    sub = raw.next_packet()
    assert sub.kind == SUBACK and sub.body[:2] == b"\x00\x07" and sub.body[-1] == 1
    raw.sock.close()  # no DISCONNECT: the broker publishes the will
    watcher = _Watcher(mosquitto, will_topic)  # subscribes after: gets it as retained
    try:
        watcher.wait(1)
        assert watcher.got[0] == (will_topic, b'{"online":false}', 1, True)
    finally:
        watcher.close()
