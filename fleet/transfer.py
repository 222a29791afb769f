"""The fleet side of chunked bundle transfer: answers ChunkRequests from the stored bundle.

Devices publish a `ChunkRequest` on ``edgefleet/v1/<device>/chunk_req``; every fleet process
subscribes through the shared group (``$share/<group>/edgefleet/v1/+/chunk_req``), so one
of them answers each request: it reads the asked chunks from ``<bundle_dir>/<sha256>.efb``
and publishes each as a binary frame (JSON header with the chunk's sha256 + raw bytes, see
`protocol.messages.encode_chunk`) on ``edgefleet/v1/<device>/chunk`` with QoS 1.

Only bundles in the registry's directory are served (a file there passed verification at
upload). A request for any other bundle is answered with one header carrying ``error``, so
the device falls back or fails at once instead of timing out. Requests wait in a bounded
queue served by a few threads; when it is full a request is dropped (and counted): the
device asks again for what did not arrive.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from fleet.settings import FleetSettings
from protocol.errors import MessageDecodeError, TopicError
from protocol.messages import ChunkHeader, ChunkRequest, decode_message, encode_chunk
from protocol.topics import Channel, device_topic, parse_topic, shared_subscription

__all__ = ["ChunkServer", "serve_chunk_request"]

log = logging.getLogger(__name__)

_QUEUE_MAX: Final = 1000
_THREADS: Final = 2
#: a chunk frame waits at most this long for the broker's acknowledgement; a device whose
#: queue is full must not stall every other device's transfer
_PUBLISH_WAIT_S: Final = 10.0

#: publishes (topic, payload) with QoS 1
PublishFn = Callable[[str, bytes], None]


def serve_chunk_request(
    topic: str, payload: bytes, bundle_dir: Path, publish: PublishFn
) -> tuple[str, int]:
    """Answer one request (the pure-ish core): returns (outcome, chunks sent).

    Outcomes: "served", "unknown_bundle", "bad_topic", "bad_message", "device_mismatch".
    """
    try:
        device = parse_topic(topic).device_id
    except TopicError:
        return "bad_topic", 0
    try:
        req = decode_message(payload, expect=ChunkRequest)
    except MessageDecodeError:
        return "bad_message", 0
    if req.device_id != device:
        return "device_mismatch", 0
    out_topic = device_topic(device, Channel.CHUNK)
    path = Path(bundle_dir) / f"{req.bundle_sha256}.efb"

    def header(**kw: Any) -> ChunkHeader:
        return ChunkHeader(
            device_id=device, bundle_sha256=req.bundle_sha256, chunk_size=req.chunk_size, **kw
        )

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        err = header(index=req.indexes[0], total_size=0, error="unknown bundle on this fleet")
        publish(out_topic, encode_chunk(err, b""))
        return "unknown_bundle", 0
    sent = 0
    try:
        size = os.fstat(fd).st_size
        count = max(1, -(-size // req.chunk_size))
        for index in dict.fromkeys(req.indexes):  # each index once, in the asked order
            if index >= count:
                err = header(index=index, total_size=size, error=f"no chunk {index} (of {count})")
                publish(out_topic, encode_chunk(err, b""))
                continue
            data = os.pread(fd, req.chunk_size, index * req.chunk_size)
            h = header(index=index, total_size=size, sha256=hashlib.sha256(data).hexdigest())
            publish(out_topic, encode_chunk(h, data))
            sent += 1
    finally:
        os.close(fd)
    return "served", sent


class ChunkServer:
    """One paho client and a few threads answering chunk requests for this fleet process."""

    def __init__(
        self, settings: FleetSettings, *, bundle_dir: Path | None = None, client_id: str = ""
    ) -> None:
        self._settings = settings
        self.bundle_dir = Path(bundle_dir or settings.bundle_dir)
        self.stats: Counter[str] = Counter()
        #: told (request topic, request payload, bytes published, chunks) after each request,
        #: so bytes sent per device can be counted (fleet.quality's ledger)
        self.on_sent: Callable[[str, bytes, int, int], None] | None = None
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=_QUEUE_MAX)
        self._threads: list[threading.Thread] = []
        self.connected = threading.Event()
        from fleet.mqtt import client_id_for_process

        self.client_id = client_id or client_id_for_process() + "-chunks"
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5,
        )
        if settings.mqtt_username is not None:
            password = settings.mqtt_password.get_secret_value() if settings.mqtt_password else None
            client.username_pw_set(settings.mqtt_username, password)
        client.reconnect_delay_set(1, 30)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *_a: self.connected.clear()
        client.on_message = self._on_message
        self._client = client

    def start(self) -> None:
        for i in range(_THREADS):
            t = threading.Thread(target=self._work, name=f"fleet-chunks-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        self._client.connect_async(
            self._settings.mqtt_host,
            self._settings.mqtt_port,
            keepalive=self._settings.mqtt_keepalive_s,
        )
        self._client.loop_start()

    def stop(self) -> None:
        for _ in self._threads:
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=1.0)
        for t in self._threads:
            t.join(timeout=5.0)
        self._threads.clear()
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()

    # -- paho callbacks (network thread) ----------------------------------------------------
    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            log.error("chunk server: broker refused the connection: %s", rc)
            return
        sub = shared_subscription(self._settings.mqtt_share_group, Channel.CHUNK_REQUEST)
        client.subscribe([(sub, SubscribeOptions(qos=1))])
        self.connected.set()
        log.info("chunk server subscribed to %s (bundles in %s)", sub, self.bundle_dir)

    def _on_message(self, _client: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            self._queue.put_nowait((msg.topic, bytes(msg.payload)))
        except queue.Full:
            self.stats["dropped_requests"] += 1

    # -- workers ---------------------------------------------------------------------------
    def _publish(self, topic: str, payload: bytes) -> None:
        info = self._client.publish(topic, payload, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise ConnectionError(paho.error_string(info.rc))
        with contextlib.suppress(RuntimeError, ValueError):
            info.wait_for_publish(_PUBLISH_WAIT_S)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            topic, payload = item
            published = [0]

            def publish(t: str, p: bytes, published: list[int] = published) -> None:
                self._publish(t, p)
                published[0] += len(p)

            try:
                outcome, sent = serve_chunk_request(topic, payload, self.bundle_dir, publish)
            except (OSError, ConnectionError) as exc:
                self.stats["failed_requests"] += 1
                log.warning("chunk request on %s failed: %s", topic, exc)
                continue
            except Exception:  # a worker must survive any request
                self.stats["failed_requests"] += 1
                log.exception("chunk request on %s crashed", topic)
                continue
            self.stats[outcome] += 1
            self.stats["chunks_sent"] += sent
            self.stats["bytes_sent"] += published[0]
            if self.on_sent is not None and published[0]:
                try:
                    self.on_sent(topic, payload, published[0], sent)
                except Exception:  # counting must never stop a transfer
                    log.exception("byte counter failed")
            if outcome not in ("served", "unknown_bundle"):
                log.warning("chunk request on %s refused: %s", topic, outcome)
