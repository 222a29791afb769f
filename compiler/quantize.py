"""ONNX Runtime static QDQ quantization, driven by a typed config built from the profile."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from compiler.errors import CompileError, ModelError

if TYPE_CHECKING:
    from compiler.data import Dataset
    from hardware_profiles import HardwareProfile

__all__ = [
    "CALIBRATION_METHODS",
    "CalibrationMethod",
    "QuantConfig",
    "preprocess",
    "quantize_static",
    "quiet_ort",
]

CalibrationMethod = Literal["minmax", "entropy", "percentile"]
CALIBRATION_METHODS: tuple[CalibrationMethod, ...] = ("minmax", "entropy", "percentile")
QuantTypeName = Literal["int8", "uint8"]


@dataclass(frozen=True, slots=True, kw_only=True)
class QuantConfig:
    """Everything that decides how ONNX Runtime quantizes; recorded in the manifest."""

    activation_type: QuantTypeName
    weight_type: QuantTypeName
    per_channel: bool
    symmetric_activations: bool
    symmetric_weights: bool = True
    calibration_method: CalibrationMethod = "minmax"
    #: 7-bit weights: avoids U8S8 saturation on AVX2 CPUs without VNNI
    reduce_range: bool = False
    exclude_nodes: tuple[str, ...] = ()
    #: quantize only these nodes (None = every quantizable node); used by sensitivity
    only_nodes: tuple[str, ...] | None = None
    calibration_batch_size: int = 32

    @staticmethod
    def for_profile(
        profile: HardwareProfile,
        *,
        calibration_method: CalibrationMethod = "minmax",
        per_channel: bool | None = None,
        reduce_range: bool = False,
        exclude_nodes: Sequence[str] = (),
    ) -> QuantConfig:
        """The profile's quantization scheme, with the user's overrides."""
        p = profile.precision
        return QuantConfig(
            activation_type=p.activation_type,
            weight_type=p.weight_type,
            per_channel=p.per_channel if per_channel is None else per_channel,
            symmetric_activations=p.symmetric_activations,
            calibration_method=calibration_method,
            reduce_range=reduce_range,
            exclude_nodes=tuple(exclude_nodes),
        )

    @property
    def scheme(self) -> str:
        """Short name: U8S8, S8S8, ..."""
        short = {"uint8": "U8", "int8": "S8"}
        return f"{short[self.activation_type]}{short[self.weight_type]}"

    def with_changes(self, **changes: Any) -> QuantConfig:
        return replace(self, **changes)

    def describe(self) -> str:
        parts = [
            self.scheme,
            "per-channel" if self.per_channel else "per-tensor",
            self.calibration_method,
        ]
        if self.symmetric_activations:
            parts.append("symmetric")
        if self.reduce_range:
            parts.append("reduce-range")
        if self.exclude_nodes:
            parts.append(f"excluding {','.join(self.exclude_nodes)}")
        return " ".join(parts)

    def to_manifest(self) -> dict[str, Any]:
        return {
            "format": "QDQ",
            "scheme": self.scheme,
            "activation_type": self.activation_type,
            "weight_type": self.weight_type,
            "per_channel": self.per_channel,
            "symmetric_activations": self.symmetric_activations,
            "symmetric_weights": self.symmetric_weights,
            "calibration_method": self.calibration_method,
            "reduce_range": self.reduce_range,
            "exclude_nodes": list(self.exclude_nodes),
        }


@contextlib.contextmanager
def quiet_ort() -> Iterator[list[str]]:
    """Silence ONNX Runtime's quantization prints and warnings (stdout stays machine-readable).

    Yields a list that collects the warning messages, for the report's notes.
    """
    notes: list[str] = []
    sink = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(sink):
        warnings.simplefilter("always")
        yield notes
    notes.extend(sorted({str(w.message).splitlines()[0][:200] for w in caught}))


def _has_sympy() -> bool:
    try:
        import sympy  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    return True


def preprocess(model_bytes: bytes, out: Path) -> dict[str, Any]:
    """ORT's quant_pre_process (graph optimization + shape inference); returns its options.

    Symbolic shape inference needs sympy, which onnxruntime does not depend on; without it
    ONNX's own shape inference is used (enough for static-shape conv nets and MLPs).
    """
    import onnx
    from onnxruntime.quantization import quant_pre_process

    symbolic = _has_sympy()
    try:
        with quiet_ort():
            quant_pre_process(
                onnx.load_model_from_string(model_bytes),
                str(out),
                skip_symbolic_shape=not symbolic,
            )
    except Exception as exc:
        if not symbolic:
            raise ModelError(f"graph pre-processing failed: {exc}") from exc
        # Symbolic inference fails on some exotic graphs; plain ONNX inference still works.
        try:
            with quiet_ort():
                quant_pre_process(
                    onnx.load_model_from_string(model_bytes), str(out), skip_symbolic_shape=True
                )
        except Exception as exc2:
            raise ModelError(f"graph pre-processing failed: {exc2}") from exc2
        symbolic = False
    return {"optimized": True, "symbolic_shape_inference": symbolic}


def _reader(data: Dataset, batch_size: int) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches = list(data.batches(batch_size))
            self._i = 0

        def get_next(self) -> dict[str, Any] | None:
            if self._i >= len(self._batches):
                return None
            self._i += 1
            return self._batches[self._i - 1]

        def rewind(self) -> None:
            self._i = 0

    return _Reader()


def quantize_static(
    model_path: Path, out: Path, calibration: Dataset, config: QuantConfig
) -> list[str]:
    """Calibrate on `calibration` and write the QDQ model to `out`; returns ORT's warnings."""
    from onnxruntime.quantization import CalibrationMethod as OrtMethod
    from onnxruntime.quantization import QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    method = {
        "minmax": OrtMethod.MinMax,
        "entropy": OrtMethod.Entropy,
        "percentile": OrtMethod.Percentile,
    }[config.calibration_method]
    extra: dict[str, Any] = {
        "ActivationSymmetric": config.symmetric_activations,
        "WeightSymmetric": config.symmetric_weights,
    }
    try:
        with quiet_ort() as notes:
            ort_quantize_static(
                str(model_path),
                str(out),
                _reader(calibration, config.calibration_batch_size),
                quant_format=QuantFormat.QDQ,
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                activation_type=qtype[config.activation_type],
                weight_type=qtype[config.weight_type],
                nodes_to_quantize=list(config.only_nodes)
                if config.only_nodes is not None
                else None,
                nodes_to_exclude=list(config.exclude_nodes) or None,
                calibrate_method=method,
                extra_options=extra,
            )
    except CompileError:
        raise
    except Exception as exc:
        raise CompileError(
            f"ONNX Runtime quantization ({config.describe()}) failed: {exc}; try another "
            f"--calibration-method, --exclude-node the failing node, or --precision fp16/fp32"
        ) from exc
    return notes
