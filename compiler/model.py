"""Loading the source ONNX model: checks, input/output signature and op coverage per target."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from compiler.errors import ModelError, UnsupportedOpError

if TYPE_CHECKING:
    from hardware_profiles import HardwareProfile

__all__ = [
    "TENSORRT_PROBLEM_OPS",
    "LoadedModel",
    "OpIssue",
    "TensorInfo",
    "check_ops",
    "load_model",
    "make_session",
    "ort_load_issue",
]

Dim = int | str | None

#: Ops TensorRT (10.x, as shipped in JetPack 6) rejects or runs poorly from ONNX; the engine
#: build on the device would fall back to CUDA/CPU for them or fail. Warned, not refused.
TENSORRT_PROBLEM_OPS: dict[str, str] = {
    "NonMaxSuppression": "needs the EfficientNMS plugin; ORT runs it on the CUDA/CPU EP",
    "Loop": "data-dependent loops split the TensorRT engine into several subgraphs",
    "If": "data-dependent control flow splits the TensorRT engine",
    "Scan": "not supported by the TensorRT ONNX parser",
    "Unique": "not supported by the TensorRT ONNX parser",
    "StringNormalizer": "strings are not supported by TensorRT",
    "TfIdfVectorizer": "not supported by the TensorRT ONNX parser",
    "ConvInteger": "integer ops are not TensorRT Q/DQ; quantize with QDQ instead",
    "MatMulInteger": "integer ops are not TensorRT Q/DQ; quantize with QDQ instead",
    "QLinearConv": "QOperator format; TensorRT needs QDQ",
    "QLinearMatMul": "QOperator format; TensorRT needs QDQ",
    "DynamicQuantizeLinear": "dynamic quantization is not supported by TensorRT",
    "RandomNormal": "random ops are not supported in TensorRT engines",
    "RandomUniform": "random ops are not supported in TensorRT engines",
}

_TRT_EP = "TensorrtExecutionProvider"
_ORT_MISSING = re.compile(
    r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorInfo:
    """One model input or output: name, numpy dtype name and shape (None/str = dynamic)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    @property
    def sample_shape(self) -> tuple[Dim, ...]:
        """The shape without the leading batch axis."""
        return self.shape[1:]

    @property
    def dynamic_axes(self) -> tuple[int, ...]:
        return tuple(i for i, d in enumerate(self.shape) if not isinstance(d, int))

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.dtype}[{dims}]"


