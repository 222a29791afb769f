"""Simulated devices that speak the real wire protocol, for load tests of broker and fleet.

``python -m edgefleet.loadgen --devices 10000 --rate-per-device 0.5 --duration-s 30``

Each simulated device announces itself (retained ``Presence(online=True)`` and a
``Heartbeat`` with its profile and active bundle), then sends ``TelemetryWindow`` messages at
``--rate-per-device`` windows per second, a heartbeat every ``--heartbeat-s``, and answers
deploy and rollback commands on ``edgefleet/v1/<id>/cmd`` with ``StatusEvent``s (RECEIVED at
once, then COMMITTED, or FAILED for ``--failure-rate`` of them, after ``--commit-delay-s``),
so rollouts can be exercised at scale. Telemetry is QoS 1 like the agent's; "sent" counts
only messages the broker acknowledged (PUBACK).

Connections, the trade-off (``--connections-per-process``):

- shared (default, 4 per process): a few MQTT connections publish on behalf of many device
  topics. Cheap (10,000 devices cost 4 sockets and a few MB), and what a throughput test
  wants. It needs a broker that lets one identity publish on every device's topics: an open
  broker, or the fleet's service account where per-device ACLs are on. No last will per
  device, and one connection's stall delays all its devices.
- one per device (``--connections-per-process 0``): each device is its own MQTT client
  (client id = device id, last will = retained offline presence), as under per-device ACLs.
  All of a process's clients share one selector loop, not a thread each, so 10,000 devices
  are 10,000 sockets but one thread; the broker then needs that many file descriptors
  (``ulimit -n``) and keeps one session per device, which costs it memory and CPU.

Telemetry payloads are built ONCE: one window per profile (``--features`` input sketches,
a latency and a confidence sketch over ``--rows-per-window`` rows) is serialized, split into
the fields that vary (device, message id, seq, window times, bundle) and the large rest, and
each message is the rest with fresh varying fields spliced in. Building 64 sketches per
device per window would cost more CPU than the system under test.

``--processes P`` splits the devices over P processes (device ``i`` goes to process
``i % P``), for when one Python process cannot publish fast enough.
"""

from __future__ import annotations

import functools
import heapq
import json
import logging
import multiprocessing
import os
import random
import secrets
import selectors
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import numpy as np
import typer

from protocol.errors import ProtocolError
from protocol.messages import (
    TELEMETRY_MAGIC,
    DeployCommand,
    Heartbeat,
    InstallState,
    Presence,
    ReasonCode,
    RollbackCommand,
    StatusEvent,
    TelemetryWindow,
    decode_command,
    encode_message,
)
from protocol.mqtt_wire import (
    CONNACK,
    DISCONNECT,
    PINGREQ_PACKET,
    PINGRESP,
    PUBACK,
    SUBACK,
    MqttProtocolError,
    Packet,
    Will,
    connect_packet,
    disconnect_packet,
    parse_packets,
    properties_length,
    puback_packet,
    publish_head,
    subscribe_packet,
)
from protocol.sketch import FeatureSketch, SketchBank
from protocol.sketchpack import pack_sketches
from protocol.topics import Channel, device_topic, parse_topic

__all__ = [
    "LoadConfig",
    "LoadReport",
    "WindowTemplate",
    "app",
    "device_ids",
    "run_load",
]

log = logging.getLogger("edgefleet.loadgen")

