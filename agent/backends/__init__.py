"""Inference runtimes behind one small interface, chosen by ``manifest.artifact.runtime``.

Each backend module imports its runtime lazily (inside ``load``), so importing this package
costs nothing and a device only needs the runtime its bundles use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from agent.errors import ModelLoadError
from hardware_profiles import HardwareProfile
from protocol.manifest import BundleManifest

__all__ = ["Backend", "BackendFactory", "create_backend"]


class Backend(Protocol):
    """One loaded model. ``run`` may be called from several threads at once."""

    #: what actually runs the model (e.g. "onnxruntime[CPUExecutionProvider]")
    description: str

    def load(self, path: Path, manifest: BundleManifest, profile: HardwareProfile) -> None:
        """Load the artifact at ``path``; raise ModelLoadError saying why it cannot."""
        ...

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; outputs are keyed by the manifest's output names."""
        ...

    def close(self) -> None:
        """Release the runtime's resources."""
        ...


#: builds an unloaded backend for a manifest's ``artifact.runtime``
BackendFactory = Callable[[str], Backend]


def create_backend(runtime: str) -> Backend:
    """The backend for a runtime name ("onnxruntime", "tflite", "tensorrt")."""
    if runtime == "onnxruntime":
        from agent.backends.onnx_runtime import OnnxRuntimeBackend

        return OnnxRuntimeBackend()
    if runtime == "tflite":
        from agent.backends.litert import LiteRTBackend

        return LiteRTBackend()
    if runtime == "tensorrt":
        from agent.backends.tensorrt_engine import TensorRTBackend

        return TensorRTBackend()
    raise ModelLoadError(f"bundle needs runtime {runtime!r}, which this agent does not know")
