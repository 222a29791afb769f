"""The ingest worker: one thread that drains a bounded queue into the database in batches.

The MQTT network thread only enqueues; when the database falls behind, the queue fills and
`submit` blocks, which stops reading from the broker's socket (back-pressure) instead of
growing memory. One transaction per batch gives the throughput; a batch that fails is
retried one message at a time so one bad row costs only itself.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet.ingest import (
    Decoded,
    IngestResult,
    IngestStats,
    Reason,
    apply,
    decode,
    ensure_devices,
    handle,
    store_telemetry,
)
from fleet.models import utcnow
from fleet.mqtt_receiver import send_acks
from protocol.messages import TelemetryWindow
from protocol.topics import Channel

__all__ = ["IngestWorker", "ingest_batch"]

log = logging.getLogger(__name__)

_STOP = object()
_TELEMETRY_SUFFIX = "/" + Channel.TELEMETRY.value


def _log_result(topic: str, result: IngestResult) -> None:
    if result.reason is not None:
        log.warning("rejected message on %s (%s): %s", topic, result.reason, result.detail)


def ingest_batch(
    engine: Engine,
    items: Sequence[tuple[str, bytes]],
    stats: IngestStats,
    *,
    known_devices: set[str] | None = None,
) -> list[IngestResult]:
    """Apply ``(topic, payload)`` pairs in one transaction; count each after it commits.

    Every message is decoded first, outside the transaction (decoding is most of the CPU,
    and SQLite holds its write lock for the whole transaction). Runs of telemetry windows
    are then stored with a few statements per run (`store_telemetry`); other messages go
    through the ORM one by one, in order.

    ``known_devices``: ids this process has seen registered (devices are never deleted);
    a batch looks up only the others, and adds them once it commits. Cleared when a batch
    fails, in case it was wrong.
    """
    decoded = [decode(topic, payload) for topic, payload in items]
    results: list[IngestResult] | None = None
    try:
        with Session(engine) as session:
            results, devices = _apply_decoded(session, items, decoded, known_devices)
            session.commit()
        if known_devices is not None:
            known_devices.update(devices)
    except Exception:
        if known_devices is not None:
            known_devices.clear()
        # e.g. another fleet process inserted the same device or window between our read
        # and our write: redo each message alone, where a retry sees the committed row.
        log.warning("a batch of %d messages failed; retrying one by one", len(items), exc_info=True)
        results = [_one(engine, topic, payload) for topic, payload in items]
    for (topic, _), result in zip(items, results, strict=True):
        _log_result(topic, result)
        stats.record(result)
    return results


def _apply_decoded(
    session: Session,
    items: Sequence[tuple[str, bytes]],
    decoded: Sequence[Decoded | IngestResult],
    known_devices: set[str] | None = None,
) -> tuple[list[IngestResult], set[str]]:
    """The results, and the ids of the devices the batch's messages came from."""
    now = utcnow()
    # Register every new device of the batch first, in id order, in one statement: two
    # fleet processes registering overlapping devices then take row locks in the same
    # order (PostgreSQL deadlocked when heartbeats registered them one by one, in message
    # order, while the other process's telemetry did so sorted).
    devices = {m.device_id for m in decoded if not isinstance(m, IngestResult)}
    ensure_devices(session, sorted(devices - (known_devices or set())), now)
    results: list[IngestResult | None] = [None] * len(items)
    windows: list[tuple[TelemetryWindow, bytes]] = []
    window_at: list[int] = []

    def flush_windows() -> None:
        if windows:
            stored = store_telemetry(windows, session, now, registered=True)
            for i, result in zip(window_at, stored, strict=True):
                results[i] = result
            windows.clear()
            window_at.clear()

    for i, ((_, payload), msg) in enumerate(zip(items, decoded, strict=True)):
        if isinstance(msg, IngestResult):
            results[i] = msg
        elif isinstance(msg, TelemetryWindow):
            windows.append((msg, payload))
            window_at.append(i)
        else:
            flush_windows()  # keep the order: a presence after these windows wins over them
            results[i] = apply(msg, session, now)
    flush_windows()
    return [r for r in results if r is not None], devices


def _one(engine: Engine, topic: str, payload: bytes) -> IngestResult:
    for attempt in (1, 2):
        try:
            with Session(engine) as session:
                result = handle(topic, payload, session)
                session.commit()
                return result
        except Exception as exc:
            if attempt == 2:
                log.exception("could not store a message on %s", topic)
                return IngestResult.rejected(Reason.INTERNAL, f"{type(exc).__name__}: {exc}")
    raise AssertionError("unreachable")