AGENT_VERSION = "loadgen-1"
#: fields of a telemetry window that change per message; everything else is the template
_VARYING = (
    "device_id",
    "message_id",
    "stream_id",
    "seq",
    "window_start",
    "window_end",
    "sent_at",
    "bundle_sha256",
    "model_name",
    "model_version",
)
_MISC_EVERY_S = 1.0
_SELECT_MAX_S = 0.05
_CONNECT_TIMEOUT_S = 30.0
_KEEPALIVE_S = 60
_READ_BYTES = 256 * 1024
#: the publish loop sleeps at least this long between bursts: one wake-up (a select, the
#: loop's bookkeeping) per burst of due windows, not per window
_BURST_S = 0.002


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadConfig:
    """One load run; built once from the command line and passed to every process."""

    devices: int
    rate_per_device: float  # telemetry windows per second per device
    duration_s: float
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    username: str | None = None
    password: str | None = None
    prefix: str = "loadgen-"
    profile: str = "x86-cpu"
    features: int = 64
    #: inferences summarised in one window (sets the sketches' size, so the payload's)
    rows_per_window: int = 20
    processes: int = 1
    #: MQTT connections per process; 0 = one connection (one MQTT identity) per device
    connections_per_process: int = 4
    heartbeat_s: float = 30.0
    #: presence and a first heartbeat for every device before telemetry starts
    announce: bool = True
    commit_delay_s: float = 2.0
    failure_rate: float = 0.0
    #: QoS 1 messages sent but not yet acknowledged, per connection (bounds memory)
    max_unacked_per_connection: int = 500
    #: after the run, wait this long for outstanding PUBACKs and pending status answers
    drain_s: float = 10.0
    #: keep answering commands (and sending heartbeats) this long after telemetry stops
    linger_s: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError("devices must be at least 1")
        if self.rate_per_device < 0 or self.duration_s < 0:
            raise ValueError("rate-per-device and duration-s must not be negative")
        if self.processes < 1 or self.connections_per_process < 0:
            raise ValueError("processes must be >= 1 and connections-per-process >= 0")
        if not 0.0 <= self.failure_rate <= 1.0:
            raise ValueError("failure-rate must be between 0 and 1")


