"""The typed, frozen shape of a hardware profile (one device class).

Values are checked by `hardware_profiles.loader`, which knows the file and key to blame;
constructing these classes directly (e.g. in tests) skips that validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = [
    "BACKENDS",
    "CPU_ARCHES",
    "PRECISIONS",
    "QUANT_TYPES",
    "AccuracySpec",
    "Backend",
    "CpuArch",
    "HardwareProfile",
    "LimitsSpec",
    "Precision",
    "PrecisionSpec",
    "QuantType",
    "RuntimeSpec",
    "TensorRTSpec",
]

Backend = Literal["tensorrt", "tflite", "onnxruntime"]
CpuArch = Literal["aarch64", "x86_64"]
Precision = Literal["fp32", "fp16", "int8"]
QuantType = Literal["int8", "uint8"]

BACKENDS: Final[tuple[Backend, ...]] = ("onnxruntime", "tensorrt", "tflite")
CPU_ARCHES: Final[tuple[CpuArch, ...]] = ("aarch64", "x86_64")
PRECISIONS: Final[tuple[Precision, ...]] = ("fp32", "fp16", "int8")
QUANT_TYPES: Final[tuple[QuantType, ...]] = ("int8", "uint8")


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeSpec:
    """Which inference runtime runs the artifact, and how."""

    backend: Backend
    #: ONNX Runtime execution providers in priority order (empty for tflite).
    execution_providers: tuple[str, ...] = ()
    #: TFLite / LiteRT delegates in priority order (empty for the ONNX-based backends).
    delegates: tuple[str, ...] = ()
    #: Intra-op threads the runtime may use.
    threads: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PrecisionSpec:
    """Which numeric precisions the device runs well, and how to quantize for it."""

    supported: tuple[Precision, ...]
    preferred: Precision
    activation_type: QuantType
    weight_type: QuantType
    per_channel: bool
    symmetric_activations: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsSpec:
    """Resource limits a bundle for this device must respect."""

    #: Device RAM (or GPU memory) available to the model at run time.
    memory_bytes: int
    #: Largest artifact the compiler may produce for this device.
    max_model_bytes: int
    #: p95 latency budget per inference, used by the agent's health window.
    latency_budget_ms: float


@dataclass(frozen=True, slots=True, kw_only=True)
class AccuracySpec:
    """Default accuracy gate the compiler's verification applies to a quantized artifact."""

    max_top1_drop_points: float
    min_snr_db: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorRTSpec:
    """TensorRT engine-builder settings (the engine is built on the device itself)."""

    workspace_bytes: int
    #: DLA core to use, or -1 for GPU only.
    dla_core: int
    #: TensorRT builder optimization level, 0..5 (3 is TensorRT's default).
    builder_optimization_level: int

    @property
    def uses_dla(self) -> bool:
        """True when layers may be placed on a DLA core."""
        return self.dla_core >= 0


@dataclass(frozen=True, slots=True, kw_only=True)
class HardwareProfile:
    """One device class: what runs on it, at which precision, within which limits."""

    name: str
    description: str
    cpu_arch: CpuArch
    runtime: RuntimeSpec
    precision: PrecisionSpec
    limits: LimitsSpec
    accuracy: AccuracySpec
    tensorrt: TensorRTSpec | None = None
    #: Where the profile was loaded from (a path, or "<string>"); not part of equality.
    source: str = field(default="<string>", compare=False)

    def allows(self, precision: str) -> bool:
        """True when `precision` ("fp32", "fp16", "int8") is supported on this device."""
        return precision in self.precision.supported

    @property
    def backend(self) -> Backend:
        """Shortcut for `runtime.backend`."""
        return self.runtime.backend
