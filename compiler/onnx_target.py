"""ONNX targets: plain ONNX Runtime (x86-cpu, x86-cuda) and TensorRT-ready QDQ ONNX (Jetson)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from compiler.fp16 import convert_to_fp16
from compiler.model import make_session
from compiler.quantize import quantize_static
from compiler.target import BuildRequest, BuiltArtifact, ExtraFile, Runner

if TYPE_CHECKING:
    from hardware_profiles import HardwareProfile

__all__ = ["ARTIFACT_PATH", "RECIPE_PATH", "OnnxRuntimeTarget", "TensorRTTarget", "onnx_runner"]

ARTIFACT_PATH = "model/model.onnx"
RECIPE_PATH = "model/trt_recipe.json"
_TRT_EP = "TensorrtExecutionProvider"


def onnx_runner(path: Any, *, threads: int, optimized: bool = True) -> Runner:
    """A CPU-provider runner for an ONNX file: same graph as on the device, host kernels."""
    session = make_session(path, threads=threads, optimized=optimized)
    names = [o.name for o in session.get_outputs()]

    def run(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(x) for x in session.run(names, dict(feeds))]

    return run


def _build_onnx(request: BuildRequest) -> tuple[Any, dict[str, Any], list[str]]:
    """Write model.onnx for the precision; returns (path, quantization record, notes)."""
    out = request.workdir / "model.onnx"
    notes: list[str] = []
    if request.precision == "int8":
        assert request.quant is not None
        notes += quantize_static(request.preprocessed, out, request.calibration, request.quant)
        quant = request.quant.to_manifest()
    elif request.precision == "fp16":
        data, notes = convert_to_fp16(request.preprocessed.read_bytes())
        out.write_bytes(data)
        quant = {"format": "fp16", "keep_io_types": True}
    else:
        out.write_bytes(request.preprocessed.read_bytes())
        quant = {"format": "fp32"}
    return out, quant, notes


def _provider_options(profile: HardwareProfile, precision: str) -> dict[str, dict[str, Any]]:
    opts: dict[str, dict[str, Any]] = {}
    for ep in profile.runtime.execution_providers:
        if ep == _TRT_EP:
            opts[ep] = {
                "trt_fp16_enable": precision == "fp16",
                # QDQ nodes carry the scales: explicit int8, no TensorRT calibration table.
                "trt_int8_enable": precision == "int8",
                "trt_engine_cache_enable": True,
            }
        else:
            opts[ep] = {}
    return opts


class OnnxRuntimeTarget:
    """ONNX Runtime QDQ int8, fp16 or fp32 ONNX, run with the profile's providers."""

    backend = "onnxruntime"

    def check(self, profile: HardwareProfile) -> None:
        return None

    def build(self, request: BuildRequest) -> BuiltArtifact:
        path, quant, notes = _build_onnx(request)
        profile = request.profile
        return BuiltArtifact(
            local_path=path,
            bundle_path=ARTIFACT_PATH,
            format="onnx",
            runtime="onnxruntime",
            precision=request.precision,
            execution_providers=tuple(profile.runtime.execution_providers),
            runtime_options={
                "provider_options": _provider_options(profile, request.precision),
                "intra_op_num_threads": profile.runtime.threads,
            },
            quantization=quant,
            notes=tuple(notes),
        )

    def runner(self, artifact: BuiltArtifact, *, threads: int, optimized: bool = True) -> Runner:
        return onnx_runner(artifact.local_path, threads=threads, optimized=optimized)


def trt_input_shapes(request: BuildRequest) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shapes for the engine: batch 1..trt_max_batch, other axes as calibrated."""
    shapes: dict[str, dict[str, list[int]]] = {}
    for t in request.model.inputs:
        seen = request.calibration.inputs[t.name].shape
        lo: list[int] = []
        opt: list[int] = []
        hi: list[int] = []
        for axis, dim in enumerate(t.shape):
            if isinstance(dim, int):
                lo.append(dim)
                opt.append(dim)
                hi.append(dim)
            elif axis == 0:
                lo.append(1)
                opt.append(1)
                hi.append(request.trt_max_batch)
            else:
                lo.append(int(seen[axis]))
                opt.append(int(seen[axis]))
                hi.append(int(seen[axis]))
        shapes[t.name] = {"min": lo, "opt": opt, "max": hi}
    return shapes


class TensorRTTarget:
    """TensorRT-ready ONNX (symmetric S8S8 QDQ, fp16 or fp32) plus the engine build recipe.

    The engine is built on the device (engines are tied to GPU, TensorRT and JetPack
    versions); here the same QDQ graph is verified with ONNX Runtime's CPU provider.
    """

    backend = "tensorrt"

    def check(self, profile: HardwareProfile) -> None:
        return None

    def build(self, request: BuildRequest) -> BuiltArtifact:
        path, quant, notes = _build_onnx(request)
        profile = request.profile
        trt = profile.tensorrt
        recipe = {
            "schema_version": 1,
            "onnx": ARTIFACT_PATH,
            "precision": request.precision,
            # Precision comes from the graph (QDQ / fp16 types), as TensorRT >= 10 expects.
            "strongly_typed": request.precision != "fp32",
            "int8_source": "explicit_qdq" if request.precision == "int8" else None,
            "workspace_bytes": trt.workspace_bytes if trt else None,
            "dla_core": trt.dla_core if trt else -1,
            "builder_optimization_level": trt.builder_optimization_level if trt else 3,
            "input_shapes": trt_input_shapes(request),
            "engine_cache": "build on device on first load; cache per TensorRT version",
        }
        recipe_bytes = json.dumps(recipe, sort_keys=True, indent=2).encode() + b"\n"
        return BuiltArtifact(
            local_path=path,
            bundle_path=ARTIFACT_PATH,
            format="onnx",
            runtime="tensorrt",
            precision=request.precision,
            execution_providers=tuple(profile.runtime.execution_providers),
            runtime_options={
                "provider_options": _provider_options(profile, request.precision),
                "intra_op_num_threads": profile.runtime.threads,
                "trt_recipe": RECIPE_PATH,
            },
            quantization=quant,
            extra_files=(ExtraFile(path=RECIPE_PATH, data=recipe_bytes, role="recipe"),),
            notes=(*notes, "verified with ONNX Runtime's CPU provider on the same graph"),
        )

    def runner(self, artifact: BuiltArtifact, *, threads: int, optimized: bool = True) -> Runner:
        return onnx_runner(artifact.local_path, threads=threads, optimized=optimized)
