"""Emission state: where each ONNX tensor lives in the TFLite graph, in which layout and type.

Every ONNX tensor maps to a `Stored` TFLite tensor plus a permutation `perm` with
``tflite_tensor == onnx_tensor.transpose(perm)``. Convolution-side 4-D tensors are stored NHWC
(perm (0, 2, 3, 1)); a consumer that needs another layout or type asks `Context.get`, which
inserts one TRANSPOSE, QUANTIZE or DEQUANTIZE (cached, so each conversion happens once).
Constants are laid out at conversion time instead, so they never cost a runtime op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from compiler.errors import ModelError, UnsupportedOpError
from compiler.tflite.flatbuffer import ModelWriter, QParams, schema
from compiler.tflite.graph import Graph

__all__ = [
    "NHWC",
    "Context",
    "Mode",
    "Stored",
    "compose",
    "default_perm",
    "identity",
    "inverse",
]

Mode = Literal["int8", "fp16", "fp32"]
NHWC = (0, 2, 3, 1)
#: constants this small stay float32 in fp16 mode (a DEQUANTIZE would cost more than it saves)
_FP16_MIN_ELEMENTS = 16


def identity(rank: int) -> tuple[int, ...]:
    return tuple(range(rank))


def default_perm(rank: int) -> tuple[int, ...]:
    """The layout a fresh tensor of this rank is stored in: NHWC for 4-D, as-is otherwise."""
    return NHWC if rank == 4 else identity(rank)


def inverse(perm: Sequence[int]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def compose(stored: Sequence[int], wanted: Sequence[int]) -> tuple[int, ...]:
    """The TRANSPOSE perm taking a tensor stored as `stored` to layout `wanted`."""
    inv = inverse(stored)
    return tuple(inv[w] for w in wanted)


@dataclass(frozen=True, slots=True, kw_only=True)
class Stored:
    """One ONNX tensor as it exists in the TFLite graph."""

    tensor: int
    perm: tuple[int, ...]
    dtype: str
    q: QParams | None = None
    #: set on a flattened NHWC tensor: element i holds ONNX element cols[i] (an FC consumer
    #: permutes its weight columns instead of transposing at run time)
    cols: np.ndarray | None = None


def own_qparams(x: np.ndarray) -> QParams:
    """Asymmetric per-tensor int8 parameters covering x and 0 (for constants ORT left float)."""
    lo = min(0.0, float(x.min()) if x.size else 0.0)
    hi = max(0.0, float(x.max()) if x.size else 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zp = int(np.clip(round(-128 - lo / scale), -128, 127))
    return QParams.of(scale, zp)


def quantize_array(x: np.ndarray, q: QParams, dtype: str = "int8") -> np.ndarray:
    """Float array to integers with q (per-channel along q.axis)."""
    scale = np.asarray(q.scale, dtype=np.float64)
    zp = np.asarray(q.zero_point, dtype=np.float64)
    if not q.per_tensor:
        shape = [1] * x.ndim
        shape[q.axis or 0] = scale.size
        scale = scale.reshape(shape)
        zp = zp.reshape(shape)
    info = np.iinfo(np.dtype(dtype))
    v = np.round(x.astype(np.float64) / scale) + zp
    return np.clip(v, info.min, info.max).astype(dtype)


class Context:
    """Builds the TFLite graph one ONNX node at a time (handlers call these methods)."""

    def __init__(self, graph: Graph, writer: ModelWriter, *, mode: Mode) -> None:
        self.graph = graph
        self.w = writer
        self.mode: Mode = mode
        self.values: dict[str, Stored] = {}
        self._cache: dict[tuple[Any, ...], Stored] = {}
        #: nodes already emitted as part of another (fused activations)
        self.absorbed: set[int] = set()
        self.node: Any = None
        self._names: set[str] = set()
        self.transposes = 0

    # -- naming and shapes ---------------------------------------------------------------
    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            i += 1
            name = f"{base}:{i}"
        self._names.add(name)
        return name

    def is_const(self, name: str) -> bool:
        return name in self.graph.consts

    def const(self, name: str) -> np.ndarray:
        c = self.graph.const(name)
        if c is None:
            raise UnsupportedOpError(
                f"node {self.node_label()}: input {name!r} must be a constant (it is computed "
                f"at run time), which this converter does not support for {self.node.op_type}"
            )
        return c

    def node_label(self) -> str:
        n = self.node
        return f"{n.name or '<unnamed>'} ({n.op_type})" if n is not None else "<graph>"

    def unsupported(self, why: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"node {self.node_label()}: {why}")

    def shape(self, name: str) -> tuple[int, ...]:
        return self.graph.shape(name)

    def stored(self, name: str) -> Stored:
        if name in self.values:
            return self.values[name]
        if self.is_const(name):
            c = self.const(name)
            return self.get(name, perm=default_perm(c.ndim))
        raise ModelError(
            f"tensor {name!r} is used before it is produced (node {self.node_label()})"
        )

    def perm_of(self, name: str) -> tuple[int, ...]:
        """The layout an input is in now (constants: the default layout of their rank)."""
        if name in self.values:
            return self.values[name].perm
        return default_perm(len(self.shape(name)))

    # -- tensors -------------------------------------------------------------------------
    def _signature(self, onnx_name: str | None, perm: Sequence[int]) -> list[int] | None:
        if onnx_name is None or onnx_name not in self.graph.shapes:
            return None
        sig = self.graph.signature(onnx_name)
        if len(sig) != len(perm):
            return None
        return [sig[p] for p in perm]

    def tensor(
        self,
        base: str,
        shape: Sequence[int],
        dtype: str,
        *,
        q: QParams | None = None,
        data: np.ndarray | None = None,
        like: str | None = None,
        perm: Sequence[int] | None = None,
    ) -> int:
        """A new TFLite tensor; `like`+`perm`: copy the batch signature of that ONNX tensor."""
        sig = self._signature(like, perm) if like is not None and perm is not None else None
        return self.w.tensor(self.fresh(base), shape, dtype, q=q, data=data, signature=sig)

    def int_const(self, base: str, values: Any, dtype: str = "int32") -> int:
        arr = np.asarray(values, dtype=dtype)
        return self.w.tensor(self.fresh(base), arr.shape, dtype, data=arr)

    def output(
        self,
        name: str,
        *,
        perm: Sequence[int],
        dtype: str,
        q: QParams | None = None,
        cols: np.ndarray | None = None,
        shape: Sequence[int] | None = None,
    ) -> int:
        """Create the TFLite tensor for ONNX tensor `name` in layout `perm`, and record it."""
        perm = tuple(perm)
        onnx_shape = self.shape(name) if shape is None else tuple(shape)
        tshape = [onnx_shape[p] for p in perm] if len(perm) == len(onnx_shape) else onnx_shape
        idx = self.tensor(
            name, tshape, dtype, q=q if dtype == "int8" else None, like=name, perm=perm
        )
        self.values[name] = Stored(
            tensor=idx, perm=perm, dtype=dtype, q=q if dtype == "int8" else None, cols=cols
        )
        return idx

    def alias(self, name: str, src: str) -> None:
        """`name` is `src` (Identity, Dropout, free views)."""
        if self.is_const(src) and src not in self.values:
            self.graph.consts[name] = self.graph.consts[src]
            self.graph.shapes[name] = self.graph.shapes[src]
            return
        self.values[name] = self.stored(src)

    def op(
        self, code: str, inputs: Sequence[int], outputs: Sequence[int], options: Any = None
    ) -> None:
        self.w.op(code, inputs, outputs, options)

    # -- quantization --------------------------------------------------------------------
    def ann(self, name: str) -> QParams | None:
        return self.graph.ann.get(name) if self.mode == "int8" else None

    def int8_ready(self, name: str) -> bool:
        """Can `name` be fed as int8 (already int8, a constant, or calibrated)?"""
        if self.mode != "int8":
            return False
        if name in self.values:
            return self.values[name].dtype == "int8" or self.ann(name) is not None
        return self.is_const(name) or self.ann(name) is not None

    def want_int8(self, inputs: Sequence[str], output: str | None, *, free_q: bool = True) -> bool:
        """Run this node in int8? Inputs must be int8-ready; a free-parameter output must be
        calibrated (ONNX Runtime quantized it), else the node runs in float like in ORT."""
        if self.mode != "int8":
            return False
        if not all(self.int8_ready(i) for i in inputs if i):
            return False
        acts = [i for i in inputs if i and not self.is_const(i)]
        if not acts:
            return False
        return not (free_q and output is not None and self.ann(output) is None)

    # -- getting an input in the layout and type a handler needs ------------------------------
    def get(
        self, name: str, *, perm: Sequence[int] | None = None, dtype: str | None = None
    ) -> Stored:
        """`name` in layout `perm` (default: as stored) and type `dtype` (default: as stored)."""
        if self.is_const(name) and name not in self.values:
            c = self.const(name)
            rank = len(perm) if perm is not None else c.ndim
            want = tuple(perm) if perm is not None else default_perm(rank)
            return self._const(
                name, c, want, dtype or ("float32" if c.dtype.kind == "f" else c.dtype.name)
            )
        s = self.stored(name)
        want = tuple(perm) if perm is not None else s.perm
        if want != s.perm:
            s = self._transpose(name, s, want)
        if dtype is not None and dtype != s.dtype:
            s = self._convert(name, s, dtype)
        return s

    def _const(self, name: str, c: np.ndarray, perm: tuple[int, ...], dtype: str) -> Stored:
        key = ("const", name, perm, dtype)
        if key in self._cache:
            return self._cache[key]
        arr = c
        if arr.ndim < len(perm):  # numpy broadcasting aligns right: add leading unit axes
            arr = arr.reshape((1,) * (len(perm) - arr.ndim) + arr.shape)
        if arr.ndim == len(perm):
            arr = arr.transpose(perm)
        q = None
        if dtype == "int8":
            q = self.ann(name)
            if q is None or not q.per_tensor:
                q = own_qparams(arr.astype(np.float32))
            data = quantize_array(arr, q)
            idx = self.w.tensor(self.fresh(name), data.shape, "int8", q=q, data=data)
        elif (
            dtype == "float32"
            and arr.dtype.kind == "f"
            and self.mode == "fp16"
            and arr.size >= _FP16_MIN_ELEMENTS
        ):
            half = self.w.tensor(
                self.fresh(name + "/fp16"), arr.shape, "float16", data=arr.astype(np.float16)
            )
            idx = self.w.tensor(self.fresh(name), arr.shape, "float32")
            self.op("DEQUANTIZE", [half], [idx])
        else:
            idx = self.w.tensor(self.fresh(name), arr.shape, dtype, data=arr.astype(dtype))
        s = Stored(tensor=idx, perm=perm, dtype=dtype, q=q)
        self._cache[key] = s
        return s

    def _transpose(self, name: str, s: Stored, want: tuple[int, ...]) -> Stored:
        if s.cols is not None:
            raise AssertionError(f"{name}: a column-permuted tensor cannot be transposed")
        key = ("t", s.tensor, want)
        if key in self._cache:
            return self._cache[key]
        shape = self.shape(name)
        p = compose(s.perm, want)
        out = self.tensor(
            name + "/T", [shape[i] for i in want], s.dtype, q=s.q, like=name, perm=want
        )
        self.op("TRANSPOSE", [s.tensor, self.int_const(name + "/perm", p)], [out])
        self.transposes += 1
        r = replace(s, tensor=out, perm=want)
        self._cache[key] = r
        return r

    def _convert(self, name: str, s: Stored, dtype: str) -> Stored:
        key = ("c", s.tensor, dtype)
        if key in self._cache:
            return self._cache[key]
        shape = [self.shape(name)[i] for i in s.perm]
        if dtype == "float32" and s.dtype == "int8":
            out = self.tensor(name + "/dq", shape, "float32", like=name, perm=s.perm)
            self.op("DEQUANTIZE", [s.tensor], [out])
            r = replace(s, tensor=out, dtype="float32", q=None)
        elif dtype == "int8" and s.dtype == "float32":
            q = self.ann(name)
            if q is None:
                raise AssertionError(
                    f"{name}: asked for int8 but ONNX Runtime did not calibrate it"
                )
            out = self.tensor(name + "/q", shape, "int8", q=q, like=name, perm=s.perm)
            self.op("QUANTIZE", [s.tensor], [out])
            r = replace(s, tensor=out, dtype="int8", q=q)
        else:
            raise self.unsupported(f"tensor {name!r} is {s.dtype}; {dtype} is needed")
        self._cache[key] = r
        return r

    def get_const_array(self, base: str, arr: np.ndarray) -> int:
        """A float constant laid out by the caller (fp16 mode: stored fp16 + DEQUANTIZE)."""
        arr = np.asarray(arr, dtype=np.float32)
        key = ("arr", base, arr.shape, arr.tobytes())
        if key in self._cache:
            return self._cache[key].tensor
        if self.mode == "fp16" and arr.size >= _FP16_MIN_ELEMENTS:
            half = self.w.tensor(
                self.fresh(base + "/fp16"), arr.shape, "float16", data=arr.astype(np.float16)
            )
            idx = self.w.tensor(self.fresh(base), arr.shape, "float32")
            self.op("DEQUANTIZE", [half], [idx])
        else:
            idx = self.w.tensor(self.fresh(base), arr.shape, "float32", data=arr)
        self._cache[key] = Stored(tensor=idx, perm=identity(arr.ndim), dtype="float32")
        return idx

    def requantize(self, name: str, s: Stored, q: QParams) -> Stored:
        """An int8 tensor with other parameters (QUANTIZE int8 -> int8)."""
        if s.q == q:
            return s
        shape = [self.shape(name)[i] for i in s.perm]
        out = self.tensor(name + "/rq", shape, "int8", q=q, like=name, perm=s.perm)
        self.op("QUANTIZE", [s.tensor], [out])
        return replace(s, tensor=out, q=q)

    def options(self, kind: str, **fields: Any) -> Any:
        s = schema()
        o = getattr(s, kind + "T")()
        for k, v in fields.items():
            setattr(o, k, v)
        return o

    def enum(self, kind: str, name: str) -> int:
        return int(getattr(getattr(schema(), kind), name))
