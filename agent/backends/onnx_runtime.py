"""ONNX Runtime backend: providers from the manifest that this build has, else CPU."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import BackendError, ModelLoadError
from hardware_profiles import HardwareProfile
from protocol.manifest import BundleManifest

__all__ = ["OnnxRuntimeBackend", "choose_providers"]

log = logging.getLogger(__name__)

_CPU = "CPUExecutionProvider"


def choose_providers(wanted: Sequence[str], available: Sequence[str]) -> list[str]:
    """The wanted providers this build has, in the wanted order, always ending with CPU."""
    chosen = [p for p in wanted if p in available]
    if _CPU not in chosen:
        chosen.append(_CPU)
    return chosen


class OnnxRuntimeBackend:
    """Runs an ONNX (or QDQ ONNX) artifact with onnxruntime.InferenceSession."""

    def __init__(self, *, provider_options: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self._session: Any = None
        self._output_names: list[str] = []
        self._provider_options = dict(provider_options or {})
        self.description = "onnxruntime (not loaded)"

    def load(self, path: Path, manifest: BundleManifest, profile: HardwareProfile) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelLoadError(
                "onnxruntime is not installed; pip install 'edgefleet[agent]'"
            ) from exc
        wanted = list(manifest.artifact.execution_providers or profile.runtime.execution_providers)
        providers = choose_providers(wanted, ort.get_available_providers())
        missing = [p for p in wanted if p not in providers]
        if missing:
            log.warning(
                "execution providers %s are not in this onnxruntime build; using %s",
                missing,
                providers,
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, profile.runtime.threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: warnings would flood a device's journal
        options = [dict(self._provider_options.get(p, {})) for p in providers]
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=opts, providers=providers, provider_options=options
            )
        except Exception as exc:  # ORT raises its own non-exported exception types
            raise ModelLoadError(f"onnxruntime cannot load {path.name}: {exc}") from exc
        self._output_names = [o.name for o in self._session.get_outputs()]
        declared = [o.name for o in manifest.outputs]
        if sorted(declared) != sorted(self._output_names):
            raise ModelLoadError(
                f"model outputs {self._output_names} differ from the manifest's {declared}"
            )
        used = self._session.get_providers()
        self.description = f"onnxruntime[{','.join(used)}]"

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise BackendError("backend is not loaded")
        try:
            values = self._session.run(self._output_names, dict(inputs))
        except Exception as exc:
            raise BackendError(f"onnxruntime run failed: {exc}") from exc
        return dict(zip(self._output_names, values, strict=True))

    def close(self) -> None:
        self._session = None
