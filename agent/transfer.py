"""Resumable, chunked bundle transfer: over MQTT from the fleet, or by HTTP range requests.

A download lives in the state's ``downloads/`` directory as ``<sha256>.part`` (the bytes,
at their final offsets) beside ``<sha256>.have`` (which chunks are on disk). A chunk is
marked in ``.have`` only after the data file was fsynced, so after a crash, a reboot or a
lost connection the download resumes with exactly the chunks that are missing. A complete
file is checked against the command's sha256 and renamed ``<sha256>.efb``.

Sources fill the missing chunks: `MqttChunkSource` asks the fleet on the device's
``chunk_req`` topic and receives binary frames (JSON header + raw bytes, each with its
sha256) on its ``chunk`` topic; `HttpRangeSource` GETs byte ranges of ``bundle_url``.
`ChunkedFetcher` tries MQTT first (unless the command says ``transfer="http"``) and falls
back to HTTP for whatever is still missing. Both honour ``max_bps``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Final, Protocol

from agent.errors import DownloadError
from agent.fetch import ProgressFn, check_declared_size
from agent.fsio import atomic_write, fsync_dir
from agent.transport import Transport
from protocol.errors import MessageDecodeError
from protocol.limits import MAX_CHUNK_INDEXES
from protocol.messages import (
    ChunkRequest,
    DeployCommand,
    ReasonCode,
    decode_chunk,
    encode_message,
)
from protocol.topics import Channel, device_topic

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "ChunkSource",
    "ChunkedFetcher",
    "HttpRangeSource",
    "MqttChunkSource",
    "PartialDownload",
    "RateLimiter",
]

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES: Final = 64 * 1024
_PERSIST_EVERY_BYTES: Final = 1024 * 1024
_PERSIST_EVERY_S: Final = 1.0


def _disk_full(exc: OSError, what: str) -> DownloadError:
    if exc.errno == errno.ENOSPC:
        return DownloadError(f"disk full while writing {what}", reason=ReasonCode.DISK_FULL)
    return DownloadError(f"cannot write {what}: {exc}")


class RateLimiter:
    """A token bucket over bytes: ``take(n)`` sleeps until ``n`` more bytes fit the rate."""

    def __init__(
        self,
        max_bps: float | None,
        *,
        burst_bytes: int = DEFAULT_CHUNK_BYTES,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.max_bps = max_bps
        self.burst = burst_bytes
        self._clock, self._sleep = clock, sleep
        self._tokens = float(burst_bytes)
        self._t = clock()

    def take(self, n: int, stop: threading.Event | None = None) -> None:
        if not self.max_bps:
            return
        while True:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._t) * self.max_bps)
            self._t = now
            if self._tokens + 1e-6 >= min(n, self.burst):  # epsilon: float drift
                self._tokens -= n  # may go negative for a chunk bigger than the burst
                return
            wait = (min(n, self.burst) - self._tokens) / self.max_bps
            if stop is not None and stop.wait(wait):
                return
            if stop is None:
                self._sleep(wait)


class PartialDownload:
    """The on-disk state of one bundle download: data file plus a bitmap of chunks held."""

    def __init__(
        self,
        directory: Path,
        *,
        sha256: str,
        size: int,
        chunk_size: int,
        on_write: Callable[[int], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.sha256 = sha256
        self.size = size
        self.chunk_size = chunk_size
        self.count = max(1, -(-size // chunk_size))
        self.part = self.directory / f"{sha256}.part"
        self.have_path = self.directory / f"{sha256}.have"
        self.done_path = self.directory / f"{sha256}.efb"
        self._on_write = on_write
        self._have = bytearray(self.count)
        self._fd: int | None = None
        self._unsynced = 0
        self._last_persist = time.monotonic()
        self._lock = threading.Lock()
        self.resumed_chunks = 0

    # -- lifecycle -------------------------------------------------------------------------
    def open(self) -> None:
        """Reuse a partial download of the same bundle and chunk size, or start afresh."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if self._load_bitmap():
                self.resumed_chunks = sum(self._have)
            else:
                self._have = bytearray(self.count)
                self.have_path.unlink(missing_ok=True)
            self._fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o644)
            if os.fstat(self._fd).st_size != self.size:
                os.ftruncate(self._fd, self.size)
        except OSError as exc:
            self.close()
            raise _disk_full(exc, str(self.part)) from exc
        if self.resumed_chunks:
            log.info(
                "resuming download of %s: %d of %d chunks already on disk",
                self.sha256[:12],
                self.resumed_chunks,
                self.count,
            )

    def _load_bitmap(self) -> bool:
        try:
            meta = json.loads(self.have_path.read_bytes())
            bits = bytes.fromhex(meta["have"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if (
            meta.get("size") != self.size
            or meta.get("chunk_size") != self.chunk_size
            or len(bits) != self.count
            or not self.part.exists()
        ):
            return False
        self._have = bytearray(1 if b else 0 for b in bits)
        return True

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None

    def discard(self) -> None:
        """Forget this download entirely."""
        self.close()
        for p in (self.part, self.have_path):
            p.unlink(missing_ok=True)

    # -- state -----------------------------------------------------------------------------
    def chunk_len(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def missing(self) -> list[int]:
        with self._lock:
            return [i for i, h in enumerate(self._have) if not h]

    def has(self, index: int) -> bool:
        return bool(self._have[index])

    @property
    def bytes_held(self) -> int:
        with self._lock:
            return sum(self.chunk_len(i) for i, h in enumerate(self._have) if h)

    @property
    def complete(self) -> bool:
        with self._lock:
            return all(self._have)

    # -- writing ---------------------------------------------------------------------------
    def write(self, index: int, data: bytes) -> bool:
        """Store one chunk (length must match); False if it was already held."""
        if not 0 <= index < self.count:
            raise DownloadError(f"chunk index {index} out of range 0..{self.count - 1}")
        if len(data) != self.chunk_len(index):
            raise DownloadError(
                f"chunk {index} has {len(data)} bytes; expected {self.chunk_len(index)}"
            )
        with self._lock:
            if self._have[index]:
                return False
            if self._fd is None:
                raise DownloadError("download is closed")
            try:
                os.pwrite(self._fd, data, index * self.chunk_size)
            except OSError as exc:
                raise _disk_full(exc, str(self.part)) from exc
            self._have[index] = 2  # written, not yet durable
            self._unsynced += len(data)
            due = (
                self._unsynced >= _PERSIST_EVERY_BYTES
                or time.monotonic() - self._last_persist >= _PERSIST_EVERY_S
            )
        if self._on_write is not None:
            self._on_write(index)
        if due:
            self.persist()
        return True

    def persist(self) -> None:
        """fsync the data, then record which chunks are durable (in that order)."""
        with self._lock:
            if self._fd is None:
                return
            try:
                os.fsync(self._fd)
                bits = bytes(1 if h else 0 for h in self._have)
                atomic_write(
                    self.have_path,
                    json.dumps(
                        {"size": self.size, "chunk_size": self.chunk_size, "have": bits.hex()}
                    ).encode(),
                )
            except OSError as exc:
                raise _disk_full(exc, str(self.have_path)) from exc
            self._unsynced = 0
            self._last_persist = time.monotonic()

    def finish(self) -> Path:
        """Check the whole file's sha256 and rename it ``<sha256>.efb``; return that path."""
        self.persist()
        self.close()
        h = hashlib.sha256()
        try:
            with open(self.part, "rb") as f:
                while block := f.read(1024 * 1024):
                    h.update(block)
        except OSError as exc:
            raise DownloadError(f"cannot read {self.part}: {exc}") from exc
        if h.hexdigest() != self.sha256:
            self.discard()
            raise DownloadError(
                f"downloaded file has sha256 {h.hexdigest()[:16]}..., the command says "
                f"{self.sha256[:16]}...",
                reason=ReasonCode.BAD_HASH,
            )
        os.replace(self.part, self.done_path)
        self.have_path.unlink(missing_ok=True)
        fsync_dir(self.directory)
        return self.done_path


class ChunkSource(Protocol):
    """Fills the missing chunks of a download; raises DownloadError when it cannot."""

    name: str

    def fill(self, dl: PartialDownload, command: DeployCommand, progress: ProgressFn) -> None: ...


class MqttChunkSource:
    """Requests chunks on ``<device>/chunk_req``; frames arrive through `on_frame`.

    Keeps up to ``window`` chunks requested and unanswered. When nothing arrives for
    ``timeout_s`` it asks again for what is outstanding; after ``max_stalls`` such rounds
    without progress it gives up (the fetcher then falls back to HTTP).
    """

    name = "mqtt"

    def __init__(
        self,
        transport: Transport,
        device_id: str,
        *,
        window: int = 16,
        timeout_s: float = 5.0,
        max_stalls: int = 3,
        max_bps: float | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.transport = transport
        self.device_id = device_id
        self.window = max(1, min(window, MAX_CHUNK_INDEXES))
        self.timeout_s = timeout_s
        self.max_stalls = max_stalls
        self.max_bps = max_bps
        self.stop = stop or threading.Event()
        self.topic_request = device_topic(device_id, Channel.CHUNK_REQUEST)
        self.topic_chunk = device_topic(device_id, Channel.CHUNK)
        self._frames: queue.Queue[bytes] = queue.Queue(maxsize=1024)
        self._active: str | None = None
        self.counters: dict[str, int] = {"frames": 0, "bad_frames": 0, "requests": 0}

    def on_frame(self, _topic: str, raw: bytes) -> None:
        """Transport callback: queue a frame for the download in progress (if any)."""
        if self._active is None:
            return  # a late chunk of a finished download
        with contextlib.suppress(queue.Full):  # the requester asks again for what is lost
            self._frames.put_nowait(raw)

    def _request(self, sha: str, chunk_size: int, indexes: list[int]) -> bool:
        for i in range(0, len(indexes), MAX_CHUNK_INDEXES):
            req = ChunkRequest(
                device_id=self.device_id,
                bundle_sha256=sha,
                chunk_size=chunk_size,
                indexes=tuple(indexes[i : i + MAX_CHUNK_INDEXES]),
            )
            if self.transport.publish(self.topic_request, encode_message(req), qos=1) is None:
                return False
            self.counters["requests"] += 1
        return True

    def fill(self, dl: PartialDownload, command: DeployCommand, progress: ProgressFn) -> None:
        self._active = dl.sha256
        while not self._frames.empty():
            self._frames.get_nowait()
        try:
            self._fill(dl, progress)
        finally:
            self._active = None

    def _fill(self, dl: PartialDownload, progress: ProgressFn) -> None:
        limiter = RateLimiter(self.max_bps, burst_bytes=dl.chunk_size)
        todo = dl.missing()
        outstanding: dict[int, float] = {}
        stalls = 0
        last_progress = time.monotonic()
        while todo or outstanding:
            if self.stop.is_set():
                raise DownloadError("agent is stopping; the download resumes after restart")
            # top up the window
            batch: list[int] = []
            while todo and len(outstanding) + len(batch) < self.window:
                i = todo.pop(0)
                if dl.has(i):
                    continue
                limiter.take(dl.chunk_len(i), self.stop)
                batch.append(i)
            if batch:
                if not self.transport.connected or not self._request(
                    dl.sha256, dl.chunk_size, batch
                ):
                    todo[:0] = batch
                    if time.monotonic() - last_progress > self.timeout_s * self.max_stalls:
                        raise DownloadError("not connected to the broker; cannot fetch chunks")
                    self.stop.wait(0.2)
                    continue
                now = time.monotonic()
                outstanding.update(dict.fromkeys(batch, now))
            try:
                raw = self._frames.get(timeout=min(0.5, self.timeout_s))
            except queue.Empty:
                if time.monotonic() - last_progress < self.timeout_s:
                    continue
                stalls += 1
                if stalls > self.max_stalls:
                    raise DownloadError(
                        f"no chunk from the fleet for {stalls * self.timeout_s:.0f} s"
                    ) from None
                log.info("chunk transfer stalled; asking again for %d chunks", len(outstanding))
                todo[:0] = sorted(outstanding)
                outstanding.clear()
                last_progress = time.monotonic()
                continue
            index = self._accept(dl, raw)
            if index is None:
                continue
            outstanding.pop(index, None)
            stalls = 0
            last_progress = time.monotonic()
            progress(dl.bytes_held / dl.size)

    def _accept(self, dl: PartialDownload, raw: bytes) -> int | None:
        try:
            header, data = decode_chunk(raw)
        except MessageDecodeError as exc:
            self.counters["bad_frames"] += 1
            log.warning("bad chunk frame: %s", exc)
            return None
        if header.bundle_sha256 != dl.sha256 or header.device_id != self.device_id:
            return None
        if header.error:
            raise DownloadError(f"the fleet cannot send bundle chunks: {header.error}")
        if header.chunk_size != dl.chunk_size or header.total_size != dl.size:
            self.counters["bad_frames"] += 1
            return None
        if header.sha256 is None or hashlib.sha256(data).hexdigest() != header.sha256:
            self.counters["bad_frames"] += 1
            log.warning("chunk %d failed its sha256 check; asking again", header.index)
            return None
        try:
            dl.write(header.index, data)
        except DownloadError as exc:
            if exc.reason is ReasonCode.DISK_FULL:
                raise
            self.counters["bad_frames"] += 1
            log.warning("chunk %d refused: %s", header.index, exc)
            return None
        self.counters["frames"] += 1
        return header.index


class HttpRangeSource:
    """GETs the missing byte ranges of ``bundle_url`` (file:// URLs are read directly)."""

    name = "http"

    def __init__(
        self,
        *,
        timeout_s: float = 30.0,
        max_bps: float | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.max_bps = max_bps
        self.stop = stop or threading.Event()

    @staticmethod
    def _runs(missing: list[int]) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        for i in missing:
            if runs and runs[-1][1] == i - 1:
                runs[-1] = (runs[-1][0], i)
            else:
                runs.append((i, i))
        return runs

    def fill(self, dl: PartialDownload, command: DeployCommand, progress: ProgressFn) -> None:
        limiter = RateLimiter(self.max_bps, burst_bytes=dl.chunk_size)
        url = command.bundle_url
        for first, last in self._runs(dl.missing()):
            start = first * dl.chunk_size
            end = last * dl.chunk_size + dl.chunk_len(last)  # exclusive
            try:
                self._fetch_run(dl, url, first, start, end, limiter, progress)
            except DownloadError:
                raise
            except OSError as exc:  # URLError and HTTPError are OSErrors too
                raise DownloadError(f"GET {url} bytes {start}-{end - 1} failed: {exc}") from exc

    def _fetch_run(
        self,
        dl: PartialDownload,
        url: str,
        first: int,
        start: int,
        end: int,
        limiter: RateLimiter,
        progress: ProgressFn,
    ) -> None:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme == "file":
            stream = open(urllib.request.url2pathname(parsed.path), "rb")  # noqa: SIM115
            stream.seek(start)
            skip = 0
        else:
            req = urllib.request.Request(
                url, headers={"Range": f"bytes={start}-{end - 1}", "Accept": "*/*"}
            )
            stream = urllib.request.urlopen(req, timeout=self.timeout_s)
            # A server that ignores Range answers 200 with the whole file: skip to our start.
            skip = start if getattr(stream, "status", 206) == 200 else 0
        with stream:
            while skip:
                got = stream.read(min(skip, 1024 * 1024))
                if not got:
                    raise DownloadError(f"GET {url}: file shorter than declared")
                skip -= len(got)
            index = first
            pos = start
            while pos < end:
                if self.stop.is_set():
                    raise DownloadError("agent is stopping; the download resumes after restart")
                n = dl.chunk_len(index)
                limiter.take(n, self.stop)
                data = _read_exact(stream, n)
                if len(data) != n:
                    raise DownloadError(
                        f"GET {url}: got {pos - start + len(data)} of {end - start} bytes "
                        "(truncated)"
                    )
                dl.write(index, data)
                progress(dl.bytes_held / dl.size)
                index += 1
                pos += n


def _read_exact(stream: object, n: int) -> bytes:
    parts: list[bytes] = []
    left = n
    while left:
        got = stream.read(left)  # type: ignore[attr-defined]
        if not got:
            break
        parts.append(got)
        left -= len(got)
    return b"".join(parts)


class ChunkedFetcher:
    """The agent's Fetcher: resumable, chunked; MQTT first, HTTP range as the fallback."""

    def __init__(
        self,
        *,
        mqtt: MqttChunkSource | None,
        http: HttpRangeSource,
        max_bytes: int,
        chunk_size: int = DEFAULT_CHUNK_BYTES,
        default_transfer: str = "mqtt",
        on_write: Callable[[int], None] | None = None,
    ) -> None:
        self.mqtt = mqtt
        self.http = http
        self.max_bytes = max_bytes
        self.chunk_size = chunk_size
        self.default_transfer = default_transfer
        self.on_write = on_write
        self.last_sources: list[str] = []
        self.last_resumed_chunks = 0

    def fetch(self, command: DeployCommand, dest_dir: Path, progress: ProgressFn) -> Path:
        check_declared_size(command, self.max_bytes)
        dest_dir = Path(dest_dir)
        _drop_other_downloads(dest_dir, keep=command.bundle_sha256)
        done = dest_dir / f"{command.bundle_sha256}.efb"
        if done.exists():
            if _sha256_file(done) == command.bundle_sha256:
                progress(1.0)
                self.last_sources = ["cache"]
                return done
            done.unlink()
        dl = PartialDownload(
            dest_dir,
            sha256=command.bundle_sha256,
            size=command.bundle_size,
            chunk_size=self.chunk_size,
            on_write=self.on_write,
        )
        dl.open()
        self.last_resumed_chunks = dl.resumed_chunks
        reporter = _ProgressSteps(progress)
        reporter(dl.bytes_held / dl.size)
        how = command.transfer or self.default_transfer
        sources: list[ChunkSource] = [self.http]
        if how == "mqtt" and self.mqtt is not None:
            sources.insert(0, self.mqtt)
        self.last_sources = []
        last: DownloadError | None = None
        try:
            for source in sources:
                if dl.complete:
                    break
                self.last_sources.append(source.name)
                try:
                    source.fill(dl, command, reporter)
                except DownloadError as exc:
                    if exc.reason is ReasonCode.DISK_FULL:
                        raise
                    last = exc
                    log.warning("%s transfer of %s failed: %s", source.name, dl.sha256[:12], exc)
            if not dl.complete:
                raise last or DownloadError("download incomplete")
            return dl.finish()
        finally:
            # What arrived stays resumable, whatever ended this attempt.
            with contextlib.suppress(DownloadError):
                dl.persist()
            dl.close()


class _ProgressSteps:
    """Passes progress on at each further 10%, so status events stay few."""

    def __init__(self, progress: ProgressFn) -> None:
        self.progress = progress
        self.next = 0.1

    def __call__(self, fraction: float) -> None:
        if fraction >= self.next:
            self.progress(min(1.0, fraction))
            self.next = (int(fraction * 10) + 1) / 10


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1024 * 1024):
            h.update(block)
    return h.hexdigest()


def _drop_other_downloads(directory: Path, *, keep: str) -> None:
    """One download at a time: partial files of other bundles are removed."""
    with contextlib.suppress(FileNotFoundError):
        for p in directory.iterdir():
            if p.is_file() and not p.name.startswith(keep):
                p.unlink(missing_ok=True)