class _Lanes:
    """Two bounded FIFO lanes with one reader: the control lane is always served first.

    Status events, heartbeats and presence decide rollouts; telemetry is bulk. In one FIFO
    a rollout's answers waited behind minutes of windows whenever ingest fell behind. Each
    lane has its own bound, so a full telemetry lane blocks only telemetry's producer.
    """

    def __init__(self, maxsize: int, control_maxsize: int) -> None:
        self._lanes: tuple[collections.deque[object], collections.deque[object]] = (
            collections.deque(),
            collections.deque(),
        )
        self._max = (control_maxsize, maxsize)
        # one lock; the reader waits on "not empty", each lane's producers on "not full"
        # (as queue.Queue does: a put wakes only the reader, a get only its lane's producer)
        self._mutex = threading.Lock()
        self._not_empty = threading.Condition(self._mutex)
        self._not_full = (threading.Condition(self._mutex), threading.Condition(self._mutex))

    def put(self, item: object, *, control: bool) -> None:
        lane = 0 if control else 1
        with self._not_full[lane]:
            while len(self._lanes[lane]) >= self._max[lane]:
                self._not_full[lane].wait()
            self._lanes[lane].append(item)
            self._not_empty.notify()

    def get(self, timeout: float | None = None) -> object:
        """The next item (control first); raises queue.Empty after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._not_empty:
            while not (self._lanes[0] or self._lanes[1]):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise queue.Empty
                self._not_empty.wait(remaining)
            lane = 0 if self._lanes[0] else 1
            item = self._lanes[lane].popleft()
            self._not_full[lane].notify()
            return item

    def qsize(self) -> int:
        with self._mutex:
            return len(self._lanes[0]) + len(self._lanes[1])


class IngestWorker:
    """Owns the queue and the writer thread; `submit` is called from the MQTT thread."""

    def __init__(
        self,
        engine: Engine,
        stats: IngestStats,
        *,
        queue_max: int,
        batch_max: int,
        linger_s: float = 0.0,
    ) -> None:
        self._engine = engine
        self._stats = stats
        self._batch_max = batch_max
        #: how long a batch may wait for more messages before it is written: fewer,
        #: larger transactions when the writer keeps pace (each costs a commit), at the
        #: price of that much more acknowledgement latency
        self._linger_s = linger_s
        self._queue = _Lanes(queue_max, control_maxsize=max(1, queue_max // 4))
        self._known_devices: set[str] = set()
        self._thread: threading.Thread | None = None

    def submit(self, topic: str, payload: bytes, ack: Callable[[], None] | None = None) -> None:
        """Enqueue one message; blocks while its lane is full (back-pressure).

        Telemetry goes to the bulk lane, everything else to the control lane, which the
        writer serves first. ``ack`` (the broker acknowledgement) is called after the
        message's batch commits.
        """
        control = not topic.endswith(_TELEMETRY_SUFFIX)
        self._queue.put((topic, payload, ack), control=control)

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("IngestWorker already started")
        self._thread = threading.Thread(target=self._run, name="fleet-ingest", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Write out everything already queued, then end the thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP, control=False)  # after everything already queued
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error(
                "ingest worker did not finish within %.0f s; %d messages left",
                timeout_s,
                self._queue.qsize(),
            )
        self._thread = None

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            deadline: float | None = None
            batch: list[tuple[str, bytes]] = []
            acks: list[Callable[[], None] | None] = []
            while True:
                if item is _STOP:
                    stopping = True
                else:
                    topic, payload, ack = item  # type: ignore[misc]
                    batch.append((topic, payload))
                    acks.append(ack)
                if stopping or len(batch) >= self._batch_max:
                    break
                if deadline is None:
                    deadline = time.monotonic() + self._linger_s
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
            if batch:
                try:
                    results = ingest_batch(
                        self._engine, batch, self._stats, known_devices=self._known_devices
                    )
                except Exception:  # never let the writer thread die
                    # Not acknowledged: the broker redelivers them when the session resumes.
                    log.exception("ingest batch of %d messages not stored", len(batch))
                    continue
                # A message we failed to store (database down) stays unacknowledged so the
                # broker sends it again; bad input is acknowledged: it cannot improve.
                send_acks(
                    ack
                    for ack, result in zip(acks, results, strict=True)
                    if ack is not None and result.reason != Reason.INTERNAL
                )
