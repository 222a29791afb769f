"""The per-backend target registry: one handler per runtime backend builds the artifact.

A target turns the (pre-processed) float model into the artifact a device runs and knows
how to run that artifact on this host for verification. The TFLite target is a placeholder
until its converter lands: it registers under backend "tflite" and replaces the stub.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from compiler.errors import PrecisionError, TargetUnavailableError

if TYPE_CHECKING:
    from compiler.data import Dataset
    from compiler.model import LoadedModel
    from compiler.quantize import QuantConfig
    from hardware_profiles import HardwareProfile

__all__ = [
    "BuildRequest",
    "BuiltArtifact",
    "ExtraFile",
    "Runner",
    "Target",
    "register_target",
    "resolve_precision",
    "target_for",
]

Precision = Literal["fp32", "fp16", "int8"]

#: Runs a batch: feeds keyed by input name -> outputs in the model's output order.
Runner = Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildRequest:
    """What a target needs to build one artifact."""

    model: LoadedModel
    profile: HardwareProfile
    precision: Precision
    #: set when precision is int8
    quant: QuantConfig | None
    calibration: Dataset
    #: the float model after graph optimization, on disk
    preprocessed: Path
    workdir: Path
    trt_max_batch: int = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class ExtraFile:
    path: str
    data: bytes
    role: Literal["recipe", "calibration_map", "other"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BuiltArtifact:
    """An artifact on disk plus what the manifest says about it."""

    local_path: Path
    bundle_path: str
    format: Literal["onnx", "tflite"]
    runtime: Literal["onnxruntime", "tflite", "tensorrt"]
    precision: Precision
    execution_providers: tuple[str, ...] = ()
    runtime_options: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    extra_files: tuple[ExtraFile, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def size_bytes(self) -> int:
        return self.local_path.stat().st_size


class Target(Protocol):
    """One backend's handler."""

    backend: str

    def check(self, profile: HardwareProfile) -> None:
        """Raise before any work if this target cannot serve the profile."""
        ...

    def build(self, request: BuildRequest) -> BuiltArtifact:
        """Write the artifact under request.workdir."""
        ...

    def runner(self, artifact: BuiltArtifact, *, threads: int, optimized: bool = True) -> Runner:
        """Run the artifact on this host (verification, golden outputs).

        optimized=False: a second, unoptimized implementation, to measure rounding noise.
        """
        ...


_FACTORIES: dict[str, Callable[[], Target]] = {}


def register_target(backend: str, factory: Callable[[], Target]) -> None:
    """Register (or replace) the handler for a backend."""
    _FACTORIES[backend] = factory


def _register_builtin() -> None:
    if _FACTORIES:
        return
    from compiler.onnx_target import OnnxRuntimeTarget, TensorRTTarget
    from compiler.tflite_target import TfliteTarget

    _FACTORIES.setdefault("onnxruntime", OnnxRuntimeTarget)
    _FACTORIES.setdefault("tensorrt", TensorRTTarget)
    _FACTORIES.setdefault("tflite", TfliteTarget)


def target_for(profile: HardwareProfile) -> Target:
    """The handler for the profile's backend."""
    _register_builtin()
    factory = _FACTORIES.get(profile.backend)
    if factory is None:
        raise TargetUnavailableError(
            f"no compiler target for backend {profile.backend!r} (profile {profile.name}); "
            f"known backends: {sorted(_FACTORIES)}"
        )
    return factory()


def resolve_precision(profile: HardwareProfile, requested: str | None) -> Precision:
    """The requested precision if the profile allows it, else the profile's preferred one."""
    if requested is None:
        return profile.precision.preferred
    if requested not in ("fp32", "fp16", "int8"):
        raise PrecisionError(f"unknown precision {requested!r}; use one of fp32, fp16, int8")
    if not profile.allows(requested):
        allowed: Sequence[str] = profile.precision.supported
        raise PrecisionError(
            f"profile {profile.name} does not allow precision {requested!r}; allowed: "
            f"{', '.join(allowed)} (preferred: {profile.precision.preferred})"
        )
    return requested  # type: ignore[return-value]
