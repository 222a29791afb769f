"""The TFLite target (Raspberry Pi profiles): ONNX Runtime's QDQ calibration -> TFLite int8.

int8: the compiler's ORT path quantizes the pre-processed model (int8 activations and
weights, per-channel, as the profile says); `compiler.tflite` then converts that QDQ graph
with the very same scales, and the result is checked against ORT's QDQ model here (the note
in the verification report). fp16: float16 weights with DEQUANTIZE feeding float ops. fp32.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compiler.errors import TargetUnavailableError
from compiler.target import BuildRequest, BuiltArtifact, Runner

if TYPE_CHECKING:
    from compiler.tflite import IoType
    from hardware_profiles import HardwareProfile

__all__ = ["ARTIFACT_PATH", "QDQ_CHECK_SAMPLES", "TfliteTarget", "qdq_agreement"]

ARTIFACT_PATH = "model/model.tflite"
#: calibration samples run through both TFLite and ORT's QDQ model at build time
QDQ_CHECK_SAMPLES = 128


def qdq_agreement(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, float | None]:
    """Top-1 agreement (first [N, C] output), max |err| and SNR of a against b."""
    ref = np.concatenate([x.reshape(x.shape[0], -1) for x in b], axis=1).astype(np.float64)
    got = np.concatenate([x.reshape(x.shape[0], -1) for x in a], axis=1).astype(np.float64)
    noise = float(np.sum((ref - got) ** 2))
    signal = float(np.sum(ref**2))
    snr = 200.0 if noise == 0 else (10 * math.log10(signal / noise) if signal else None)
    top1 = None
    if b[0].ndim == 2 and b[0].shape[1] >= 2:
        top1 = float(np.mean(a[0].argmax(1) == b[0].argmax(1)))
    return {"top1_agreement": top1, "max_abs_error": float(np.abs(ref - got).max()), "snr_db": snr}


class TfliteTarget:
    """Builds model/model.tflite for LiteRT; runs it in LiteRT for verification."""

    backend = "tflite"

    def __init__(self, *, io_type: IoType | None = None) -> None:
        #: None: float32 IO unless the profile's runtime asks for int8 (`tflite_io_type`)
        self.io_type = io_type

    def check(self, profile: HardwareProfile) -> None:
        try:
            import ai_edge_litert.interpreter  # noqa: F401
            import flatbuffers  # type: ignore[import-untyped]  # noqa: F401
        except ImportError as exc:
            raise TargetUnavailableError(
                f"profile {profile.name} needs the TFLite converter, which needs ai-edge-litert "
                f"and flatbuffers (pip install ai-edge-litert): {exc}"
            ) from exc

    def _io_type(self, profile: HardwareProfile) -> IoType:
        if self.io_type is not None:
            return self.io_type
        asked = getattr(profile.runtime, "tflite_io_type", None)
        return "int8" if asked == "int8" else "float32"

    def build(self, request: BuildRequest) -> BuiltArtifact:
        import onnx

        from compiler.quantize import quantize_static
        from compiler.tflite import convert, litert_runner, load_check

        self.check(request.profile)
        profile = request.profile
        notes: list[str] = []
        io_type = self._io_type(profile)
        qdq_path: Path | None = None
        if request.precision == "int8":
            assert request.quant is not None
            quant = request.quant
            if quant.activation_type != "int8" or quant.weight_type != "int8":
                # TFLite's int8 spec: int8 activations and weights, never uint8.
                quant = quant.with_changes(activation_type="int8", weight_type="int8")
                notes.append("quantized S8S8 for TFLite (the profile asked for another scheme)")
            qdq_path = request.workdir / "model.qdq.onnx"
            notes += quantize_static(request.preprocessed, qdq_path, request.calibration, quant)
            source = onnx.load(str(qdq_path))
            quantization: dict[str, Any] = {
                **quant.to_manifest(),
                "format": "tflite-int8",
                "calibration_source": "ONNX Runtime QDQ (scales reused as-is)",
                "weights": "int8 symmetric per-channel (conv axis 0, depthwise axis 3, FC axis 0)",
                "activations": "int8 asymmetric per-tensor",
                "bias": "int32, scale = input_scale * weight_scale",
            }
        else:
            source = onnx.load(str(request.preprocessed))
            quantization = (
                {"format": "tflite-fp16", "weights": "float16 + DEQUANTIZE"}
                if request.precision == "fp16"
                else {"format": "tflite-fp32"}
            )
        t0 = time.perf_counter()
        conv = convert(
            source, mode=request.precision, io_type=io_type, name=request.model.path.stem
        )
        convert_s = time.perf_counter() - t0
        load_check(conv.data, origins=conv.origins, threads=profile.runtime.threads)
        out = request.workdir / "model.tflite"
        out.write_bytes(conv.data)
        quantization.update({"io_type": io_type, "io_quantization": conv.io_quantization})
        notes.append(
            f"TFLite {request.precision}: ops {conv.op_counts}; {conv.transposes} layout "
            f"transpose(s); converted in {convert_s:.2f} s; verified in LiteRT (ai-edge-litert), "
            f"{profile.runtime.threads} threads"
        )
        if conv.float_ops:
            notes.append(
                f"nodes ONNX Runtime left in float run in float in TFLite too: "
                f"{', '.join(conv.float_ops[:8])}"
            )
        if qdq_path is not None:
            notes.append(self._qdq_note(request, out, qdq_path, litert_runner))
        return BuiltArtifact(
            local_path=out,
            bundle_path=ARTIFACT_PATH,
            format="tflite",
            runtime="tflite",
            precision=request.precision,
            runtime_options={
                "num_threads": profile.runtime.threads,
                "delegates": list(profile.runtime.delegates),
                "io_type": io_type,
            },
            quantization=quantization,
            notes=tuple(notes),
        )

    @staticmethod
    def _qdq_note(request: BuildRequest, tfl: Path, qdq: Path, make_runner: Any) -> str:
        """TFLite int8 against ORT's QDQ model on calibration samples (same scales)."""
        from compiler.onnx_target import onnx_runner
        from compiler.verify import run_all

        n = min(request.calibration.count, QDQ_CHECK_SAMPLES)
        feeds = request.calibration.take(np.arange(n))
        threads = request.profile.runtime.threads
        mine = run_all(make_runner(tfl, threads=threads), feeds, request.model.inputs)
        ref = run_all(onnx_runner(qdq, threads=threads), feeds, request.model.inputs)
        fig = qdq_agreement(mine, ref)
        top1 = "-" if fig["top1_agreement"] is None else f"{fig['top1_agreement']:.4f}"
        snr = "-" if fig["snr_db"] is None else f"{fig['snr_db']:.1f} dB"
        return (
            f"QDQ agreement: TFLite int8 vs ONNX Runtime QDQ int8 (same scales) on {n} "
            f"calibration samples: top-1 agreement {top1}, max |err| "
            f"{fig['max_abs_error']:.4g}, SNR {snr}"
        )

    def runner(self, artifact: BuiltArtifact, *, threads: int, optimized: bool = True) -> Runner:
        from compiler.tflite import litert_runner

        return litert_runner(artifact.local_path, threads=threads, optimized=optimized)  # type: ignore[no-any-return]