@dataclass(frozen=True, slots=True, kw_only=True)
class OpIssue:
    """A node the target cannot run (error) or may run poorly (warning)."""

    node: str
    op_type: str
    reason: str
    severity: Literal["error", "warning"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadedModel:
    """The checked source model, its bytes' sha256 and its signature."""

    path: Path
    proto: Any  # onnx.ModelProto (kept Any so this module imports without onnx)
    sha256: str
    size_bytes: int
    opset: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    parameter_count: int

    def input(self, name: str) -> TensorInfo:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    def serialized(self) -> bytes:
        """The model with external data inlined, as one protobuf."""
        return bytes(self.proto.SerializeToString())


def _tensor_info(value: Any) -> TensorInfo:
    import onnx

    tt = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise ModelError(
            f"model input/output {value.name!r} is not a tensor (sequences and maps are not "
            f"supported); export the model with plain tensor inputs and outputs"
        )
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
    dims: list[Dim] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(str(d.dim_param))
        else:
            dims.append(None)
    return TensorInfo(name=value.name, dtype=dtype, shape=tuple(dims))


def load_model(path: Path) -> LoadedModel:
    """Read, check and describe an ONNX model; every failure is a `ModelError` naming why."""
    import onnx
    from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    raw = path.read_bytes()
    if not raw:
        raise ModelError(f"model file {path} is empty")
    try:
        proto = onnx.load_model_from_string(raw)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelError(
            f"{path} is not an ONNX model (protobuf decode failed: {exc}); the file may be "
            f"truncated or of another format"
        ) from exc
    if proto.ir_version == 0 or not proto.graph.node or not proto.opset_import:
        raise ModelError(
            f"{path} is not an ONNX model (no graph, IR version or opset); the file may be "
            f"truncated or of another format"
        )
    try:
        from onnx.external_data_helper import load_external_data_for_model, uses_external_data

        external = [t for t in proto.graph.initializer if uses_external_data(t)]
        locations = sorted(
            {e.value for t in external for e in t.external_data if e.key == "location"}
        )
        missing = [loc for loc in locations if not (path.parent / loc).is_file()]
        if missing:
            raise ModelError(
                f"{path} keeps its weights in external data file(s) {missing} that are missing "
                f"beside it; copy them next to the model or re-export with the weights inline"
            )
        if external:
            load_external_data_for_model(proto, str(path.parent))
    except (FileNotFoundError, OSError) as exc:
        raise ModelError(
            f"{path} keeps its weights in external data that is missing ({exc}); put the "
            f"data file(s) beside the model or re-export with the weights inline"
        ) from exc
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{path}: external data is invalid: {exc}") from exc
    try:
        onnx.checker.check_model(proto, full_check=False)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise ModelError(
            f"{path} is not a valid ONNX model: {first}; the file may be truncated or "
            f"exported by a newer ONNX than {onnx.__version__}"
        ) from exc
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    init_names = {t.name for t in proto.graph.initializer}
    inputs = tuple(_tensor_info(v) for v in proto.graph.input if v.name not in init_names)
    outputs = tuple(_tensor_info(v) for v in proto.graph.output)
    if not inputs or not outputs:
        raise ModelError(f"{path}: the model needs at least one input and one output")
    params = sum(
        int(_numel(t.dims)) for t in proto.graph.initializer if t.data_type in _FLOAT_TYPES
    )
    return LoadedModel(
        path=path,
        proto=proto,
        sha256=hashlib.sha256(raw).hexdigest(),
        size_bytes=proto.ByteSize(),
        opset=opset,
        inputs=inputs,
        outputs=outputs,
        parameter_count=params,
    )


_FLOAT_TYPES = frozenset({1, 10, 11, 16})  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _numel(dims: Any) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def ort_load_issue(model_bytes: bytes) -> tuple[list[OpIssue], str | None]:
    """Try to open the model in ONNX Runtime's CPU EP: (missing-kernel issues, other error)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own pybind exception types
        msg = str(exc)
        issues = [
            OpIssue(
                node=m.group(3),
                op_type=m.group(1),
                reason=f"ONNX Runtime {ort.__version__} has no CPU kernel for "
                f"{m.group(1)} (opset {m.group(2)}) with these input types",
                severity="error",
            )
            for m in _ORT_MISSING.finditer(msg)
        ]
        return issues, None if issues else msg
    return [], None


def check_ops(model: LoadedModel, profile: HardwareProfile) -> list[OpIssue]:
    """List nodes the profile's runtime cannot run (errors) or may run poorly (warnings).

    Raises `UnsupportedOpError` when ONNX Runtime cannot load the float model at all, since
    calibration and verification need it.
    """
    import onnxruntime as ort

    issues, other = ort_load_issue(model.serialized())
    if other is not None and "under development" in other:
        limit = re.search(r"support for domain \S+ is till opset (\d+)", other)
        raise ModelError(
            f"{model.path} uses opset {model.opset}, which ONNX Runtime {ort.__version__} cannot "
            f"run (it supports up to opset {limit.group(1) if limit else '?'}); re-export the "
            f"model with an older opset"
        )
    if other is not None:
        raise ModelError(
            f"ONNX Runtime {ort.__version__} cannot load {model.path} (opset {model.opset}): "
            f"{other.strip().splitlines()[0]}; re-export the model with an opset this runtime "
            f"supports or update onnxruntime"
        )
    if issues:
        listed = "; ".join(f"{i.node} ({i.op_type}): {i.reason}" for i in issues)
        raise UnsupportedOpError(f"the model holds operators the runtime cannot run: {listed}")
    # Jetson (backend tensorrt) and x86-cuda (ORT with the TensorRT EP first) both meet
    # TensorRT's ONNX parser; what it rejects falls back to CUDA/CPU or splits the engine.
    if profile.backend == "tensorrt" or _TRT_EP in profile.runtime.execution_providers:
        for node in model.proto.graph.node:
            reason = TENSORRT_PROBLEM_OPS.get(node.op_type)
            if reason is not None:
                issues.append(
                    OpIssue(
                        node=node.name or f"<unnamed {node.op_type}>",
                        op_type=node.op_type,
                        reason=reason,
                        severity="warning",
                    )
                )
    return issues


def make_session(model: bytes | str | Path, *, threads: int, optimized: bool = True) -> Any:
    """A CPU ONNX Runtime session with a fixed thread count (same threads, same numbers).

    optimized=False runs the graph as written (QDQ as float ops with fake quantization):
    a second implementation of the same artifact, used to measure rounding noise.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    src = str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"ONNX Runtime cannot load the model: {exc}") from exc
