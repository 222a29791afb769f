"""The telemetry subscription's own MQTT 5 client against a real Mosquitto: every message
delivered, the unacknowledged ones again after a reconnect, a stopped session ended, a
taken-over connection won back, a bad password refused with its reason; and the packet
parser on a stream cut at every byte."""

from __future__ import annotations

import struct
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleet.broker_config import mosquitto_hash
from fleet.mqtt_receiver import PubAck, Receiver, ReceiverConfig, send_acks
from protocol.mqtt_wire import MAX_PACKET_BYTES, MqttProtocolError, parse_packets
from tests.broker import Broker

pytestmark = pytest.mark.integration

FILTER = "$share/fleet/edgefleet/v1/+/telemetry"


class Sink:
    """Collects (topic, payload, ack); acknowledges the messages ``ack_if`` says."""

    def __init__(self, ack_if: Callable[[bytes], bool] = lambda _p: True) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.ack_if = ack_if
        self.changed = threading.Condition()

    def __call__(self, topic: str, payload: bytes, ack: Callable[[], None]) -> None:
        if self.ack_if(payload):
            ack()
        with self.changed:
            self.got.append((topic, payload))
            self.changed.notify_all()

    def wait_for(self, n: int, timeout_s: float = 15.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.got) >= n, timeout_s), len(self.got)


