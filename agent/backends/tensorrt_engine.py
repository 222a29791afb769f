"""TensorRT backend for Jetsons.

The bundle carries a QDQ ONNX (explicit int8 scales) that TensorRT builds an engine from on
the device. A native build through the ``tensorrt`` Python API is not implemented yet; this
backend runs the same ONNX through ONNX Runtime, asking for its TensorRT execution provider
(which builds and caches the engine beside the artifact) and then CUDA, and falls back to the
CPU with a logged reason where neither is present (e.g. on a development machine).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from agent.backends.onnx_runtime import OnnxRuntimeBackend
from agent.errors import BackendError
from hardware_profiles import HardwareProfile
from protocol.manifest import BundleManifest

__all__ = ["TensorRTBackend"]

log = logging.getLogger(__name__)

_TRT_EP = "TensorrtExecutionProvider"


class TensorRTBackend:
    """QDQ ONNX through ONNX Runtime's TensorRT EP (engine cached per slot), else CUDA/CPU."""

    def __init__(self) -> None:
        self._inner: OnnxRuntimeBackend | None = None
        self.description = "tensorrt (not loaded)"

    def load(self, path: Path, manifest: BundleManifest, profile: HardwareProfile) -> None:
        if importlib.util.find_spec("tensorrt") is not None:
            log.info(
                "tensorrt is importable, but native engine builds are not implemented yet; "
                "using ONNX Runtime's TensorRT execution provider if this build has it"
            )
        cache = path.parent / ".trt_cache"
        cache.mkdir(exist_ok=True)
        trt_options: dict[str, object] = {
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(cache),
            "trt_int8_enable": str(manifest.artifact.precision == "int8"),
            "trt_fp16_enable": str(manifest.artifact.precision in ("fp16", "int8")),
        }
        if profile.tensorrt is not None:
            trt_options["trt_max_workspace_size"] = str(profile.tensorrt.workspace_bytes)
            trt_options["trt_builder_optimization_level"] = str(
                profile.tensorrt.builder_optimization_level
            )
            if profile.tensorrt.uses_dla:
                trt_options["trt_dla_enable"] = "True"
                trt_options["trt_dla_core"] = str(profile.tensorrt.dla_core)
        providers = (
            manifest.artifact.execution_providers
            or profile.runtime.execution_providers
            or (_TRT_EP, "CUDAExecutionProvider")
        )
        patched = manifest.model_copy(
            update={
                "artifact": manifest.artifact.model_copy(
                    update={"execution_providers": tuple(providers)}
                )
            }
        )
        inner = OnnxRuntimeBackend(provider_options={_TRT_EP: trt_options})
        inner.load(path, patched, profile)
        if _TRT_EP not in inner.description:
            log.warning(
                "TensorRT is not available to ONNX Runtime here; running the QDQ ONNX with %s",
                inner.description,
            )
        self._inner = inner
        self.description = f"tensorrt-via-{inner.description}"

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._inner is None:
            raise BackendError("backend is not loaded")
        return self._inner.run(inputs)

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