@dataclass(slots=True, kw_only=True)
class LoadReport:
    """What the run sent (broker-acknowledged) and how fast."""

    devices: int = 0
    connections: int = 0
    telemetry_sent: int = 0
    telemetry_planned: int = 0
    heartbeats_sent: int = 0
    presence_sent: int = 0
    status_sent: int = 0
    commands_received: int = 0
    unacked: int = 0
    disconnects: int = 0
    telemetry_bytes: int = 0
    window_payload_bytes: int = 0
    telemetry_elapsed_s: float = 0.0
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def achieved_rate(self) -> float:
        return self.telemetry_sent / self.telemetry_elapsed_s if self.telemetry_elapsed_s else 0.0

    def merge(self, other: LoadReport) -> None:
        for name in (
            "devices",
            "connections",
            "telemetry_sent",
            "telemetry_planned",
            "heartbeats_sent",
            "presence_sent",
            "status_sent",
            "commands_received",
            "unacked",
            "disconnects",
            "telemetry_bytes",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.window_payload_bytes = max(self.window_payload_bytes, other.window_payload_bytes)
        self.telemetry_elapsed_s = max(self.telemetry_elapsed_s, other.telemetry_elapsed_s)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["achieved_rate"] = round(self.achieved_rate, 1)
        return out


def device_ids(prefix: str, count: int) -> list[str]:
    """The simulated devices' ids: ``<prefix>00000`` ... (zero-padded, so they sort)."""
    width = max(5, len(str(count - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(count)]


@functools.lru_cache(maxsize=16)  # a burst of windows shares its times (see _Shard.run)
def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def _json(value: str | int | None) -> str:
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)


class WindowTemplate:
    """A telemetry window serialized once; `render` splices in the fields that vary."""

    def __init__(self, *, features: int, rows: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        rows = max(1, rows)
        bank = SketchBank([f"f{i:03d}" for i in range(features)])
        # pixel-like inputs in [0, 1], a different shape per feature, as a real model sees
        data = rng.beta(2.0, 5.0, size=(rows, features)) * rng.uniform(0.5, 1.0, size=features)
        bank.update_rows(data)
        latency = FeatureSketch.of(rng.gamma(4.0, 1.5, size=rows))
        confidence = FeatureSketch.of(rng.beta(8.0, 1.5, size=rows))
        classes = np.bincount(rng.integers(0, 10, size=rows), minlength=10).tolist()
        now = time.time()
        pack = pack_sketches(bank.sketches)  # uncompressed, as agents send by default
        window = TelemetryWindow(
            device_id="template",
            seq=0,
            window_start=datetime.fromtimestamp(now - 1, UTC),
            window_end=datetime.fromtimestamp(now, UTC),
            inference_count=rows,
            error_counts={},
            latency_ms=latency.to_wire(),
            input_pack=pack,
            output_class_counts=classes,
            confidence=confidence.to_wire(),
            cpu_temp_c=48.5,
            load_1m=0.42,
            mem_rss_bytes=61_440_000,
        )
        encode_message(window)  # the size limit applies to the template, so to every copy
        fields = window.model_dump(mode="json", exclude={"input_pack"})
        for name in _VARYING:
            fields.pop(name, None)
        body = json.dumps(fields, separators=(",", ":"))
        self._rest = body[1:-1].encode("utf-8")  # without the braces
        self._pack = pack
        self.rows = rows
        self.features = features

    def render(
        self,
        *,
        device_id: str,
        seq: int,
        stream_id: str,
        window_start: float,
        window_end: float,
        bundle_sha256: str | None = None,
        model_name: str | None = None,
        model_version: int | None = None,
    ) -> bytes:
        """One window's wire bytes (a telemetry frame, as agents send)."""
        end = _iso(window_end)
        head = (
            f'{{"device_id":"{device_id}","message_id":"{secrets.token_hex(16)}",'
            f'"stream_id":"{stream_id}","seq":{seq},"window_start":"{_iso(window_start)}",'
            f'"window_end":"{end}","sent_at":"{end}","bundle_sha256":{_json(bundle_sha256)},'
            f'"model_name":{_json(model_name)},"model_version":{_json(model_version)},'
        )
        text = head.encode("utf-8") + self._rest + b"}"
        return TELEMETRY_MAGIC + len(text).to_bytes(4, "big") + text + self._pack


@dataclass(slots=True)
class _Device:
    id: str
    conn: _Conn
    seq: int = 0
    bundle_sha256: str | None = None
    model_name: str | None = None
    model_version: int | None = None
    previous: tuple[str | None, str | None, int | None] | None = None
    started_at: float = field(default_factory=time.monotonic)


class _Conn:
    """One MQTT 5 connection driven by the shard's selector loop (no thread of its own).

    Packets are built and read with `protocol.mqtt_wire`, not paho: with paho a publisher
    process spent ~80% of its time in paho (most of it in the PUBACK path, which builds a
    Properties and a ReasonCode object per message), ~140 us per acknowledged QoS 1
    publish, so at 5,000 windows/s the simulated devices took 0.6-0.9 of the 2 cores the
    fleet under test runs on. Outgoing packets
    collect in one buffer that the loop writes out with few ``send`` calls.
    """

    def __init__(self, shard: _Shard, client_id: str, *, will: Will | None = None) -> None:
        self.shard = shard
        self.client_id = client_id
        self.will = will
        self.connected = False
        self.failed: str | None = None
        self.unacked: dict[int, str] = {}
        self.acked: Counter[str] = Counter()
        #: publishes the broker answered with an error reason code (e.g. not authorized)
        self.refused: Counter[str] = Counter()
        self.sock: socket.socket | None = None
        self._out = bytearray()
        self._in = bytearray()
        self._mask = 0
        self._pid = 0
        self.last_send = 0.0

    # -- the socket -------------------------------------------------------------------------
    def open(self) -> None:
        cfg = self.shard.cfg
        sock = socket.create_connection((cfg.mqtt_host, cfg.mqtt_port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.sock = sock
        self._mask = selectors.EVENT_READ
        self.shard.selector.register(sock, self._mask, self)
        self._queue(
            connect_packet(
                self.client_id, clean_start=True, keepalive_s=_KEEPALIVE_S,
                username=cfg.username, password=cfg.password, will=self.will,
            )
        )  # fmt: skip

    def _queue(self, packet: bytes) -> None:
        self._out += packet
        self.shard.writers.add(self)

    def flush(self) -> None:
        """Write what the socket takes now; wait for writability if some is left."""
        sock = self.sock
        if sock is None:
            self._out.clear()
            self.shard.writers.discard(self)
            return
        if self._out:
            try:
                sent = sock.send(self._out)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._lost(f"send failed: {exc}")
                return
            if sent:
                del self._out[:sent]  # bytearray drops a prefix without moving the rest
                self.last_send = time.monotonic()
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._out else 0)
        if mask != self._mask:
            self._mask = mask
            self.shard.selector.modify(sock, mask, self)
        if not self._out:
            self.shard.writers.discard(self)

    def on_readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            data = sock.recv(_READ_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(f"receive failed: {exc}")
            return
        if not data:
            self._lost("the broker closed the connection")
            return
        self._in += data
        try:
            used, packets = parse_packets(self._in, self._on_publish)
            del self._in[:used]
            for packet in packets:
                self._control(packet)
        except MqttProtocolError as exc:
            self._lost(str(exc))

    def _lost(self, why: str) -> None:
        if self.connected and not self.shard.closing:
            self.shard.report.disconnects += 1
            log.warning("%s disconnected: %s", self.client_id, why)
        elif not self.connected and self.failed is None and not self.shard.closing:
            self.failed = f"{self.client_id}: {why}"
        self.connected = False
        self.close()

    def close(self) -> None:
        sock, self.sock = self.sock, None
        self.shard.writers.discard(self)
        if sock is not None:
            self.shard.selector.unregister(sock)
            sock.close()

    # -- packets in -------------------------------------------------------------------------
    def _control(self, packet: Packet) -> None:
        body = packet.body
        if packet.kind == PUBACK:
            if len(body) < 2:
                raise MqttProtocolError("short PUBACK")
            kind = self.unacked.pop((body[0] << 8) | body[1], None)
            reason = body[2] if len(body) > 2 else 0
            if kind is None:
                return
            if reason < 0x80:
                self.acked[kind] += 1
            else:
                if not self.refused:
                    log.warning("%s: broker refused a %s publish: reason code %#x",
                                self.client_id, kind, reason)  # fmt: skip
                self.refused[kind] += 1
        elif packet.kind == CONNACK:
            if len(body) < 2:
                raise MqttProtocolError("short CONNACK")
            if body[1] >= 0x80:
                self.failed = f"broker refused {self.client_id}: reason code {body[1]:#x}"
                self.close()
                return
            self.connected = True
            topics = self.shard.command_subscriptions(self)
            if topics:
                pid = self._next_pid()
                self.unacked[pid] = "subscribe"
                self._queue(subscribe_packet(pid, topics))
        elif packet.kind == SUBACK:
            if len(body) >= 2:
                self.unacked.pop((body[0] << 8) | body[1], None)
            codes = body[2 + properties_length(body, 2) :]
            if any(c >= 0x80 for c in codes):
                log.warning("%s: broker refused the command subscription: %s",
                            self.client_id, list(codes))  # fmt: skip
        elif packet.kind == DISCONNECT:
            raise MqttProtocolError(f"broker sent DISCONNECT, reason code {body[:1].hex()}")
        elif packet.kind != PINGRESP:
            raise MqttProtocolError(f"unexpected packet type {packet.kind}")

    def _on_publish(self, topic: str, payload: bytes, pid: int, qos: int) -> None:
        if qos:
            self._queue(puback_packet(pid))
        self.shard.on_command(topic, payload)

    # -- packets out ------------------------------------------------------------------------
    def _next_pid(self) -> int:
        while True:
            self._pid = self._pid % 0xFFFF + 1
            if self._pid not in self.unacked:
                return self._pid

    @property
    def full(self) -> bool:
        return len(self.unacked) >= self.shard.cfg.max_unacked_per_connection

    def publish(self, topic: str, payload: bytes, kind: str, *, retain: bool = False) -> bool:
        """Queue a QoS 1 PUBLISH; False when not connected."""
        if not self.connected:
            return False
        pid = self._next_pid()
        self._out += publish_head(topic.encode(), len(payload), pid=pid, retain=retain)
        self._out += payload
        self.unacked[pid] = kind
        self.shard.writers.add(self)
        return True

    def keepalive(self, now: float) -> None:
        if self.connected and now - self.last_send >= _KEEPALIVE_S / 2:
            self._queue(PINGREQ_PACKET)

    def disconnect(self) -> None:
        """A normal DISCONNECT (the broker does not publish the will) and close."""
        if self.sock is not None:
            self._queue(disconnect_packet(end_session=False))
            self.flush()
        self.connected = False
        self.close()


def _offline_will(device_id: str) -> Will:
    """As the agent's: a retained offline presence, published if the connection drops."""
    payload = encode_message(Presence(device_id=device_id, online=False))
    return Will(device_topic(device_id, Channel.PRESENCE), payload, qos=1, retain=True)


class _Shard:
    """The devices of one process, their connections and one selector loop."""

    def __init__(self, cfg: LoadConfig, shard: int) -> None:
        self.cfg = cfg
        self.shard = shard
        self.report = LoadReport()
        self.writers: set[_Conn] = set()
        self.closing = False
        self.rng = random.Random(cfg.seed * 1000 + shard)
        self.stream_id = f"lg{secrets.token_hex(6)}"
        all_ids = device_ids(cfg.prefix, cfg.devices)
        ids = all_ids[shard :: cfg.processes]
        per_device = cfg.connections_per_process == 0
        n_conns = len(ids) if per_device else min(cfg.connections_per_process, len(ids))
        tag = f"{cfg.prefix}c{os.getpid()}-{secrets.token_hex(2)}"
        self.conns = [
            _Conn(self, ids[i], will=_offline_will(ids[i])) if per_device
            else _Conn(self, f"{tag}-{i}")
            for i in range(max(1, n_conns))
        ]  # fmt: skip
        self.devices = [
            _Device(id=d, conn=self.conns[i % len(self.conns)]) for i, d in enumerate(ids)
        ]
        self.by_id = {d.id: d for d in self.devices}
        self.per_device = per_device
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = 0
        self.template = WindowTemplate(
            features=cfg.features, rows=cfg.rows_per_window, seed=cfg.seed
        )
        self.selector = selectors.DefaultSelector()
        self.report.devices = len(self.devices)
        self.report.connections = len(self.conns)

    # -- commands ---------------------------------------------------------------------------
    def command_subscriptions(self, conn: _Conn) -> list[str]:
        if self.per_device:
            return [device_topic(conn.client_id, Channel.COMMAND)]
        if conn is self.conns[0]:
            # one subscription per process on behalf of all its devices
            return ["edgefleet/v1/+/cmd"]
        return []

    def on_command(self, topic: str, payload: bytes) -> None:
        try:
            device = self.by_id.get(parse_topic(topic).device_id)
        except ProtocolError:
            return
        if device is None:
            return  # another process's device
        self.report.commands_received += 1
        try:
            cmd = decode_command(payload)
        except ProtocolError as exc:
            log.warning("bad command for %s: %s", device.id, exc)
            return
        if isinstance(cmd, DeployCommand):
            self._status(device, InstallState.RECEIVED, cmd.command_id, cmd.rollout_id, cmd)
            self.later(self.cfg.commit_delay_s, lambda: self._finish_deploy(device, cmd))
        elif isinstance(cmd, RollbackCommand):
            self.later(self.cfg.commit_delay_s, lambda: self._finish_rollback(device, cmd))
        else:
            self.report.extra["ignored_commands"] = self.report.extra.get("ignored_commands", 0) + 1

    def _finish_deploy(self, device: _Device, cmd: DeployCommand) -> None:
        if self.rng.random() < self.cfg.failure_rate:
            self._status(
                device, InstallState.FAILED, cmd.command_id, cmd.rollout_id, cmd,
                reason=ReasonCode.LOAD_FAILED, detail="simulated failure (loadgen --failure-rate)",
            )  # fmt: skip
            return
        if cmd.shadow:
            self._status(device, InstallState.SHADOWING, cmd.command_id, cmd.rollout_id, cmd)
            return
        device.previous = (device.bundle_sha256, device.model_name, device.model_version)
        device.bundle_sha256 = cmd.bundle_sha256
        device.model_name, device.model_version = cmd.model_name, cmd.model_version
        self._status(device, InstallState.COMMITTED, cmd.command_id, cmd.rollout_id, cmd)
        self._heartbeat(device)

    def _finish_rollback(self, device: _Device, cmd: RollbackCommand) -> None:
        if device.previous is None or device.previous[0] is None:
            self._status(
                device, InstallState.FAILED, cmd.command_id, cmd.rollout_id, None,
                reason=ReasonCode.NOTHING_TO_ROLL_BACK,
            )  # fmt: skip
            return
        current = (device.bundle_sha256, device.model_name, device.model_version)
        device.bundle_sha256, device.model_name, device.model_version = device.previous
        device.previous = current
        self._status(device, InstallState.ROLLED_BACK, cmd.command_id, cmd.rollout_id, None)
        self._heartbeat(device)

    def _status(
        self,
        device: _Device,
        state: InstallState,
        command_id: str,
        rollout_id: str | None,
        cmd: DeployCommand | None,
        *,
        reason: ReasonCode = ReasonCode.OK,
        detail: str = "",
    ) -> None:
        event = StatusEvent(
            device_id=device.id,
            command_id=command_id,
            rollout_id=rollout_id,
            state=state,
            reason=reason,
            detail=detail,
            bundle_sha256=cmd.bundle_sha256 if cmd is not None else None,
            model_name=cmd.model_name if cmd is not None else None,
            model_version=cmd.model_version if cmd is not None else None,
            active_bundle_sha256=device.bundle_sha256,
        )
        self._send(device, Channel.STATUS, encode_message(event), "status")

    def later(self, delay_s: float, action: Callable[[], None]) -> None:
        self._timer_seq += 1
        heapq.heappush(self.timers, (time.monotonic() + delay_s, self._timer_seq, action))

    # -- sending ----------------------------------------------------------------------------
    def _send(
        self, device: _Device, channel: Channel, payload: bytes, kind: str, **kw: Any
    ) -> bool:
        topic = f"edgefleet/v1/{device.id}/{channel.value}"
        return device.conn.publish(topic, payload, kind, **kw)

    def _heartbeat(self, device: _Device) -> None:
        hb = Heartbeat(
            device_id=device.id,
            profile=self.cfg.profile,
            agent_version=AGENT_VERSION,
            active_bundle_sha256=device.bundle_sha256,
            model_name=device.model_name,
            model_version=device.model_version,
            uptime_s=time.monotonic() - device.started_at,
            tags=("loadgen",),
        )
        self._send(device, Channel.HEARTBEAT, encode_message(hb), "heartbeat")

    def _telemetry(self, device: _Device, wall: float) -> bool:
        window_s = 1.0 / self.cfg.rate_per_device if self.cfg.rate_per_device else 1.0
        payload = self.template.render(
            device_id=device.id,
            seq=device.seq,
            stream_id=self.stream_id,
            window_start=wall - window_s,
            window_end=wall,
            bundle_sha256=device.bundle_sha256,
            model_name=device.model_name,
            model_version=device.model_version,
        )
        if not self._send(device, Channel.TELEMETRY, payload, "telemetry"):
            return False
        device.seq += 1
        self.report.telemetry_bytes += len(payload)
        self.report.window_payload_bytes = len(payload)
        return True

    # -- the loop ---------------------------------------------------------------------------
    def connect(self) -> None:
        cfg = self.cfg
        for conn in self.conns:
            conn.open()
            self._io(0)  # a connection's CONNECT out before the next one's
        deadline = time.monotonic() + _CONNECT_TIMEOUT_S
        while not all(c.connected for c in self.conns):
            failed = [c.failed for c in self.conns if c.failed]
            if failed:
                raise RuntimeError(failed[0])
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {sum(c.connected for c in self.conns)} of {len(self.conns)} "
                    f"connections to {cfg.mqtt_host}:{cfg.mqtt_port} were accepted in time"
                )
            self._io(0.05)

    def _io(self, timeout_s: float) -> None:
        for conn in list(self.writers):
            conn.flush()
        for key, events in self.selector.select(timeout_s):
            conn = key.data
            if events & selectors.EVENT_READ:
                conn.on_readable()
            if events & selectors.EVENT_WRITE:
                conn.flush()
        for conn in list(self.writers):
            conn.flush()

    def _run_timers(self, now: float) -> None:
        while self.timers and self.timers[0][0] <= now:
            _, _, action = heapq.heappop(self.timers)
            action()

    def _wait_room(self, conn: _Conn) -> None:
        while conn.full and conn.connected:
            self._io(_SELECT_MAX_S)

    def run(self) -> LoadReport:
        cfg = self.cfg
        self.connect()
        if cfg.announce:
            for device in self.devices:
                self._wait_room(device.conn)
                online = encode_message(Presence(device_id=device.id, online=True))
                self._send(device, Channel.PRESENCE, online, "presence", retain=True)
                self._heartbeat(device)
                self._io(0)
        n = len(self.devices)
        total_rate = cfg.rate_per_device * n
        planned = int(total_rate * cfg.duration_s)
        self.report.telemetry_planned = planned
        hb_rate = n / cfg.heartbeat_s if cfg.heartbeat_s > 0 else 0.0
        t0 = time.monotonic()
        t_end = t0 + cfg.duration_s
        k = hb_k = 0
        last_misc = t0
        while True:
            now = time.monotonic()
            if k >= planned and now >= t_end:
                break
            # telemetry due by now, in a fixed device order: each device gets exactly
            # rate_per_device windows per second (as long as the loop keeps up)
            due = min(planned, int((now - t0) * total_rate) + 1)
            wall = time.time()  # the windows of one burst end at the same time
            while k < due:
                device = self.devices[k % n]
                if device.conn.full or not device.conn.connected:
                    break
                if not self._telemetry(device, wall):
                    break
                k += 1
                if k % 64 == 0:
                    self._io(0)
            if k == planned and self.report.telemetry_elapsed_s == 0.0:
                self.report.telemetry_elapsed_s = time.monotonic() - t0
            hb_due = int((now - t0) * hb_rate)
            while hb_k < hb_due:
                device = self.devices[hb_k % n]
                if device.conn.full:
                    break
                self._heartbeat(device)
                hb_k += 1
            self._run_timers(now)
            if now - last_misc >= _MISC_EVERY_S:
                last_misc = now
                for conn in self.conns:
                    conn.keepalive(now)
            if not any(c.connected for c in self.conns):
                log.error("every connection to the broker is down; stopping")
                break
            next_due = t0 + (k + 1) / total_rate if total_rate and k < planned else now + 0.05
            self._io(min(_SELECT_MAX_S, max(_BURST_S, next_due - time.monotonic())))
        if self.report.telemetry_elapsed_s == 0.0:
            self.report.telemetry_elapsed_s = time.monotonic() - t0
        self._linger_and_drain(hb_rate, hb_k, t0)
        self._collect()
        self.closing = True
        for conn in self.conns:
            conn.disconnect()
        return self.report

    def _linger_and_drain(self, hb_rate: float, hb_k: int, t0: float) -> None:
        cfg = self.cfg
        linger_end = time.monotonic() + cfg.linger_s
        while time.monotonic() < linger_end:
            now = time.monotonic()
            hb_due = int((now - t0) * hb_rate)
            while hb_k < hb_due:
                self._heartbeat(self.devices[hb_k % len(self.devices)])
                hb_k += 1
            self._run_timers(now)
            self._io(_SELECT_MAX_S)
        deadline = time.monotonic() + cfg.drain_s
        while time.monotonic() < deadline:
            self._run_timers(time.monotonic())
            pending = sum(len(c.unacked) for c in self.conns if c.connected)
            if not pending and not self.timers:
                break
            self._io(_SELECT_MAX_S)

    def _collect(self) -> None:
        acked: Counter[str] = Counter()
        for conn in self.conns:
            acked.update(conn.acked)
            self.report.unacked += len(conn.unacked)
        self.report.telemetry_sent = acked["telemetry"]
        self.report.heartbeats_sent = acked["heartbeat"]
        self.report.presence_sent = acked["presence"]
        self.report.status_sent = acked["status"]
        refused = sum((conn.refused for conn in self.conns), Counter[str]())
        for kind, n in refused.items():
            self.report.extra[f"refused_{kind}"] = n


def _run_shard(cfg: LoadConfig, shard: int) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    report = _Shard(cfg, shard).run()
    return asdict(report)


def run_load(cfg: LoadConfig) -> LoadReport:
    """Run the load in this process (one shard) or in ``cfg.processes`` child processes."""
    if cfg.processes == 1:
        return _Shard(cfg, 0).run()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(cfg.processes) as pool:
        parts = pool.starmap(_run_shard, [(cfg, i) for i in range(cfg.processes)])
    total = LoadReport()
    for part in parts:
        total.merge(LoadReport(**part))
    return total


app = typer.Typer(help="Simulated devices for load tests.", add_completion=False)


@app.command()
def main(
    devices: Annotated[int, typer.Option("--devices", help="Simulated devices.")] = 1000,
    rate_per_device: Annotated[
        float, typer.Option("--rate-per-device", help="Telemetry windows per second per device.")
    ] = 0.5,
    duration_s: Annotated[
        float, typer.Option("--duration-s", help="Telemetry for this long.")
    ] = 10.0,
    mqtt_host: Annotated[str, typer.Option("--mqtt-host")] = "127.0.0.1",
    mqtt_port: Annotated[int, typer.Option("--mqtt-port")] = 1883,
    username: Annotated[str | None, typer.Option("--username")] = None,
    password: Annotated[
        str | None, typer.Option("--password", envvar="EDGEFLEET_LOADGEN_PASSWORD")
    ] = None,
    prefix: Annotated[str, typer.Option("--prefix", help="Device id prefix.")] = "loadgen-",
    profile: Annotated[str, typer.Option("--profile")] = "x86-cpu",
    features: Annotated[int, typer.Option("--features", help="Input sketches per window.")] = 64,
    rows_per_window: Annotated[
        int, typer.Option("--rows-per-window", help="Inferences per window (sketch size).")
    ] = 20,
    processes: Annotated[int, typer.Option("--processes", help="Publisher processes.")] = 1,
    connections_per_process: Annotated[
        int,
        typer.Option(
            "--connections-per-process",
            help="MQTT connections per process shared by its devices; 0 = one per device.",
        ),
    ] = 4,
    heartbeat_s: Annotated[float, typer.Option("--heartbeat-s")] = 30.0,
    announce: Annotated[
        bool, typer.Option("--announce/--no-announce", help="Presence + heartbeat first.")
    ] = True,
    commit_delay_s: Annotated[float, typer.Option("--commit-delay-s")] = 2.0,
    failure_rate: Annotated[
        float, typer.Option("--failure-rate", help="Fraction of deploys answered FAILED.")
    ] = 0.0,
    linger_s: Annotated[
        float, typer.Option("--linger-s", help="Keep answering commands after telemetry ends.")
    ] = 0.0,
    drain_s: Annotated[float, typer.Option("--drain-s")] = 10.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Simulate devices publishing telemetry and answering commands; print what was sent."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        cfg = LoadConfig(
            devices=devices,
            rate_per_device=rate_per_device,
            duration_s=duration_s,
            mqtt_host=mqtt_host,
            mqtt_port=mqtt_port,
            username=username,
            password=password,
            prefix=prefix,
            profile=profile,
            features=features,
            rows_per_window=rows_per_window,
            processes=processes,
            connections_per_process=connections_per_process,
            heartbeat_s=heartbeat_s,
            announce=announce,
            commit_delay_s=commit_delay_s,
            failure_rate=failure_rate,
            linger_s=linger_s,
            drain_s=drain_s,
        )
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        report = run_load(cfg)
    except (OSError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
        return
    typer.echo(
        f"{report.devices} devices on {report.connections} connections: "
        f"{report.telemetry_sent}/{report.telemetry_planned} windows acknowledged in "
        f"{report.telemetry_elapsed_s:.1f} s ({report.achieved_rate:,.0f}/s, "
        f"{report.window_payload_bytes:,} bytes each); heartbeats {report.heartbeats_sent}, "
        f"presence {report.presence_sent}, status {report.status_sent}, commands "
        f"{report.commands_received}, unacked {report.unacked}, disconnects {report.disconnects}"
    )


if __name__ == "__main__":
    app()
