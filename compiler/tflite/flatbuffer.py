"""A thin writer over LiteRT's flatbuffer object API: tensors, buffers, operators, bytes.

Everything TFLite-schema-specific that is not an op's meaning lives here, so the op
handlers only say "this op, these tensors, these options".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["TFL_DTYPES", "ModelWriter", "QParams", "schema"]


def schema() -> Any:
    """The TFLite schema module LiteRT ships (imported lazily: heavy, and only needed here)."""
    from ai_edge_litert import schema_py_generated as s

    return s


#: numpy dtype name -> TensorType name in the schema
TFL_DTYPES = {
    "float32": "FLOAT32",
    "float16": "FLOAT16",
    "int8": "INT8",
    "uint8": "UINT8",
    "int32": "INT32",
    "int64": "INT64",
    "bool": "BOOL",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class QParams:
    """Affine quantization of one tensor: per-tensor (axis None) or per-channel on `axis`."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int | None = None

    @staticmethod
    def of(scale: Any, zero_point: Any, axis: int | None = None) -> QParams:
        s = np.atleast_1d(np.asarray(scale, dtype=np.float32)).astype(np.float64)
        z = np.atleast_1d(np.asarray(zero_point)).astype(np.int64)
        if z.size == 1 and s.size > 1:
            z = np.repeat(z, s.size)
        return QParams(
            scale=tuple(float(x) for x in s),
            zero_point=tuple(int(x) for x in z),
            axis=axis if s.size > 1 else None,
        )

    @property
    def per_tensor(self) -> bool:
        return len(self.scale) == 1


@dataclass(slots=True)
class ModelWriter:
    """Collects one subgraph's tensors and operators, then packs the model."""

    tensors: list[Any] = field(default_factory=list)
    operators: list[Any] = field(default_factory=list)
    buffers: list[Any] = field(default_factory=list)
    opcodes: list[Any] = field(default_factory=list)
    _opcode_index: dict[tuple[int, int], int] = field(default_factory=dict)
    #: operator index -> the ONNX node it came from (to name the node in LiteRT errors)
    origins: list[str] = field(default_factory=list)
    origin: str = ""

    def __post_init__(self) -> None:
        s = schema()
        self.buffers.append(s.BufferT())  # buffer 0: the empty sentinel TFLite requires

    def tensor(
        self,
        name: str,
        shape: Sequence[int],
        dtype: str,
        *,
        q: QParams | None = None,
        data: np.ndarray | None = None,
        signature: Sequence[int] | None = None,
    ) -> int:
        """Add a tensor (a constant when `data` is given); returns its index."""
        s = schema()
        t = s.TensorT()
        t.name = name
        t.shape = np.asarray(list(shape), dtype=np.int32)
        if signature is not None and list(signature) != list(shape):
            t.shapeSignature = np.asarray(list(signature), dtype=np.int32)
        t.type = getattr(s.TensorType, TFL_DTYPES[dtype])
        t.buffer = 0
        if data is not None:
            arr = np.array(data, dtype=np.dtype(dtype), order="C")
            if tuple(arr.shape) != tuple(shape):
                raise AssertionError(f"constant {name}: data {arr.shape} vs shape {tuple(shape)}")
            b = s.BufferT()
            b.data = np.frombuffer(arr.tobytes(), dtype=np.uint8)
            self.buffers.append(b)
            t.buffer = len(self.buffers) - 1
        if q is not None:
            qp = s.QuantizationParametersT()
            qp.scale = [float(x) for x in q.scale]
            qp.zeroPoint = [int(x) for x in q.zero_point]
            qp.quantizedDimension = int(q.axis or 0)
            t.quantization = qp
        self.tensors.append(t)
        return len(self.tensors) - 1

    def op(
        self,
        code: str,
        inputs: Sequence[int],
        outputs: Sequence[int],
        options: Any = None,
        *,
        version: int = 1,
    ) -> None:
        """Append an operator (`code` is a BuiltinOperator name; -1 marks an absent input)."""
        s = schema()
        builtin = getattr(s.BuiltinOperator, code)
        key = (builtin, version)
        if key not in self._opcode_index:
            oc = s.OperatorCodeT()
            oc.builtinCode = builtin
            # Codes past 127 live only in builtinCode; the deprecated int8 field says so.
            oc.deprecatedBuiltinCode = min(builtin, 127)
            oc.version = version
            self.opcodes.append(oc)
            self._opcode_index[key] = len(self.opcodes) - 1
        o = s.OperatorT()
        o.opcodeIndex = self._opcode_index[key]
        o.inputs = [int(i) for i in inputs]
        o.outputs = [int(i) for i in outputs]
        if options is not None:
            kind = type(options).__name__.removesuffix("T")
            o.builtinOptionsType = getattr(s.BuiltinOptions, kind)
            o.builtinOptions = options
        self.operators.append(o)
        self.origins.append(self.origin)

    def pack(self, inputs: Sequence[int], outputs: Sequence[int], description: str) -> bytes:
        """The finished .tflite bytes."""
        import flatbuffers  # type: ignore[import-untyped]

        s = schema()
        sg = s.SubGraphT()
        sg.tensors = self.tensors
        sg.operators = self.operators
        sg.inputs = list(inputs)
        sg.outputs = list(outputs)
        sg.name = "main"
        m = s.ModelT()
        m.version = 3
        m.description = description
        m.operatorCodes = self.opcodes
        m.subgraphs = [sg]
        m.buffers = self.buffers
        b = flatbuffers.Builder(1024)
        b.Finish(m.Pack(b), file_identifier=b"TFL3")
        return bytes(b.Output())
