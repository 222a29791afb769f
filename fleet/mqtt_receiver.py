"""The telemetry subscription's MQTT 5 client: paho's receive path at a fraction of its CPU.

At 5,000 telemetry windows/s a bare paho subscriber used 0.6-0.7 of a core here (about
120 us of Python per message: a few ``recv`` calls per packet, property parsing, an
``MQTTMessage``, locks), and in the fleet its network thread took a third of the process's
samples, sharing one GIL with the ingest worker. This client does only what the fleet's
shared telemetry subscription needs, over plain TCP:

- CONNECT with clean start off, Session Expiry Interval, Receive Maximum (how many QoS 1
  messages may wait for their PUBACK: they are acknowledged after their batch commits) and
  Maximum Packet Size; user name and password; the reason code of a refused CONNACK logged;
- SUBSCRIBE at QoS 1 (and UNSUBSCRIBE from channels an older session had);
- PUBLISH in, read in large blocks and parsed from one buffer; ``ack()`` sends the PUBACK
  from the caller's thread, so acknowledgements go out while this thread is blocked on a
  full ingest queue (back-pressure: it stops reading, and the broker holds the rest);
- PINGREQ when idle; a broker silent for 1.5 keep-alives, a DISCONNECT, a closed socket or
  a malformed packet: reconnect with backoff (1 s doubling to 30 s), same client id, so the
  session's unacknowledged messages come again;
- ``stop()``: DISCONNECT with Session Expiry Interval 0 (nothing queues for a stopped
  process).

No QoS 2 (the subscription is QoS 1), no topic aliases (none are offered to the broker),
no TLS (the fleet reaches its broker on a trusted network; paho is used where TLS is).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from protocol.mqtt_wire import (
    CONNACK,
    DISCONNECT,
    PINGREQ_PACKET,
    PINGRESP,
    SUBACK,
    UNSUBACK,
    MqttProtocolError,
    Packet,
    connect_packet,
    disconnect_packet,
    parse_packets,
    properties_length,
    puback_packet,
    subscribe_packet,
    unsubscribe_packet,
)

__all__ = ["PubAck", "Receiver", "ReceiverConfig", "send_acks"]

log = logging.getLogger(__name__)

#: (topic, payload, ack): as fleet.mqtt.MessageSink
Sink = Callable[[str, bytes, Callable[[], None]], None]

_READ_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiverConfig:
    host: str
    port: int
    client_id: str
    subscriptions: tuple[str, ...]
    #: filters to drop from a session that an older version subscribed
    unsubscriptions: tuple[str, ...] = ()
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 300
    receive_maximum: int = 2000
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0


def _connect_packet(cfg: ReceiverConfig) -> bytes:
    return connect_packet(
        cfg.client_id,
        clean_start=False,
        keepalive_s=cfg.keepalive_s,
        username=cfg.username,
        password=cfg.password,
        session_expiry_s=cfg.session_expiry_s,
        receive_maximum=cfg.receive_maximum,
    )


class Receiver:
    """One subscribing connection, its reader thread, and reconnection."""

    def __init__(
        self,
        cfg: ReceiverConfig,
        sink: Sink,
        *,
        on_connected: Callable[[bool], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self._sink = sink
        self._on_connected = on_connected or (lambda _up: None)
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected = threading.Event()
        self._last_send = 0.0
        self.failed_attempts = 0
        #: the last reason a connection attempt failed or dropped (for logs and tests)
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"mqtt-rx-{self.cfg.client_id}", daemon=True
        )
        self._thread.start()

    def stop(self, *, end_session: bool = True, timeout_s: float = 5.0) -> None:
        """Disconnect (ending the broker session unless told not to) and join the thread."""
        self._stop.set()
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                self._send(disconnect_packet(end_session=end_session))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout_s)

    # -- sending (any thread) -------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        sock = self._sock
        if sock is None:
            raise OSError("not connected")
        with self._send_lock:
            sock.sendall(data)
            self._last_send = time.monotonic()

    def _ack_for(self, pid: int, sock: socket.socket) -> PubAck:
        return PubAck(self, sock, pid)

    def _send_acks(self, sock: socket.socket, pids: list[int]) -> None:
        if self._sock is not sock:
            return  # that connection is gone: the broker sends those messages again
        try:
            self._send(b"".join(map(puback_packet, pids)))
        except OSError as exc:
            log.debug("%d PUBACKs not sent: %s", len(pids), exc)

    # -- the reader thread ----------------------------------------------------------------
    def _run(self) -> None:
        delay = self.cfg.reconnect_min_s
        while not self._stop.is_set():
            try:
                self._session()
            except (OSError, MqttProtocolError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                if self._stop.is_set():
                    break
                self.failed_attempts += 1
                if self.failed_attempts % 10 == 1:
                    log.warning(
                        "MQTT receiver %s: %s; reconnecting with backoff",
                        self.cfg.client_id, self.last_error,
                    )  # fmt: skip
            finally:
                was_up = self._connected.is_set()
                self._drop()
            if was_up:  # a connection that worked: back off from the start again
                delay = self.cfg.reconnect_min_s
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, self.cfg.reconnect_max_s)

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if self._connected.is_set():
            self._connected.clear()
            self._on_connected(False)
        if sock is not None:
            sock.close()

    def _session(self) -> None:
        cfg = self.cfg
        sock = socket.create_connection((cfg.host, cfg.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._send(_connect_packet(cfg))
        buf = bytearray()
        ack = self._read_until(sock, buf, CONNACK)
        if len(ack.body) < 2:
            raise MqttProtocolError("short CONNACK")
        if ack.body[1] >= 0x80:
            raise MqttProtocolError(f"broker refused the connection: reason code {ack.body[1]:#x}")
        self._send(subscribe_packet(1, cfg.subscriptions))
        sub = self._read_until(sock, buf, SUBACK)
        codes = sub.body[2 + properties_length(sub.body, 2) :]
        if not codes or any(c >= 0x80 for c in codes):
            raise MqttProtocolError(f"broker refused the subscription: reason codes {list(codes)}")
        if cfg.unsubscriptions:
            self._send(unsubscribe_packet(2, cfg.unsubscriptions))
        self.failed_attempts = 0
        self.last_error = None
        self._connected.set()
        self._on_connected(True)
        log.info(
            "MQTT receiver %s connected (session present: %s); subscribed to %s",
            cfg.client_id, bool(ack.body[0] & 1), ", ".join(cfg.subscriptions),
        )  # fmt: skip
        self._read_loop(sock, buf)

    def _read_until(self, sock: socket.socket, buf: bytearray, kind: int) -> Packet:
        """Read until a packet of ``kind`` arrives. A resumed session's queued messages may
        follow the CONNACK at once: they are delivered like any others."""
        sock.settimeout(10)
        deliver = self._deliver(sock)
        found: Packet | None = None
        while found is None:
            data = sock.recv(_READ_BYTES)
            if not data:
                raise ConnectionError("the broker closed the connection")
            buf += data
            used, packets = parse_packets(buf, deliver)
            del buf[:used]
            for p in packets:
                if found is None and p.kind == kind:
                    found = p
                else:
                    self._control(p)
        return found

    def _deliver(self, sock: socket.socket) -> Callable[[str, bytes, int, int], None]:
        sink = self._sink

        def on_publish(topic: str, payload: bytes, pid: int, qos: int) -> None:
            try:
                sink(topic, payload, self._ack_for(pid, sock) if qos else _no_ack)
            except Exception:  # a failing sink must not end the connection's thread
                log.exception("could not hand a message on %s to ingest", topic)

        return on_publish

    def _control(self, p: Packet) -> None:
        if p.kind == DISCONNECT:
            reason = p.body[0] if p.body else 0
            raise MqttProtocolError(f"broker sent DISCONNECT, reason code {reason:#x}")
        if p.kind in (PINGRESP, UNSUBACK, SUBACK):
            return
        raise MqttProtocolError(f"unexpected packet type {p.kind}")

    def _read_loop(self, sock: socket.socket, buf: bytearray) -> None:
        keepalive = self.cfg.keepalive_s
        sock.settimeout(max(1.0, keepalive / 2))
        deliver = self._deliver(sock)
        last_heard = time.monotonic()
        while not self._stop.is_set():
            try:
                data = sock.recv(_READ_BYTES)
            except TimeoutError:
                data = None
            now = time.monotonic()
            if data is None:
                if now - last_heard > 1.5 * keepalive:
                    raise ConnectionError(f"the broker was silent for {now - last_heard:.0f} s")
            elif not data:
                raise ConnectionError("the broker closed the connection")
            else:
                last_heard = now
                buf += data
                used, packets = parse_packets(buf, deliver)
                del buf[:used]
                for p in packets:
                    self._control(p)
            if now - self._last_send >= keepalive / 2:
                self._send(PINGREQ_PACKET)


def _no_ack() -> None:
    return None


class PubAck:
    """The acknowledgement of one received QoS 1 message: ``ack()`` sends its PUBACK.

    `send_acks` sends many in one write: the ingest worker acknowledges a whole batch
    after its commit, and one ``send`` per message (each its own TCP segment, TCP_NODELAY)
    cost the fleet a syscall and the broker a wake-up per window.
    """

    __slots__ = ("pid", "receiver", "sock")

    def __init__(self, receiver: Receiver, sock: socket.socket, pid: int) -> None:
        self.receiver, self.sock, self.pid = receiver, sock, pid

    def __call__(self) -> None:
        self.receiver._send_acks(self.sock, [self.pid])


def send_acks(acks: Iterable[Callable[[], None]]) -> None:
    """Call every ``ack``; `PubAck`s of one connection go out together, in order. Never
    raises for a lost connection: what is not acknowledged, the broker sends again."""
    runs: dict[tuple[int, int], tuple[PubAck, list[int]]] = {}
    for ack in acks:
        if isinstance(ack, PubAck):
            key = (id(ack.receiver), id(ack.sock))
            run = runs.get(key)
            if run is None:
                runs[key] = (ack, [ack.pid])
            else:
                run[1].append(ack.pid)
        else:
            try:
                ack()
            except Exception:  # a lost connection: the broker redelivers later
                log.debug("could not acknowledge a stored message", exc_info=True)
    for first, pids in runs.values():
        first.receiver._send_acks(first.sock, pids)
