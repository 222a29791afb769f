"""The bundle manifest: what a bundle holds, for which device, and how it was verified.

The manifest is stored in the bundle as canonical JSON; release signatures cover exactly
those bytes. Every file in the bundle is bound by path, size and sha256 (mix-and-match).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from protocol.canonical import canonical_bytes
from protocol.errors import BundleFormatError
from protocol.limits import MAX_BUNDLE_BYTES, MAX_BUNDLE_FILES, MAX_MANIFEST_BYTES

__all__ = [
    "BUNDLE_FORMAT",
    "ArtifactInfo",
    "BundleManifest",
    "FileEntry",
    "GoldenSpec",
    "ModelInfo",
    "OutputCheck",
    "TensorSpec",
    "VerificationReport",
    "manifest_bytes",
    "parse_manifest",
]

BUNDLE_FORMAT: Final = "edgefleet-bundle/1"

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Dim = int | str | None


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class ModelInfo(_Frozen):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    #: strictly increasing per model name: the agent refuses anything not newer
    version: int = Field(ge=1)
    description: str = Field(default="", max_length=1024)


class TensorSpec(_Frozen):
    name: str = Field(min_length=1, max_length=256)
    dtype: str = Field(max_length=32)  # numpy dtype name: float32, int8, uint8, int64, ...
    shape: tuple[Dim, ...]  # None or a string for a dynamic axis


def _safe_path(p: str) -> str:
    if (
        not p
        or p.startswith("/")
        or "\\" in p
        or any(part in ("", ".", "..") for part in p.split("/"))
        or len(p) > 200
        or p in ("manifest.json", "signatures.json")
    ):
        raise ValueError(f"unsafe or reserved bundle path {p!r}")
    return p


class FileEntry(_Frozen):
    path: str
    sha256: Sha256Hex
    size: int = Field(ge=0, le=MAX_BUNDLE_BYTES)
    role: Literal["artifact", "baseline", "golden", "recipe", "calibration_map", "other"]

    @field_validator("path")
    @classmethod
    def _path_ok(cls, v: str) -> str:
        return _safe_path(v)


class ArtifactInfo(_Frozen):
    path: str
    format: Literal["onnx", "tflite"]
    runtime: Literal["onnxruntime", "tflite", "tensorrt"]
    precision: Literal["fp32", "fp16", "int8"]
    execution_providers: tuple[str, ...] = ()
    #: provider options, TensorRT build recipe and the like, recorded for the device
    runtime_options: dict[str, Any] = Field(default_factory=dict)


class OutputCheck(_Frozen):
    """Artifact vs float model on held-out samples, for one output."""

    output: str
    samples: int = Field(ge=0)
    top1_agreement: float | None = None
    max_abs_error: float
    mean_abs_error: float
    snr_db: float | None = None


class VerificationReport(_Frozen):
    samples: int = Field(ge=0)
    outputs: tuple[OutputCheck, ...]
    float_top1_accuracy: float | None = None
    artifact_top1_accuracy: float | None = None
    top1_drop_points: float | None = None
    gate: dict[str, float] = Field(default_factory=dict)
    passed: bool
    runtime: str = ""
    notes: tuple[str, ...] = ()


class GoldenSpec(_Frozen):
    """Golden input/output pairs for the agent's on-device self-test."""

    path: str
    count: int = Field(ge=1, le=1024)
    atol: float = Field(ge=0.0)
    rtol: float = Field(ge=0.0)
    #: fraction of golden samples whose top-1 must match (classifiers)
    min_top1_match: float | None = Field(default=None, ge=0.0, le=1.0)


class BundleManifest(_Frozen):
    schema_version: int = 1
    format: Literal["edgefleet-bundle/1"] = "edgefleet-bundle/1"
    model: ModelInfo
    profile: str = Field(min_length=1, max_length=64)
    #: optional narrowing to device ids or tags ("tag:NAME"); empty = every device of the profile
    device_selectors: tuple[str, ...] = Field(default=(), max_length=1024)
    created_at: datetime
    expires_at: datetime
    files: tuple[FileEntry, ...] = Field(min_length=1, max_length=MAX_BUNDLE_FILES)
    artifact: ArtifactInfo
    inputs: tuple[TensorSpec, ...] = Field(min_length=1)
    outputs: tuple[TensorSpec, ...] = Field(min_length=1)
    task: Literal["classification", "regression", "other"] = "classification"
    class_names: tuple[str, ...] = ()
    quantization: dict[str, Any] = Field(default_factory=dict)
    verification: VerificationReport | None = None
    baseline_sketches: str | None = None
    golden: GoldenSpec | None = None
    lineage: dict[str, Any] = Field(default_factory=dict)
    host_figures: dict[str, Any] = Field(default_factory=dict)
    #: the release keys expected to sign this manifest (bound into the signed bytes)
    key_ids: tuple[str, ...] = ()

    @field_validator("files")
    @classmethod
    def _unique_paths(cls, v: tuple[FileEntry, ...]) -> tuple[FileEntry, ...]:
        paths = [f.path for f in v]
        if len(set(paths)) != len(paths):
            raise ValueError("duplicate file paths in manifest")
        return v

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def check_consistency(self) -> None:
        """Every path the manifest names elsewhere must be one of its files."""
        paths = {f.path for f in self.files}
        named = [self.artifact.path]
        if self.baseline_sketches:
            named.append(self.baseline_sketches)
        if self.golden:
            named.append(self.golden.path)
        missing = [p for p in named if p not in paths]
        if missing:
            raise BundleFormatError(f"manifest names files it does not list: {missing}")
        if self.expires_at <= self.created_at:
            raise BundleFormatError("manifest expires_at is not after created_at")


def manifest_bytes(manifest: BundleManifest) -> bytes:
    """The canonical bytes that get signed and stored as manifest.json."""
    return canonical_bytes(manifest.model_dump(mode="json"))


def parse_manifest(raw: bytes) -> BundleManifest:
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleFormatError(f"manifest is {len(raw)} bytes; the limit is {MAX_MANIFEST_BYTES}")
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise BundleFormatError(f"manifest.json is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise BundleFormatError("manifest.json must hold an object")
    if obj.get("schema_version", 1) != 1:
        raise BundleFormatError(
            f"manifest schema_version {obj.get('schema_version')!r} is not supported (1)"
        )
    try:
        m = BundleManifest.model_validate(obj)
    except ValidationError as exc:
        errs = "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise BundleFormatError(f"manifest is invalid: {errs}") from exc
    m.check_consistency()
    return m
