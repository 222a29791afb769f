"""Fakes at the agent's seams and a bundle builder, for tests and demos (not used at run time).

- `FakeTransport`: records publishes, delivers injected messages, acks on demand, and can
  drop and restore its "connection".
- `FileFetcher`: "downloads" bundles from a local directory, checking size and sha256 like
  the real fetcher.
- `build_test_bundle`: a real signed bundle around an ONNX model, with a baseline and golden
  pairs computed by ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import DownloadError
from agent.fetch import ProgressFn, check_declared_size
from agent.transport import MessageHandler, TransportHooks
from protocol.bundle import sign_manifest, write_bundle
from protocol.features import Baseline, FeatureExtractor, FeatureSpec
from protocol.manifest import (
    ArtifactInfo,
    BundleManifest,
    FileEntry,
    GoldenSpec,
    ModelInfo,
    TensorSpec,
)
from protocol.messages import DeployCommand, ReasonCode
from protocol.signing import SigningKey
from protocol.sketch import SketchBank

__all__ = [
    "BuiltBundle",
    "ChunkResponder",
    "DiskFullFetcher",
    "FailingBackend",
    "FakeTransport",
    "FileFetcher",
    "Sent",
    "build_test_bundle",
]


@dataclass(frozen=True, slots=True)
class Sent:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int


class FakeTransport:
    """An in-memory broker connection. Publishes are recorded; acks are explicit."""

    def __init__(self, *, connected: bool = True, auto_ack: bool = False) -> None:
        self.sent: list[Sent] = []
        self.unacked: dict[int, Sent] = {}
        self.auto_ack = auto_ack
        self.handlers: dict[str, MessageHandler] = {}
        self.hooks: TransportHooks | None = None
        self.started = self.stopped = False
        self._connected = connected
        self._mid = 0
        self._lock = threading.Lock()

    @property
    def connected(self) -> bool:
        return self._connected

    def set_hooks(self, hooks: TransportHooks) -> None:
        self.hooks = hooks

    def start(self) -> None:
        self.started = True
        if self._connected and self.hooks:
            self.hooks.on_connected()

    def stop(self) -> None:
        self.stopped = True

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> int | None:
        with self._lock:
            if not self._connected:
                return None
            self._mid += 1
            msg = Sent(topic, payload, qos, retain, self._mid)
            self.sent.append(msg)
            if qos and not self.auto_ack:
                self.unacked[msg.mid] = msg
        if qos and self.auto_ack and self.hooks:
            self.hooks.on_acked(msg.mid)
        return msg.mid

    def subscribe(self, topic: str, handler: MessageHandler) -> None:
        self.handlers[topic] = handler

    # -- test controls ---------------------------------------------------------------------
    def deliver(self, topic: str, payload: bytes) -> None:
        """A message arrives on ``topic``."""
        self.handlers[topic](topic, payload)

    def ack_all(self) -> int:
        """The broker acknowledges every outstanding publish."""
        with self._lock:
            mids = list(self.unacked)
            self.unacked.clear()
        for mid in mids:
            if self.hooks:
                self.hooks.on_acked(mid)
        return len(mids)

    def drop(self) -> None:
        """The connection breaks; outstanding publishes are lost."""
        self._connected = False
        self.unacked.clear()
        if self.hooks:
            self.hooks.on_disconnected()

    def restore(self) -> None:
        self._connected = True
        if self.hooks:
            self.hooks.on_connected()

    def on(self, suffix: str) -> list[bytes]:
        """Payloads published to topics ending with ``suffix``."""
        return [s.payload for s in self.sent if s.topic.endswith(suffix)]


class FileFetcher:
    """Serves bundles from a directory of ``<sha256>.efb`` files (or a mapping url -> path)."""

    def __init__(self, files: Mapping[str, Path] | None = None) -> None:
        self.files = dict(files or {})
        self.fetched: list[str] = []

    def fetch(self, command: DeployCommand, dest_dir: Path, progress: ProgressFn) -> Path:
        check_declared_size(command, 1 << 31)
        src = self.files.get(command.bundle_url)
        if src is None:
            raise DownloadError(f"no such bundle {command.bundle_url}")
        dest = Path(dest_dir) / f"{command.bundle_sha256}.part"
        shutil.copyfile(src, dest)
        self.fetched.append(command.bundle_url)
        progress(1.0)
        digest = hashlib.sha256(dest.read_bytes()).hexdigest()
        if digest != command.bundle_sha256:
            dest.unlink()
            raise DownloadError("sha256 mismatch", reason=ReasonCode.BAD_HASH)
        return dest


@dataclass(frozen=True, slots=True, kw_only=True)
class BuiltBundle:
    path: Path
    sha256: str
    size: int
    manifest: BundleManifest
    url: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def deploy_command(self, device_id: str, **overrides: Any) -> DeployCommand:
        """A deploy command for this bundle."""
        fields: dict[str, Any] = {
            "device_id": device_id,
            "bundle_sha256": self.sha256,
            "bundle_size": self.size,
            "bundle_url": self.url or self.path.as_uri(),
            "model_name": self.manifest.model.name,
            "model_version": self.manifest.model.version,
        }
        fields.update(overrides)
        return DeployCommand(**fields)


def _npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def build_test_bundle(
    out: Path,
    *,
    model_path: Path,
    samples: np.ndarray,
    signer: SigningKey,
    profile: str = "x86-cpu",
    name: str = "digits",
    version: int = 1,
    golden_count: int = 16,
    golden_outputs: Mapping[str, np.ndarray] | None = None,
    artifact_bytes: bytes | None = None,
    device_selectors: Sequence[str] = (),
    expires_in: timedelta = timedelta(days=30),
) -> BuiltBundle:
    """A signed bundle around an ONNX model with one float input and one logits output."""
    import onnxruntime as ort

    model_bytes = Path(model_path).read_bytes()
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    inp, outp = sess.get_inputs()[0], sess.get_outputs()[0]
    golden_in = samples[:golden_count].astype(np.float32)
    golden_out = dict(
        golden_outputs or {outp.name: sess.run([outp.name], {inp.name: golden_in})[0]}
    )
    golden = _npz({f"in:{inp.name}": golden_in, **{f"out:{k}": v for k, v in golden_out.items()}})
    spec = FeatureSpec.for_input(inp.name, tuple(samples.shape[1:]))
    bank = SketchBank(spec.names)
    bank.update_rows(FeatureExtractor(spec)(samples))
    baseline = Baseline(rows=len(samples), features=(spec,), sketches=bank.to_wire())
    baseline_bytes = baseline.model_dump_json().encode()
    files = {
        "model/model.onnx": (model_bytes if artifact_bytes is None else artifact_bytes, "artifact"),
        "baseline/sketches.json": (baseline_bytes, "baseline"),
        "golden/golden.npz": (golden, "golden"),
    }
    now = datetime.now(UTC).replace(microsecond=0)
    manifest = BundleManifest(
        model=ModelInfo(name=name, version=version),
        profile=profile,
        device_selectors=tuple(device_selectors),
        created_at=now,
        expires_at=now + expires_in,
        files=tuple(
            FileEntry(path=p, sha256=hashlib.sha256(b).hexdigest(), size=len(b), role=role)  # type: ignore[arg-type]
            for p, (b, role) in files.items()
        ),
        artifact=ArtifactInfo(
            path="model/model.onnx",
            format="onnx",
            runtime="onnxruntime",
            precision="fp32",
            execution_providers=("CPUExecutionProvider",),
        ),
        inputs=(TensorSpec(name=inp.name, dtype="float32", shape=(None, *samples.shape[1:])),),
        outputs=(
            TensorSpec(
                name=outp.name,
                dtype="float32",
                shape=tuple(d if isinstance(d, int) else None for d in outp.shape),
            ),
        ),
        baseline_sketches="baseline/sketches.json",
        golden=GoldenSpec(
            path="golden/golden.npz", count=golden_count, atol=1e-4, rtol=1e-4, min_top1_match=1.0
        ),
        key_ids=(signer.keyid,),
    )
    sha = write_bundle(
        out, manifest, sign_manifest(manifest, [signer]), {p: b for p, (b, _) in files.items()}
    )
    return BuiltBundle(path=out, sha256=sha, size=out.stat().st_size, manifest=manifest)


class DiskFullFetcher:
    """A fetcher whose disk is full: writing the download raises OSError(ENOSPC)."""

    def fetch(self, command: DeployCommand, dest_dir: Path, progress: ProgressFn) -> Path:
        import errno
        import os

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest_dir))


class FailingBackend:
    """Wraps a real backend; every run after the first ``ok_runs`` raises BackendError."""

    def __init__(self, inner: Any, *, ok_runs: int) -> None:
        self.inner = inner
        self.ok_runs = ok_runs
        self.runs = 0
        self.description = "failing"

    def load(self, path: Path, manifest: BundleManifest, profile: Any) -> None:
        self.inner.load(path, manifest, profile)
        self.description = f"failing({self.inner.description})"

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from agent.errors import BackendError

        self.runs += 1
        if self.runs > self.ok_runs:
            raise BackendError("runtime crashed (injected)")
        return dict(self.inner.run(inputs))

    def close(self) -> None:
        self.inner.close()


class ChunkResponder:
    """Plays the fleet's chunk server on a FakeTransport: answers ChunkRequests from files.

    ``corrupt`` lists chunk indexes whose first answer carries flipped bytes (the agent must
    refuse them by their sha256 and ask again); ``drop_after`` stops answering after that
    many chunks (a lost connection).
    """

    def __init__(
        self,
        transport: FakeTransport,
        files: Mapping[str, Path],
        *,
        corrupt: Sequence[int] = (),
        drop_after: int | None = None,
    ) -> None:
        self.transport = transport
        self.files = dict(files)
        self.corrupt = set(corrupt)
        self.drop_after = drop_after
        self.served: list[int] = []
        self._orig_publish = transport.publish
        transport.publish = self._publish  # type: ignore[method-assign]

    def _publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> int | None:
        mid = self._orig_publish(topic, payload, qos=qos, retain=retain)
        if mid is not None and topic.endswith("/chunk_req"):
            self._answer(topic, payload)
        return mid

    def _answer(self, topic: str, payload: bytes) -> None:
        from protocol.messages import ChunkHeader, ChunkRequest, decode_message, encode_chunk

        req = decode_message(payload, expect=ChunkRequest)
        out = topic.rsplit("/", 1)[0] + "/chunk"
        path = self.files.get(req.bundle_sha256)
        for index in req.indexes:
            if self.drop_after is not None and len(self.served) >= self.drop_after:
                return
            if path is None:
                h = ChunkHeader(
                    device_id=req.device_id,
                    bundle_sha256=req.bundle_sha256,
                    index=index,
                    chunk_size=req.chunk_size,
                    total_size=0,
                    error="unknown bundle",
                )
                self.transport.deliver(out, encode_chunk(h, b""))
                return
            raw = path.read_bytes()
            data = raw[index * req.chunk_size : (index + 1) * req.chunk_size]
            h = ChunkHeader(
                device_id=req.device_id,
                bundle_sha256=req.bundle_sha256,
                index=index,
                chunk_size=req.chunk_size,
                total_size=len(raw),
                sha256=hashlib.sha256(data).hexdigest(),
            )
            if index in self.corrupt:
                self.corrupt.discard(index)
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            self.served.append(index)
            self.transport.deliver(out, encode_chunk(h, data))