def _receiver(broker: Broker, sink: Sink, client_id: str, **kw: object) -> Receiver:
    cfg = ReceiverConfig(
        host=broker.host, port=broker.port, client_id=client_id, subscriptions=(FILTER,),
        keepalive_s=5, reconnect_min_s=0.2, reconnect_max_s=0.5, **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    r = Receiver(cfg, sink)
    r.start()
    return r


def _wait(cond: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _publisher(broker: Broker, **auth: str) -> mqtt.Client:
    p = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5
    )
    if auth:
        p.username_pw_set(auth["username"], auth["password"])
    p.connect(broker.host, broker.port)
    p.loop_start()
    return p


def _publish(p: mqtt.Client, payloads: list[bytes]) -> None:
    infos = [
        p.publish(f"edgefleet/v1/dev-{i % 7}/telemetry", body, qos=1)
        for i, body in enumerate(payloads)
    ]
    for info in infos:
        info.wait_for_publish(10)


def test_every_message_arrives_and_the_unacknowledged_come_again(
    mosquitto_factory: Callable[..., Broker],
) -> None:
    broker = mosquitto_factory()
    # sizes around the read block (256 KiB) and the varint boundaries, and a 1 MiB window
    sizes = [0, 1, 127, 128, 16_383, 16_384, 9_208, 262_000, 300_000, 1024 * 1024]
    payloads = [
        struct.pack(">I", i) + bytes([i % 251]) * max(0, sizes[i % len(sizes)] - 4)
        for i in range(120)
    ]
    odd = lambda body: body[3] % 2 == 1  # noqa: E731
    client_id = f"fleet-{uuid.uuid4().hex[:6]}"
    first = Sink(ack_if=lambda body: not odd(body))
    # 60 messages stay unacknowledged: Mosquitto's default of 20 in flight would stall the
    # stream; the CONNECT's Receive Maximum lifts it
    r = _receiver(broker, first, client_id, receive_maximum=100)
    assert _wait(lambda: r.connected)
    pub = _publisher(broker)
    try:
        _publish(pub, payloads)
        first.wait_for(len(payloads))
        assert sorted(p for _, p in first.got) == sorted(payloads)  # each once, intact
        assert {t for t, _ in first.got} == {f"edgefleet/v1/dev-{i}/telemetry" for i in range(7)}
        r.stop(end_session=False)  # a crash, as the broker sees it: the session stays
        assert not r.connected

        again = Sink()
        r2 = _receiver(broker, again, client_id)
        unacked = sorted(p for p in payloads if odd(p))
        again.wait_for(len(unacked))
        time.sleep(0.3)
        assert sorted(p for _, p in again.got) == unacked
        r2.stop()  # a clean stop ends the session: nothing queues for it any more

        _publish(pub, payloads[:5])
        late = Sink()
        r3 = _receiver(broker, late, client_id)
        assert _wait(lambda: r3.connected)
        time.sleep(0.5)
        assert late.got == []
        r3.stop()
    finally:
        pub.loop_stop()
        pub.disconnect()


def test_acknowledgements_sent_together_count_each_message_once(
    mosquitto_factory: Callable[..., Broker],
) -> None:
    """The ingest worker acknowledges a batch with one `send_acks`: every message it names
    is settled (a reconnect brings back only the others), and a failing foreign ack in
    the same call does not stop the rest."""
    broker = mosquitto_factory()
    held: list[tuple[bytes, Callable[[], None]]] = []
    lock = threading.Lock()

    def hold(_topic: str, payload: bytes, ack: Callable[[], None]) -> None:
        with lock:
            held.append((payload, ack))

    client_id = f"fleet-{uuid.uuid4().hex[:6]}"
    r = _receiver(broker, hold, client_id, receive_maximum=200)  # type: ignore[arg-type]
    assert _wait(lambda: r.connected)
    payloads = [struct.pack(">I", i) + b"w" * 500 for i in range(150)]
    pub = _publisher(broker)
    try:
        _publish(pub, payloads)
        assert _wait(lambda: len(held) == len(payloads))
        assert all(isinstance(ack, PubAck) for _, ack in held)

        def broken() -> None:
            raise OSError("a connection that is gone")

        settled = [ack for body, ack in held if struct.unpack(">I", body[:4])[0] % 3]
        send_acks([*settled[:50], broken, *settled[50:]])
        time.sleep(0.3)
        r.stop(end_session=False)

        again = Sink()
        r2 = _receiver(broker, again, client_id)
        expected = sorted(p for p in payloads if struct.unpack(">I", p[:4])[0] % 3 == 0)
        again.wait_for(len(expected))
        time.sleep(0.3)
        assert sorted(p for _, p in again.got) == expected
        r2.stop()
    finally:
        pub.loop_stop()
        pub.disconnect()


def test_a_taken_over_connection_comes_back(mosquitto_factory: Callable[..., Broker]) -> None:
    broker = mosquitto_factory()
    sink = Sink()
    client_id = f"fleet-{uuid.uuid4().hex[:6]}"
    r = _receiver(broker, sink, client_id)
    assert _wait(lambda: r.connected)
    # another connection with the same client id: the broker drops ours (session taken over)
    thief = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    thief.connect(broker.host, broker.port)
    thief.disconnect()
    assert _wait(lambda: r.failed_attempts > 0 or r.last_error is not None, 5)
    assert _wait(lambda: r.connected)
    pub = _publisher(broker)
    try:
        _publish(pub, [b"after"])
        sink.wait_for(1)
    finally:
        pub.loop_stop()
        pub.disconnect()
        r.stop()


def test_a_wrong_password_is_refused_with_its_reason(
    mosquitto_factory: Callable[..., Broker], tmp_path: Path
) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text(f"fleet:{mosquitto_hash('right')}\n")
    passwd.chmod(0o600)
    broker = mosquitto_factory([f"password_file {passwd}"], allow_anonymous=False)
    bad = _receiver(broker, Sink(), "fleet-bad", username="fleet", password="wrong")
    sink = Sink()
    good = _receiver(broker, sink, "fleet-good", username="fleet", password="right")
    try:
        assert _wait(lambda: bad.last_error is not None)
        assert "refused the connection" in (bad.last_error or "") and not bad.connected
        assert _wait(lambda: good.connected)
        pub = _publisher(broker, username="fleet", password="right")
        _publish(pub, [b"x"])
        sink.wait_for(1)
        pub.loop_stop()
        pub.disconnect()
    finally:
        bad.stop()
        good.stop()


def _publish_packet(topic: str, payload: bytes, pid: int, props: bytes = b"") -> bytes:
    body = struct.pack(">H", len(topic)) + topic.encode() + struct.pack(">H", pid)
    body += bytes([len(props)]) + props + payload
    n, out = len(body), bytearray([0x32])
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            break
    return bytes(out) + body


def test_the_parser_reads_a_stream_cut_anywhere() -> None:
    stream = (
        _publish_packet("a/b", b"x" * 300, 7, props=b"\x01\x01")  # payload format indicator
        + bytes([0xD0, 0])  # PINGRESP
        + _publish_packet("c", b"", 8)
        + bytes([0x90, 4, 0, 1, 0, 1])  # SUBACK
    )
    whole: list[tuple[str, bytes, int, int]] = []
    used, others = parse_packets(bytearray(stream), lambda *a: whole.append(a))
    assert used == len(stream) and [p.kind for p in others] == [13, 9]
    assert whole == [("a/b", b"x" * 300, 7, 1), ("c", b"", 8, 1)]
    for cut in range(len(stream)):  # any split of the stream gives the same packets
        got: list[tuple[str, bytes, int, int]] = []
        buf = bytearray(stream[:cut])
        used, first = parse_packets(buf, lambda *a, got=got: got.append(a))
        del buf[:used]
        buf += stream[cut:]
        used2, second = parse_packets(buf, lambda *a, got=got: got.append(a))
        assert got == whole and used2 == len(buf)
        assert [p.kind for p in first + second] == [13, 9]
    for bad, _why in [
        (bytes([0x36, 2, 0, 0]), "QoS 3"),
        (bytes([0x30, 0xFF, 0xFF, 0xFF, 0x7F]), "over the limit"),
        (bytes([0x32, 7, 0, 2, 0xFF, 0xFE, 0, 1, 0]), "topic not UTF-8"),
        (bytes([0x32, 3, 0, 5, 0x61]), "topic past the end"),
    ]:  # fmt: skip
        with pytest.raises(MqttProtocolError):
            parse_packets(bytearray(bad), lambda *a: None)
    assert MAX_PACKET_BYTES > 1024 * 1024
