"""A model loaded from a slot: its manifest, backend, baseline, and input checking."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from agent.backends import Backend, BackendFactory, create_backend
from agent.errors import AgentError, InvalidInputError, ModelLoadError
from hardware_profiles import HardwareProfile
from protocol.errors import ProtocolError
from protocol.features import Baseline
from protocol.manifest import BundleManifest, TensorSpec

__all__ = ["LoadedModel", "check_inputs", "load_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadedModel:
    """A bundle's model, ready to serve."""

    bundle_sha256: str
    manifest: BundleManifest
    backend: Backend
    baseline: Baseline | None
    directory: Path

    @property
    def model_name(self) -> str:
        return self.manifest.model.name

    @property
    def model_version(self) -> int:
        return self.manifest.model.version


def load_model(
    directory: Path,
    manifest: BundleManifest,
    bundle_sha256: str,
    profile: HardwareProfile,
    factory: BackendFactory = create_backend,
) -> LoadedModel:
    """Load the artifact (and baseline) of an extracted bundle; ModelLoadError if it fails."""
    artifact = directory / manifest.artifact.path
    if not artifact.is_file():
        raise ModelLoadError(f"artifact {manifest.artifact.path} is missing from {directory}")
    backend = factory(manifest.artifact.runtime)
    try:
        backend.load(artifact, manifest, profile)
    except AgentError:
        raise
    except Exception as exc:  # a runtime's own exception types, mapped at this seam
        raise ModelLoadError(f"cannot load {manifest.artifact.path}: {exc}") from exc
    return LoadedModel(
        bundle_sha256=bundle_sha256,
        manifest=manifest,
        backend=backend,
        baseline=_read_baseline(directory, manifest),
        directory=directory,
    )


def _read_baseline(directory: Path, manifest: BundleManifest) -> Baseline | None:
    if not manifest.baseline_sketches:
        return None
    try:
        return Baseline.model_validate_json((directory / manifest.baseline_sketches).read_bytes())
    except (OSError, ValidationError, ProtocolError) as exc:
        # Drift telemetry degrades to derived feature specs; serving is unaffected.
        log.warning("bundle baseline %s is unreadable: %s", manifest.baseline_sketches, exc)
        return None


def _dim_ok(want: Any, got: int) -> bool:
    return (
        want is None
        or isinstance(want, str)
        or (isinstance(want, int) and want < 0)
        or (want == got)
    )


def _spell(shape: tuple[Any, ...]) -> str:
    return "[" + ", ".join("N" if d is None or isinstance(d, str) else str(d) for d in shape) + "]"


def check_inputs(specs: tuple[TensorSpec, ...], inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Arrays matching the input signature (name, dtype, shape), or InvalidInputError."""
    if not isinstance(inputs, Mapping):
        raise InvalidInputError(
            f"inputs must be a mapping of input name to array; got {type(inputs).__name__}"
        )
    names = [s.name for s in specs]
    missing = [n for n in names if n not in inputs]
    extra = [n for n in inputs if n not in names]
    if missing or extra:
        raise InvalidInputError(
            f"the model takes inputs {names}; missing {missing}, unexpected {extra}"
        )
    out: dict[str, np.ndarray] = {}
    batch: int | None = None
    for spec in specs:
        arr = np.asarray(inputs[spec.name])
        if arr.dtype != np.dtype(spec.dtype):
            raise InvalidInputError(
                f"input {spec.name!r} has dtype {arr.dtype}; the model expects {spec.dtype} "
                f"(convert with .astype(np.{spec.dtype}))"
            )
        if arr.ndim != len(spec.shape) or not all(
            _dim_ok(w, g) for w, g in zip(spec.shape, arr.shape, strict=True)
        ):
            raise InvalidInputError(
                f"input {spec.name!r} has shape {list(arr.shape)}; the model expects "
                f"{_spell(spec.shape)} (N = any batch size)"
            )
        if arr.ndim and arr.shape[0] == 0:
            raise InvalidInputError(f"input {spec.name!r} is an empty batch")
        if arr.ndim:
            if batch is not None and arr.shape[0] != batch:
                raise InvalidInputError(
                    f"inputs disagree on the batch size ({batch} vs {arr.shape[0]})"
                )
            batch = arr.shape[0]
        out[spec.name] = arr
    return out
