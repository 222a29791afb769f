"""The `Agent`: wires state, installer, inference, telemetry, outbox and the transport.

Threads: the transport's network thread (only queues work), one command worker (installs
run one at a time), one loop that closes telemetry windows, sends heartbeats and pumps
the outbox and the status queue, the shadow runner (while a candidate is shadowed) and the
local API's server threads (when enabled). `tick` and `process_commands` are the same
steps, callable directly, which is how the unit tests drive an agent without threads.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import agent as _pkg
from agent.api import LocalApi
from agent.backends import BackendFactory, create_backend
from agent.config import AgentConfig
from agent.crashpoint import CrashPoints
from agent.errors import AgentError
from agent.fetch import Fetcher
from agent.inference import InferenceService
from agent.installer import Installer, InstallInterrupted
from agent.model import LoadedModel
from agent.outbox import Outbox
from agent.quality import QualityRecorder
from agent.shadow import ShadowRunner
from agent.state import StateDir
from agent.system import SystemProbe
from agent.telemetry import ClosedWindow, TelemetryRecorder, merge_window_payloads
from agent.transfer import ChunkedFetcher, HttpRangeSource, MqttChunkSource
from agent.transport import PahoTransport, Publication, Transport, TransportHooks
from protocol.errors import ExpiredError, MessageDecodeError, ProtocolError, SignatureError
from protocol.limits import MAX_MESSAGE_BYTES
from protocol.messages import (
    BenchResult,
    DeployCommand,
    Heartbeat,
    InstallState,
    LabelCommand,
    Presence,
    ReasonCode,
    RollbackCommand,
    StatusEvent,
    TrustRootCommand,
    decode_command,
    encode_message,
)
from protocol.topics import Channel, device_topic

__all__ = ["Agent", "paho_transport_for"]

log = logging.getLogger(__name__)

_LOOP_S: Final = 0.2
_STATUS_QUEUE_MAX: Final = 1000


def paho_transport_for(config: AgentConfig) -> PahoTransport:
    """The real MQTT transport for this config, with retained presence and last will."""
    topic = device_topic(config.device_id, Channel.PRESENCE)

    def presence(online: bool) -> Callable[[], Publication]:
        return lambda: Publication(
            topic=topic,
            payload=encode_message(Presence(device_id=config.device_id, online=online)),
            retain=True,
        )

    return PahoTransport(
        client_id=config.device_id,
        host=config.mqtt_host,
        port=config.mqtt_port,
        username=config.mqtt_username,
        password=config.mqtt_password,
        keepalive_s=config.mqtt_keepalive_s,
        session_expiry_s=config.mqtt_session_expiry_s,
        birth=presence(True),
        will=presence(False),
    )


class Agent:
    """One device's agent. ``start`` it, use ``service.predict``, ``stop`` it."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        transport: Transport,
        fetcher: Fetcher | None = None,
        backend_factory: BackendFactory = create_backend,
        probe: SystemProbe | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.transport = transport
        self.clock = clock
        self.started_at = time.monotonic()
        self.state = StateDir.open(
            config.state_dir, device_id=config.device_id, trust_root=config.trust_root_path
        )
        self.counters: collections.Counter[str] = collections.Counter()
        self.shadow = ShadowRunner(queue_max=config.shadow_queue_max)
        # recent predictions, so late ground truth can be joined on the device
        self.quality = QualityRecorder(clock=clock)
        self.telemetry = TelemetryRecorder(
            window_s=config.telemetry_window_s,
            probe=probe,
            clock=clock,
            shadow_source=self.shadow.take_stats,
            extra_source=self._window_extra,
            quality_source=self.quality.take,
            compress_sketches=config.compress_sketches,
        )
        self.service = InferenceService(self.telemetry, quality=self.quality)
        self.outbox = Outbox(
            self.state.outbox_path,
            max_bytes=config.outbox_max_bytes,
            max_age_s=config.outbox_max_age_s,
            clock=clock,
            merge=merge_window_payloads,
        )
        if self.outbox.moved_aside is not None:
            self.counters["outbox_corrupt"] += 1
        self._stop = threading.Event()
        self.crash = CrashPoints(config.crash_at)
        self.chunks = MqttChunkSource(
            transport,
            config.device_id,
            window=config.chunk_window,
            timeout_s=config.chunk_timeout_s,
            max_bps=config.max_download_bps,
            stop=self._stop,
        )
        self.fetcher = fetcher or ChunkedFetcher(
            mqtt=self.chunks,
            http=HttpRangeSource(
                timeout_s=config.download_timeout_s,
                max_bps=config.max_download_bps,
                stop=self._stop,
            ),
            max_bytes=config.download_max_bytes,
            chunk_size=config.chunk_size_bytes,
            default_transfer=config.default_transfer,
            on_write=lambda _i: self.crash.hit("download"),
        )
        self.installer = Installer(
            config=config,
            state=self.state,
            service=self.service,
            fetcher=self.fetcher,
            emit=self._emit_status,
            backend_factory=backend_factory,
            stop=self._stop,
            crash=self.crash,
            on_shadow=self._set_shadow,
        )
        self.api: LocalApi | None = None
        if config.api_port is not None or config.api_socket is not None:
            self.api = LocalApi(
                self.service,
                port=config.api_port,
                socket_path=config.api_socket,
                max_body_bytes=config.api_max_body_bytes,
            )
        self._bench: tuple[float, BenchResult | None] = (-1.0, None)
        self._commands: queue.Queue[DeployCommand | RollbackCommand | TrustRootCommand | None] = (
            queue.Queue()
        )
        self._status: collections.deque[StatusEvent] = collections.deque(maxlen=_STATUS_QUEUE_MAX)
        self._status_lock = threading.Lock()
        self._reconnected = threading.Event()
        self._next_heartbeat = 0.0
        self._threads: list[threading.Thread] = []
        self._topics = {c: device_topic(config.device_id, c) for c in Channel}

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, *, threads: bool = True) -> None:
        """Recover state, start serving, connect; with ``threads``, run the loops too."""
        self.state.clean_downloads()
        resume = self.installer.startup()
        if resume is not None:
            self._commands.put(resume)
        self.transport.set_hooks(
            TransportHooks(
                on_connected=self._reconnected.set,
                on_disconnected=self.outbox.connection_lost,
                on_acked=self.outbox.acked,
            )
        )
        self.transport.subscribe(self._topics[Channel.COMMAND], self.handle_command)
        self.transport.subscribe(self._topics[Channel.CHUNK], self.chunks.on_frame)
        self.transport.start()
        if self.api is not None:
            try:
                self.api.start()
            except OSError as exc:
                raise AgentError(f"cannot start the local inference API: {exc}") from exc
        if threads:
            for name, target in (("commands", self._command_worker), ("loop", self._loop)):
                t = threading.Thread(target=target, name=f"agent-{name}", daemon=True)
                t.start()
                self._threads.append(t)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish cleanly: stop the loops, store the last window, say offline, disconnect."""
        self._stop.set()
        self._commands.put(None)
        if self.api is not None:
            self.api.stop()
        for t in self._threads:
            t.join(timeout=timeout_s)
        self.shadow.stop()
        try:
            for window in self.telemetry.flush_all():
                self._store_window(window)
            self._pump()
            # Give the last windows a moment to be acknowledged, so a restart does not send
            # them again (it would be harmless: the fleet drops duplicate seqs).
            deadline = time.monotonic() + min(2.0, timeout_s)
            while self.outbox.in_flight() and time.monotonic() < deadline:
                time.sleep(0.02)
        except AgentError as exc:
            log.error("final telemetry flush failed: %s", exc)
        self.transport.stop()
        self.outbox.close()
        model = self.service.swap(None)
        if model is not None:
            model.backend.close()

    # -- commands ----------------------------------------------------------------------------
    def handle_command(self, topic: str, raw: bytes) -> None:
        """Transport callback: decode a command and queue it; a bad one is answered."""
        try:
            cmd = decode_command(raw)
            if cmd.device_id != self.config.device_id:
                raise MessageDecodeError(
                    f"command is for device {cmd.device_id!r}, not {self.config.device_id!r}"
                )
        except MessageDecodeError as exc:
            self.counters["bad_commands"] += 1
            log.warning("bad command on %s: %s", topic, exc)
            command_id = _peek_command_id(raw)
            if command_id is not None:
                self._emit_status(
                    StatusEvent(
                        device_id=self.config.device_id,
                        command_id=command_id,
                        state=InstallState.REJECTED,
                        reason=ReasonCode.BAD_COMMAND,
                        detail=str(exc)[:2048],
                        active_bundle_sha256=self._active_sha(),
                    )
                )
            return
        self.counters["commands"] += 1
        if isinstance(cmd, LabelCommand):
            # memory-only and quick: joined here, never queued behind an install
            outcomes = self.quality.apply(cmd.labels)
            log.info("label command %s: %d label(s) applied", cmd.command_id, len(outcomes))
            return
        log.info("command %s (%s) queued", cmd.command_id, cmd.kind)
        self._commands.put(cmd)

    def process_commands(self) -> int:
        """Run every queued command now, in this thread. Returns how many ran."""
        n = 0
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return n
            if cmd is not None:
                self._run_command(cmd)
                n += 1

    def _run_command(self, cmd: DeployCommand | RollbackCommand | TrustRootCommand) -> None:
        if isinstance(cmd, DeployCommand):
            self.installer.deploy(cmd)
        elif isinstance(cmd, TrustRootCommand):
            self._install_trust_roots(cmd)
        else:
            self.installer.rollback(cmd)

    def _install_trust_roots(self, cmd: TrustRootCommand) -> None:
        """Walk the offered roots from ours; report COMMITTED (new version) or REJECTED."""
        try:
            root = self.state.install_trust_chain([r.encode("utf-8") for r in cmd.roots])
        except ProtocolError as exc:
            reason = (
                ReasonCode.BAD_SIGNATURE
                if isinstance(exc, SignatureError)
                else ReasonCode.EXPIRED
                if isinstance(exc, ExpiredError)
                else ReasonCode.BAD_COMMAND
            )
            state, detail = InstallState.REJECTED, f"trust root refused ({exc.code}): {exc}"
        else:
            state, reason = InstallState.COMMITTED, ReasonCode.OK
            detail = f"trust root version {root.version} installed"
        self._emit_status(
            StatusEvent(
                device_id=self.config.device_id,
                command_id=cmd.command_id,
                state=state,
                reason=reason,
                detail=detail[:2048],
                active_bundle_sha256=self._active_sha(),
            )
        )

    def _command_worker(self) -> None:
        while not self._stop.is_set():
            cmd = self._commands.get()
            if cmd is None:
                return
            try:
                self._run_command(cmd)
            except InstallInterrupted:
                return
            except Exception:  # keep serving whatever an install did
                log.exception("command %s failed unexpectedly", cmd.command_id)

    # -- periodic work -----------------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        """One round of periodic work: windows, heartbeat, resend after reconnect, pump."""
        now = self.clock() if now is None else now
        if self._reconnected.is_set():
            self._reconnected.clear()
            self.outbox.connection_lost()  # resend everything unacknowledged, in order
            self._next_heartbeat = 0.0
        for window in self.telemetry.take_closed(now):
            self._store_window(window)
        if now >= self._next_heartbeat and self.transport.connected:
            self._send_heartbeat()
            self._next_heartbeat = now + self.config.heartbeat_s
        self._pump()

    def _loop(self) -> None:
        while not self._stop.wait(_LOOP_S):
            try:
                self.tick()
            except Exception:  # the loop must survive anything: it carries telemetry
                log.exception("agent loop step failed")

    def _store_window(self, window: ClosedWindow) -> None:
        def build(seq: int, dropped: int) -> bytes:
            msg = window.to_message(
                device_id=self.config.device_id,
                seq=seq,
                dropped_windows=dropped,
                stream_id=self.outbox.stream_id,
            )
            return encode_message(msg)

        seq = self.outbox.add(build, merge_key=window.bundle_sha256 or "-")
        log.debug("telemetry window %d stored (%d inferences)", seq, window.inference_count)

    def _pump(self) -> None:
        self._pump_status()
        topic = self._topics[Channel.TELEMETRY]
        self.outbox.pump(lambda payload: self.transport.publish(topic, payload, qos=1))

    def _send_heartbeat(self) -> None:
        model = self.service.model
        hb = Heartbeat(
            device_id=self.config.device_id,
            profile=self.config.profile.name,
            agent_version=_pkg.__version__,
            active_bundle_sha256=model.bundle_sha256 if model else None,
            model_name=model.model_name if model else None,
            model_version=model.model_version if model else None,
            uptime_s=time.monotonic() - self.started_at,
            tags=self.config.tags,
            bench=self._latest_bench(model.bundle_sha256 if model else None),
        )
        self.transport.publish(self._topics[Channel.HEARTBEAT], encode_message(hb), qos=1)

    def _latest_bench(self, active_sha: str | None) -> BenchResult | None:
        """bench.json (written by `edgefleet agent bench`) if it measured the active model."""
        path: Path = self.state.bench_path
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None
        if mtime != self._bench[0]:
            try:
                self._bench = (mtime, BenchResult.model_validate_json(path.read_bytes()))
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable %s: %s", path, exc)
                self._bench = (mtime, None)
        bench = self._bench[1]
        return bench if bench is not None and bench.bundle_sha256 == active_sha else None

    def _set_shadow(self, model: LoadedModel | None, sample_rate: float) -> None:
        self.shadow.set_candidate(model, sample_rate)
        self.service.observer = self.shadow.offer if model is not None else None

    def _window_extra(self) -> dict[str, object]:
        """Counters carried in every window's ``extra`` (cumulative since start)."""
        extra: dict[str, object] = {
            "bad_commands": self.counters["bad_commands"],
            "outbox_corrupt_recovered": self.outbox.corrupt_recovered,
            "outbox_merges": self.outbox.merged_total,
        }
        if self.installer.startup_problems:
            extra["startup_problems"] = list(self.installer.startup_problems)
        if self.api is not None:
            extra["api"] = dict(self.api.counters)
        return extra

    # -- status events -----------------------------------------------------------------------
    def _emit_status(self, event: StatusEvent) -> None:
        log.info(
            "status %s %s%s",
            event.state.value,
            event.reason.value,
            f": {event.detail}" if event.detail else "",
        )
        with self._status_lock:
            self._status.append(event)
        self._pump_status()

    def _pump_status(self) -> None:
        # Status events wait in memory while offline (a durable queue comes later).
        topic = self._topics[Channel.STATUS]
        with self._status_lock:
            while self._status:
                if self.transport.publish(topic, encode_message(self._status[0]), qos=1) is None:
                    return
                self._status.popleft()

    def _active_sha(self) -> str | None:
        model = self.service.model
        return model.bundle_sha256 if model else None


def _peek_command_id(raw: bytes) -> str | None:
    """The command id of an undecodable command, if one can be read safely."""
    if len(raw) > MAX_MESSAGE_BYTES:
        return None
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        obj = json.loads(raw)
        if isinstance(obj, dict):
            cid = obj.get("command_id")
            if isinstance(cid, str) and 0 < len(cid) <= 64:
                return cid
    return None
