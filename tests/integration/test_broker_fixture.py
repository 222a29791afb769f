"""The test broker fixtures work with MQTT 5, QoS 1 and shared subscriptions (paho 2.2)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.broker import Broker, mosquitto_config

pytestmark = pytest.mark.integration

TIMEOUT_S = 10.0


class Client:
    """A connected paho MQTT v5 client with its network loop running, collecting messages."""

    def __init__(self, broker: Broker, name: str) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{name}-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        assert self._connected.wait(TIMEOUT_S), f"{name} did not connect"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if not reason_code.is_failure:
            self._connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # type: ignore[no-untyped-def]
        if all(not rc.is_failure for rc in reason_codes):
            self._subscribed.set()

    def _on_message(self, client, userdata, message) -> None:  # type: ignore[no-untyped-def]
        self.messages.append(message)  # list.append is atomic; readers poll

    def subscribe(self, topic: str) -> None:
        """Subscribe at QoS 1 and wait for the SUBACK."""
        self._subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self._subscribed.wait(TIMEOUT_S), f"no SUBACK for {topic}"

    def close(self) -> None:
        """Disconnect and stop the network loop."""
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients(mosquitto: Broker) -> Iterator[Callable[[str], Client]]:
    """Make connected clients on the session broker; all disconnect after the test."""
    made: list[Client] = []

    def make(name: str) -> Client:
        client = Client(mosquitto, name)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` until it holds; fail after TIMEOUT_S."""
    deadline = time.monotonic() + TIMEOUT_S
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for messages"
        time.sleep(0.01)


def unique_topic() -> str:
    """A topic no other test uses."""
    return f"edgefleet-test/{uuid.uuid4().hex}"


def test_qos1_round_trip_with_v5_properties(clients: Callable[[str], Client]) -> None:
    topic = unique_topic()
    subscriber = clients("sub")
    subscriber.subscribe(topic)
    publisher = clients("pub")

    properties = Properties(PacketTypes.PUBLISH)
    properties.UserProperty = [("schema_version", "1")]
    info = publisher.client.publish(topic, b"hello", qos=1, properties=properties)
    info.wait_for_publish(TIMEOUT_S)
    assert info.is_published()

    wait_until(lambda: len(subscriber.messages) >= 1)
    (message,) = subscriber.messages
    assert message.topic == topic
    assert message.payload == b"hello"
    assert message.qos == 1
    assert message.properties is not None
    assert ("schema_version", "1") in message.properties.UserProperty


def test_shared_subscription_delivers_each_message_to_one_subscriber(
    clients: Callable[[str], Client],
) -> None:
    topic = unique_topic()
    workers = [clients("worker-a"), clients("worker-b")]
    for worker in workers:
        worker.subscribe(f"$share/ingest/{topic}")
    publisher = clients("pub")

    count = 20
    for index in range(count):
        publisher.client.publish(topic, str(index).encode(), qos=1).wait_for_publish(TIMEOUT_S)

    def total() -> int:
        return sum(len(worker.messages) for worker in workers)

    wait_until(lambda: total() >= count)
    payloads = [m.payload for worker in workers for m in worker.messages]
    assert sorted(payloads) == sorted(str(i).encode() for i in range(count))
    # Mosquitto spreads a share group round-robin: both workers take part.
    assert all(worker.messages for worker in workers)


def test_factory_broker_with_extra_config_stops_with_the_test(
    mosquitto_factory: Callable[..., Broker], clients: Callable[[str], Client]
) -> None:
    broker = mosquitto_factory(["max_keepalive 60"], name="custom")
    assert "max_keepalive 60" in broker.config_path.read_text()
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    client = Client(broker, "custom-client")
    try:
        client.subscribe(unique_topic())
    finally:
        client.close()
    assert broker.process.alive
    assert "mosquitto version" in broker.process.log_text()


def test_mosquitto_config_is_extendable() -> None:
    text = mosquitto_config(1883, ["password_file /x/passwd"], allow_anonymous=False)
    lines = text.splitlines()
    assert lines[0] == "listener 1883 127.0.0.1"
    assert "allow_anonymous false" in lines
    assert "persistence false" in lines
    assert "log_dest stdout" in lines
    assert lines[-1] == "password_file /x/passwd"
