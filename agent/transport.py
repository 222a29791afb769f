"""The MQTT seam: a small `Transport` interface and its paho-mqtt implementation.

Everything the agent says or hears goes through `Transport`; tests use a fake that records
publishes. Callbacks arrive on the transport's own thread and must stay short: the agent
only queues work from them.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from agent.errors import AgentError

__all__ = ["MessageHandler", "PahoTransport", "Publication", "Transport", "TransportHooks"]

log = logging.getLogger(__name__)

#: called with (topic, payload) for each message on a subscribed topic
MessageHandler = Callable[[str, bytes], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class Publication:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportHooks:
    on_connected: Callable[[], None]
    on_disconnected: Callable[[], None]
    #: a QoS 1 publish with this message id was acknowledged by the broker
    on_acked: Callable[[int], None]


class Transport(Protocol):
    """What the agent needs from a message broker connection."""

    @property
    def connected(self) -> bool: ...

    def set_hooks(self, hooks: TransportHooks) -> None: ...

    def start(self) -> None:
        """Begin connecting (in the background, retrying until stopped)."""
        ...

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> int | None:
        """Send a message; its message id, or None when it could not be handed over."""
        ...

    def subscribe(self, topic: str, handler: MessageHandler) -> None:
        """Receive messages on ``topic`` (kept across reconnects)."""
        ...

    def stop(self) -> None:
        """Say goodbye (offline presence), disconnect and stop the background work."""
        ...


class PahoTransport:
    """paho-mqtt 2.x, MQTT 5, QoS 1, a persistent session, retained presence and last will.

    ``birth`` is published retained after every connect and ``will`` is registered as the
    last will (and published by `stop`, since a clean disconnect suppresses the will).
    The first connect is retried in a background thread with jittered exponential backoff
    (tenacity), so a fleet of devices booting while the broker is down does not hammer it in
    lockstep; later reconnects use paho's exponential backoff from a per-process random
    minimum delay, for the same reason.
    """

    def __init__(
        self,
        *,
        client_id: str,
        host: str,
        port: int,
        username: str | None = None,
        password: str | None = None,
        keepalive_s: int = 30,
        session_expiry_s: int = 7 * 24 * 3600,
        birth: Callable[[], Publication],
        will: Callable[[], Publication],
        max_reconnect_delay_s: int = 30,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self._mqtt = mqtt
        self.host, self.port, self.keepalive_s = host, port, keepalive_s
        self._birth, self._will = birth, will
        self._hooks: TransportHooks | None = None
        self._subs: dict[str, MessageHandler] = {}
        self._connected = threading.Event()
        self._halt = threading.Event()
        self._starter: threading.Thread | None = None
        self._max_delay_s = max_reconnect_delay_s
        self.connect_attempts = 0
        self._stopping = False
        self._lock = threading.Lock()
        self._client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        will_msg = will()
        self._client.will_set(will_msg.topic, will_msg.payload, qos=will_msg.qos, retain=True)
        self._client.reconnect_delay_set(
            min_delay=random.uniform(1.0, 3.0),  # type: ignore[arg-type]  # floats work
            max_delay=max_reconnect_delay_s,
        )
        self._props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        self._props.SessionExpiryInterval = session_expiry_s
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def set_hooks(self, hooks: TransportHooks) -> None:
        self._hooks = hooks

    def start(self) -> None:
        if not self.host or not 0 < self.port < 65536:
            raise AgentError(f"cannot connect to MQTT {self.host!r}:{self.port}: bad address")
        self._starter = threading.Thread(
            target=self._first_connect, name="mqtt-connect", daemon=True
        )
        self._starter.start()

    def _first_connect(self) -> None:
        import tenacity

        def attempt() -> None:
            self.connect_attempts += 1
            self._client.connect(
                self.host,
                self.port,
                keepalive=self.keepalive_s,
                clean_start=False,  # keep the session: commands sent while offline arrive later
                properties=self._props,
            )

        def log_retry(state: tenacity.RetryCallState) -> None:
            if state.attempt_number in (1, 5) or state.attempt_number % 20 == 0:
                log.warning(
                    "cannot reach MQTT %s:%d (attempt %d: %s); retrying with backoff",
                    self.host,
                    self.port,
                    state.attempt_number,
                    state.outcome.exception() if state.outcome else "?",
                )

        try:
            tenacity.Retrying(
                retry=tenacity.retry_if_exception_type((OSError, ValueError)),
                wait=tenacity.wait_random_exponential(multiplier=0.5, max=self._max_delay_s),
                stop=lambda _state: self._halt.is_set(),
                sleep=self._halt.wait,
                before_sleep=log_retry,
                reraise=True,
            )(attempt)
        except (OSError, ValueError) as exc:
            log.info("gave up connecting to MQTT (stopping): %s", exc)
            return
        if self._halt.is_set():
            return
        self._client.loop_start()  # paho reconnects by itself from here on

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> int | None:
        if not self._connected.is_set():
            return None
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != self._mqtt.MQTT_ERR_SUCCESS:
            log.debug("publish to %s not sent: %s", topic, self._mqtt.error_string(info.rc))
            return None
        return int(info.mid)

    def subscribe(self, topic: str, handler: MessageHandler) -> None:
        with self._lock:
            self._subs[topic] = handler
        self._client.message_callback_add(topic, self._dispatch(handler))
        if self._connected.is_set():
            self._client.subscribe(topic, qos=1)

    def stop(self) -> None:
        self._stopping = True
        self._halt.set()
        if self._starter is not None:
            self._starter.join(timeout=10.0)
        if self._connected.is_set():
            bye = self._will()
            info = self._client.publish(bye.topic, bye.payload, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=3.0)
            except (RuntimeError, ValueError) as exc:
                log.warning("offline presence not confirmed: %s", exc)
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    # -- paho callbacks (network thread) ---------------------------------------------------
    @staticmethod
    def _dispatch(handler: MessageHandler) -> Callable[[Any, Any, Any], None]:
        def on_message(_client: Any, _userdata: Any, message: Any) -> None:
            try:
                handler(message.topic, bytes(message.payload))
            except Exception:  # a handler bug must not kill paho's network thread
                log.exception("handler for %s failed", message.topic)

        return on_message

    def _on_connect(
        self, client: Any, _userdata: Any, _flags: Any, reason_code: Any, _props: Any
    ) -> None:
        if reason_code.is_failure:
            log.error(
                "MQTT broker %s:%d refused the connection: %s", self.host, self.port, reason_code
            )
            return
        log.info("connected to MQTT %s:%d", self.host, self.port)
        with self._lock:
            topics = list(self._subs)
        for topic in topics:
            client.subscribe(topic, qos=1)
        birth = self._birth()
        client.publish(birth.topic, birth.payload, qos=birth.qos, retain=True)
        self._connected.set()
        if self._hooks is not None:
            self._hooks.on_connected()

    def _on_disconnect(
        self, _client: Any, _userdata: Any, _flags: Any, reason_code: Any, _props: Any
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if self._stopping:
            log.info("disconnected from MQTT")
        elif was:
            log.warning("disconnected from MQTT (%s); reconnecting", reason_code)
            if self._hooks is not None:
                self._hooks.on_disconnected()

    def _on_publish(
        self, _client: Any, _userdata: Any, mid: int, reason_code: Any, _props: Any
    ) -> None:
        if getattr(reason_code, "is_failure", False):
            # The broker refused it (e.g. not authorized). Resending would loop forever, so
            # it counts as done; the log says why it never arrived.
            log.error("broker refused message %d: %s", mid, reason_code)
        if self._hooks is not None:
            self._hooks.on_acked(int(mid))
