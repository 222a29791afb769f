"""LiteRT (TFLite) backend: ai_edge_litert, else tflite_runtime on old numpy-1 images.

Handles int8/uint8 model IO: float inputs are quantized with the tensor's scale and zero
point, and quantized outputs are dequantized, so callers see the manifest's float signature.
The interpreter is not thread-safe, so ``run`` holds a lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import BackendError, ModelLoadError
from hardware_profiles import HardwareProfile
from protocol.manifest import BundleManifest

__all__ = ["LiteRTBackend", "dequantize", "quantize"]

log = logging.getLogger(__name__)


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter
    except ImportError as exc:
        raise ModelLoadError(
            "neither ai_edge_litert nor tflite_runtime is installed; "
            "pip install 'edgefleet[agent-tflite]'"
        ) from exc


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype: np.dtype[Any]) -> np.ndarray:
    """Float to int8/uint8 with the tensor's affine parameters, saturating."""
    info = np.iinfo(dtype)
    q = np.round(x.astype(np.float32) / scale) + zero_point
    return np.asarray(np.clip(q, info.min, info.max).astype(dtype))


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Int8/uint8 to float32 with the tensor's affine parameters."""
    return ((q.astype(np.float32) - zero_point) * scale).astype(np.float32)


class LiteRTBackend:
    """Runs a .tflite artifact with the LiteRT interpreter."""

    def __init__(self) -> None:
        self._interp: Any = None
        self._lock = threading.Lock()
        self._inputs: list[tuple[str, dict[str, Any]]] = []  # (manifest name, tensor detail)
        self._outputs: list[tuple[str, dict[str, Any]]] = []
        self._float_in: dict[str, bool] = {}
        self._float_out: dict[str, bool] = {}
        self.description = "litert (not loaded)"

    def load(self, path: Path, manifest: BundleManifest, profile: HardwareProfile) -> None:
        interpreter = _interpreter_class()
        try:
            self._interp = interpreter(
                model_path=str(path), num_threads=max(1, profile.runtime.threads)
            )
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"LiteRT cannot load {path.name}: {exc}") from exc
        self._inputs = self._pair(manifest.inputs, self._interp.get_input_details(), "input")
        self._outputs = self._pair(manifest.outputs, self._interp.get_output_details(), "output")
        self._float_in = {s.name: s.dtype.startswith("float") for s in manifest.inputs}
        self._float_out = {s.name: s.dtype.startswith("float") for s in manifest.outputs}
        self.description = f"litert[{interpreter.__module__.split('.')[0]}]"

    @staticmethod
    def _pair(specs: Any, details: list[dict[str, Any]], what: str) -> list[tuple[str, Any]]:
        # TFLite tensor names often differ from ONNX ones (e.g. "serving_default_x:0"): match
        # by name when every name matches, else by position.
        if len(specs) != len(details):
            raise ModelLoadError(
                f"model has {len(details)} {what}s; the manifest declares {len(specs)}"
            )
        by_name = {d["name"]: d for d in details}
        if all(s.name in by_name for s in specs):
            return [(s.name, by_name[s.name]) for s in specs]
        return [(s.name, d) for s, d in zip(specs, details, strict=True)]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._interp is None:
            raise BackendError("backend is not loaded")
        with self._lock:
            try:
                return self._run_locked(inputs)
            except (ValueError, RuntimeError) as exc:
                raise BackendError(f"LiteRT run failed: {exc}") from exc

    def _run_locked(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        interp = self._interp
        resized = False
        for name, d in self._inputs:
            shape = tuple(inputs[name].shape)
            if tuple(d["shape"]) != shape:
                interp.resize_tensor_input(d["index"], shape)
                resized = True
        if resized:
            interp.allocate_tensors()
            self._inputs = [
                (n, self._refresh(d, interp.get_input_details())) for n, d in self._inputs
            ]
        for name, d in self._inputs:
            x = inputs[name]
            dtype = np.dtype(d["dtype"])
            scale, zero_point = d["quantization"]
            if dtype.kind in "iu" and scale and self._float_in[name]:
                x = quantize(x, scale, zero_point, dtype)
            interp.set_tensor(d["index"], np.ascontiguousarray(x, dtype=dtype))
        interp.invoke()
        out: dict[str, np.ndarray] = {}
        for name, d in self._outputs:
            y = interp.get_tensor(d["index"])
            scale, zero_point = d["quantization"]
            if np.dtype(d["dtype"]).kind in "iu" and scale and self._float_out[name]:
                y = dequantize(y, scale, zero_point)
            out[name] = np.array(y, copy=True)
        return out

    @staticmethod
    def _refresh(old: dict[str, Any], details: list[dict[str, Any]]) -> dict[str, Any]:
        return next(d for d in details if d["index"] == old["index"])

    def close(self) -> None:
        with self._lock:
            self._interp = None
