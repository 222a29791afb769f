"""The fleet's MQTT connections: shared-subscription ingest in, QoS 1 commands out.

Three connections, each with its own thread: telemetry in (`fleet.mqtt_receiver`, a lean
MQTT 5 subscriber: paho's receive path cost ~120 us of Python per message), the control
channels in (paho), commands out (paho). Incoming messages are handed to a callback (the
ingest worker's `submit`) with an ``ack`` to call once they are stored; commands are
published with QoS 1 and `publish_commands` returns once the broker acknowledged (PUBACK).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from fleet.errors import BrokerUnavailable
from fleet.mqtt_receiver import Receiver, ReceiverConfig
from fleet.settings import FleetSettings
from protocol.messages import DeployCommand, RollbackCommand, encode_message
from protocol.topics import Channel, device_topic, shared_subscription

__all__ = ["FleetMqtt", "MessageSink", "client_id_for_process"]

log = logging.getLogger(__name__)

#: (topic, payload, ack): ``ack()`` sends the PUBACK; call it only once the message is stored
MessageSink = Callable[[str, bytes, Callable[[], None]], None]

RECONNECT_MIN_DELAY_S = 1
RECONNECT_MAX_DELAY_S = 30
UPWARD_CHANNELS = (Channel.STATUS, Channel.TELEMETRY, Channel.HEARTBEAT, Channel.PRESENCE)
TELEMETRY_CHANNELS = (Channel.TELEMETRY,)
CONTROL_CHANNELS = (Channel.STATUS, Channel.HEARTBEAT, Channel.PRESENCE)


def client_id_for_process(settings: FleetSettings | None = None) -> str:
    """The broker identity of this fleet process: stable across restarts of the same service.

    A killed process's session lives on at the broker (session expiry) and keeps receiving
    its share of the shared subscriptions; a restart with the same client id takes that
    session over and reads what queued there, instead of leaving it to expire unread.
    """
    if settings is not None and settings.mqtt_client_id:
        return settings.mqtt_client_id
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in "-_")[:24] or "host"
    if settings is not None:
        return f"edgefleet-fleet-{host}-{settings.http_port}"
    return f"edgefleet-fleet-{host}-{os.getpid()}-{secrets.token_hex(3)}"


class FleetMqtt:
    """Owns the three connections; `start` connects in the background and keeps reconnecting."""

    def __init__(
        self, settings: FleetSettings, sink: MessageSink, *, client_id: str | None = None
    ) -> None:
        self._settings = settings
        self._sink = sink
        self.client_id = client_id or client_id_for_process(settings)
        self._connected = threading.Event()
        self._failed_attempts = 0
        self._stopping = False
        # Telemetry and the control channels (status, heartbeat, presence) come in on two
        # connections, each with its own network thread: when telemetry backs up and its
        # thread blocks (back-pressure), a rollout's answers are still read, and the ingest
        # worker serves them first (fleet/worker.py).
        group = settings.mqtt_share_group
        password = settings.mqtt_password.get_secret_value() if settings.mqtt_password else None
        self._telemetry = Receiver(
            ReceiverConfig(
                host=settings.mqtt_host,
                port=settings.mqtt_port,
                client_id=self.client_id,
                subscriptions=tuple(shared_subscription(group, ch) for ch in TELEMETRY_CHANNELS),
                # a session from before the split into connections still has these
                unsubscriptions=tuple(
                    shared_subscription(group, ch)
                    for ch in UPWARD_CHANNELS
                    if ch not in TELEMETRY_CHANNELS
                ),
                username=settings.mqtt_username,
                password=password if settings.mqtt_username is not None else None,
                keepalive_s=settings.mqtt_keepalive_s,
                session_expiry_s=settings.mqtt_session_expiry_s,
                receive_maximum=settings.mqtt_receive_maximum,
                reconnect_min_s=RECONNECT_MIN_DELAY_S,
                reconnect_max_s=RECONNECT_MAX_DELAY_S,
            ),
            sink,
            on_connected=self._on_telemetry_connected,
        )
        self._control = self._subscriber(f"{self.client_id}-ctl", CONTROL_CHANNELS)
        self._control_connected = threading.Event()
        # Commands go out on a connection of their own. On the ingest connection a command's
        # PUBACK waited behind the telemetry backlog: when ingest falls behind, its network
        # thread blocks (back-pressure) and reads nothing, acknowledgements included, so a
        # rollout's commands timed out exactly when the fleet was busiest.
        commands = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"{self.client_id}-cmd",
            protocol=paho.MQTTv5,
        )
        self._credentials(commands)
        # a rollout stage publishes thousands at once (publish_commands): keep 100 in
        # flight and queue the rest in paho, instead of paho's default of 20
        commands.max_inflight_messages_set(100)
        commands.max_queued_messages_set(0)
        commands.reconnect_delay_set(RECONNECT_MIN_DELAY_S, RECONNECT_MAX_DELAY_S)
        commands.on_connect = self._on_commands_connect
        self._commands = commands
        self._commands_connected = threading.Event()

    def _subscriber(self, client_id: str, channels: tuple[Channel, ...]) -> paho.Client:
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
            # PUBACK only after the message is committed to the database: a crash between
            # receipt and commit leaves it un-acknowledged, and the broker sends it again.
            manual_ack=True,
            userdata=channels,
        )
        self._credentials(client)
        client.reconnect_delay_set(RECONNECT_MIN_DELAY_S, RECONNECT_MAX_DELAY_S)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_connect_fail = self._on_connect_fail
        return client

    def _credentials(self, client: paho.Client) -> None:
        settings = self._settings
        if settings.mqtt_username is not None:
            password = settings.mqtt_password.get_secret_value() if settings.mqtt_password else None
            client.username_pw_set(settings.mqtt_username, password)

    @property
    def connected(self) -> bool:
        return self._connected.is_set() and self._control_connected.is_set()

    def start(self) -> None:
        """Connect in the background; a broker that is down is retried with backoff."""
        self._telemetry.start()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        # Keep the session (subscriptions, queued QoS 1 messages) across reconnects.
        props.SessionExpiryInterval = self._settings.mqtt_session_expiry_s
        # Without it Mosquitto sends at most 20 messages ahead of their PUBACKs; those are
        # sent after each batch commits, so a batch held at most 20 messages
        props.ReceiveMaximum = self._settings.mqtt_receive_maximum
        self._control.connect_async(
            self._settings.mqtt_host,
            self._settings.mqtt_port,
            keepalive=self._settings.mqtt_keepalive_s,
            clean_start=False,
            properties=props,
        )
        self._control.loop_start()
        # publishes only: a clean session, nothing to keep at the broker
        self._commands.connect_async(
            self._settings.mqtt_host,
            self._settings.mqtt_port,
            keepalive=self._settings.mqtt_keepalive_s,
            clean_start=True,
        )
        self._commands.loop_start()
        log.info(
            "MQTT client %s connecting to %s:%d",
            self.client_id,
            self._settings.mqtt_host,
            self._settings.mqtt_port,
        )

    def wait_connected(self, timeout_s: float) -> bool:
        """True once connected (and subscribed requests sent) within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        return self._connected.wait(timeout_s) and self._control_connected.wait(
            max(0.0, deadline - time.monotonic())
        )

    def stop(self) -> None:
        """Disconnect and end the session at the broker (so nothing queues for a dead worker)."""
        self._stopping = True
        try:
            self._telemetry.stop(end_session=True)
            props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0
            self._control.disconnect(properties=props)
            self._commands.disconnect()
        finally:
            for client in (self._control, self._commands):
                client.loop_stop()
            self._connected.clear()
            self._control_connected.clear()
            self._commands_connected.clear()

    def publish_command(self, command: DeployCommand | RollbackCommand) -> None:
        """Publish with QoS 1 and wait for PUBACK; raise BrokerUnavailable otherwise."""
        [error] = self.publish_commands([command])
        if error is not None:
            raise error

    def publish_commands(
        self, commands: Sequence[DeployCommand | RollbackCommand]
    ) -> list[Exception | None]:
        """Publish a batch on the command connection, then wait for every PUBACK.

        One result per command: None when acknowledged, else the error (the outbox keeps
        that row and sends it again later; the device drops a repeated command id). The
        rollout outbox uses this for a stage's commands: one client pipelines them (100 in
        flight) instead of one thread per command waiting for its own PUBACK.
        """
        where = f"{self._settings.mqtt_host}:{self._settings.mqtt_port}"
        # paho would queue a message while disconnected and send it after reconnecting; a
        # command we report as failed must not arrive later, so refuse up front. Just
        # started: the command connection may be a moment behind the ingest one.
        if commands and not self._commands.is_connected():
            self._commands_connected.wait(min(2.0, self._settings.publish_timeout_s))
        if not self._commands.is_connected():
            down = BrokerUnavailable(f"MQTT broker {where} is not connected; nothing was sent")
            return [down for _ in commands]
        infos: list[paho.MQTTMessageInfo | Exception] = []
        for command in commands:
            topic = device_topic(command.device_id, Channel.COMMAND)
            try:
                infos.append(self._commands.publish(topic, encode_message(command), qos=1))
            except (RuntimeError, ValueError) as exc:
                infos.append(BrokerUnavailable(f"MQTT broker {where} refused a command: {exc}"))
        # the batch's time: the single-command timeout plus the broker's pace for the rest
        deadline = time.monotonic() + self._settings.publish_timeout_s + 0.005 * len(commands)
        out: list[Exception | None] = []
        for info in infos:
            if isinstance(info, Exception):
                out.append(info)
                continue
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:
                out.append(BrokerUnavailable(f"MQTT broker {where} refused a command: {exc}"))
                continue
            out.append(
                None
                if info.is_published()
                else BrokerUnavailable(
                    f"MQTT broker {where} did not acknowledge a command in time "
                    "(it may still be delivered)"
                )
            )
        return out

    # -- paho callbacks (network thread) --------------------------------------------------
    def _on_connect(
        self, client: paho.Client, channels: Any, flags: Any, reason_code: Any, _properties: Any
    ) -> None:
        if reason_code.is_failure:
            log.error("MQTT broker refused the connection: %s", reason_code)
            return
        group = self._settings.mqtt_share_group
        subs = [(shared_subscription(group, ch), SubscribeOptions(qos=1)) for ch in channels]
        # Subscribe every time: harmless when the session kept them, needed when it did not;
        # drop the other channels (a session from before the split still has them)
        client.subscribe(subs)
        others = [shared_subscription(group, ch) for ch in UPWARD_CHANNELS if ch not in channels]
        client.unsubscribe(others)
        self._control_connected.set()
        self._failed_attempts = 0
        log.info(
            "MQTT connected (session present: %s); subscribed to %s",
            getattr(flags, "session_present", None),
            ", ".join(s for s, _ in subs),
        )

    def _on_commands_connect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason_code: Any, _props: Any
    ) -> None:
        if reason_code.is_failure:
            log.error("MQTT broker refused the command connection: %s", reason_code)
            self._commands_connected.clear()
            return
        self._commands_connected.set()

    def _on_connect_fail(self, _client: paho.Client, _userdata: Any) -> None:
        self._failed_attempts += 1
        # the first failure, then every 10th, so a long outage does not flood the log
        if self._failed_attempts % 10 == 1:
            log.warning(
                "cannot connect to MQTT broker %s:%d (attempt %d); retrying with backoff",
                self._settings.mqtt_host,
                self._settings.mqtt_port,
                self._failed_attempts,
            )

    def _on_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason_code: Any, _properties: Any
    ) -> None:
        was = self._control_connected.is_set()
        self._control_connected.clear()
        if was and not self._stopping:
            log.warning("MQTT disconnected (%s); reconnecting with backoff", reason_code)

    def _on_telemetry_connected(self, up: bool) -> None:
        if up:
            self._connected.set()
            return
        self._connected.clear()
        if not self._stopping:
            log.warning(
                "MQTT telemetry connection lost (%s); reconnecting with backoff",
                self._telemetry.last_error or "closed",
            )

    def _on_message(self, client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        mid, qos = msg.mid, msg.qos

        def ack() -> None:
            client.ack(mid, qos)

        try:
            self._sink(msg.topic, bytes(msg.payload), ack)
        except Exception:  # an exception here would end paho's network loop
            log.exception("could not hand a message on %s to ingest", msg.topic)
