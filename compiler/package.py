"""Packing: the manifest, its signature and the bundle file (written atomically)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from compiler.errors import OutputPathError
from compiler.model import TensorInfo
from compiler.target import BuiltArtifact
from protocol.bundle import sign_manifest, write_bundle
from protocol.manifest import (
    ArtifactInfo,
    BundleManifest,
    FileEntry,
    GoldenSpec,
    ModelInfo,
    TensorSpec,
    VerificationReport,
)
from protocol.signing import SigningKey

__all__ = ["BundleFile", "bundle_name", "make_manifest", "write_signed_bundle"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BundleFile:
    path: str
    data: bytes | Path
    role: str

    def sha256_and_size(self) -> tuple[str, int]:
        raw = self.data if isinstance(self.data, bytes) else self.data.read_bytes()
        return hashlib.sha256(raw).hexdigest(), len(raw)


def bundle_name(model_name: str, version: int, profile: str) -> str:
    return f"{model_name}-v{version}-{profile}.efb"


def _spec(t: TensorInfo) -> TensorSpec:
    return TensorSpec(name=t.name, dtype=t.dtype, shape=t.shape)


def make_manifest(
    *,
    name: str,
    version: int,
    description: str,
    profile: str,
    created_at: datetime,
    expires_at: datetime,
    files: Sequence[BundleFile],
    artifact: BuiltArtifact,
    inputs: Sequence[TensorInfo],
    outputs: Sequence[TensorInfo],
    task: str,
    class_names: Sequence[str],
    verification: VerificationReport,
    baseline_path: str,
    golden: GoldenSpec,
    lineage: Mapping[str, Any],
    host_figures: Mapping[str, Any],
    key_ids: Sequence[str],
    device_selectors: Sequence[str] = (),
) -> BundleManifest:
    """Assemble the manifest; every file is bound by path, size and sha256."""
    entries = []
    for f in files:
        sha, size = f.sha256_and_size()
        entries.append(FileEntry(path=f.path, sha256=sha, size=size, role=f.role))  # type: ignore[arg-type]
    manifest = BundleManifest(
        model=ModelInfo(name=name, version=version, description=description),
        profile=profile,
        device_selectors=tuple(device_selectors),
        created_at=created_at,
        expires_at=expires_at,
        files=tuple(entries),
        artifact=ArtifactInfo(
            path=artifact.bundle_path,
            format=artifact.format,
            runtime=artifact.runtime,
            precision=artifact.precision,
            execution_providers=artifact.execution_providers,
            runtime_options=artifact.runtime_options,
        ),
        inputs=tuple(_spec(t) for t in inputs),
        outputs=tuple(_spec(t) for t in outputs),
        task=task,  # type: ignore[arg-type]
        class_names=tuple(class_names),
        quantization=artifact.quantization,
        verification=verification,
        baseline_sketches=baseline_path,
        golden=golden,
        lineage=dict(lineage),
        host_figures=dict(host_figures),
        key_ids=tuple(key_ids),
    )
    manifest.check_consistency()
    return manifest


def write_signed_bundle(
    out: Path, manifest: BundleManifest, keys: Sequence[SigningKey], files: Sequence[BundleFile]
) -> str:
    """Sign the manifest and write the bundle atomically; returns the file's sha256."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create output directory {out.parent}: {exc}") from exc
    signatures = sign_manifest(manifest, keys)
    try:
        return write_bundle(out, manifest, signatures, {f.path: f.data for f in files})
    except OSError as exc:
        raise OutputPathError(f"cannot write bundle {out}: {exc}") from exc
