"""ONNX (float or ONNX Runtime QDQ) -> TFLite flatbuffer, checked by loading it in LiteRT."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from compiler.errors import ModelError, UnsupportedOpError
from compiler.tflite.context import Context, Mode, identity
from compiler.tflite.flatbuffer import ModelWriter, QParams
from compiler.tflite.graph import Graph, prepare_graph
from compiler.tflite.ops import HANDLERS
from compiler.tflite.qdq import strip_qdq

__all__ = ["Conversion", "IoType", "check_supported", "convert", "load_check"]

IoType = Literal["float32", "int8"]

_NODE_NUMBER = re.compile(r"[Nn]ode number (\d+)")


@dataclass(frozen=True, slots=True, kw_only=True)
class Conversion:
    """The .tflite bytes and what the conversion did."""

    data: bytes
    mode: Mode
    io_type: IoType
    op_counts: dict[str, int]
    #: TRANSPOSE ops inserted for layout (edges, plus any ONNX-level layout changes)
    transposes: int
    dynamic_batch: bool
    #: per graph input/output: (scale, zero point) when the TFLite tensor is int8
    io_quantization: dict[str, tuple[float, int]]
    float_ops: tuple[str, ...]
    #: operator index -> the ONNX node it came from (names the node LiteRT refuses)
    origins: tuple[str, ...] = ()


def check_supported(nodes: list[Any]) -> None:
    """Name every node whose op type has no handler, before anything is built."""
    missing = [n for n in nodes if n.op_type not in HANDLERS]
    if missing:
        listed = "; ".join(f"{n.name or '<unnamed>'} ({n.op_type})" for n in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise UnsupportedOpError(
            f"the TFLite converter has no handler for {len(missing)} node(s): {listed}{more}. "
            f"Supported ops: {', '.join(sorted(HANDLERS))}. Replace them in the model, or "
            f"compile for an ONNX Runtime profile"
        )


def convert(
    model: Any, *, mode: Mode, io_type: IoType = "float32", name: str = "edgefleet"
) -> Conversion:
    """Convert an ONNX ModelProto (QDQ for int8) to TFLite bytes; raises CompileError subclasses."""
    if mode == "int8":
        float_model, ann = strip_qdq(model)
    else:
        float_model, ann = model, {}
    check_supported(list(float_model.graph.node))
    graph = prepare_graph(float_model, ann)
    check_supported(graph.nodes)
    if any(n.op_type == "ConvTranspose" for n in graph.nodes):
        graph.batch_axes = {}  # TRANSPOSE_CONV takes a constant output shape: batch stays 1
    return _emit(graph, mode=mode, io_type=io_type, name=name)


def _emit(graph: Graph, *, mode: Mode, io_type: IoType, name: str) -> Conversion:
    w = ModelWriter()
    ctx = Context(graph, w, mode=mode)
    io_q: dict[str, tuple[float, int]] = {}
    in_idx = []
    for inp in graph.inputs:
        shape = graph.shape(inp)
        perm = identity(len(shape))
        q: QParams | None = graph.ann.get(inp) if mode == "int8" else None
        dtype = "int8" if io_type == "int8" and q is not None else "float32"
        idx = ctx.output(inp, perm=perm, dtype=dtype, q=q)
        if dtype == "int8" and q is not None:
            io_q[inp] = (q.scale[0], q.zero_point[0])
        in_idx.append(idx)
    for node in graph.nodes:
        if id(node) in ctx.absorbed:
            continue
        ctx.node = node
        w.origin = node.name or node.op_type
        HANDLERS[node.op_type](ctx, node)
    ctx.node = None
    w.origin = "<graph outputs>"
    out_idx = []
    for out in graph.outputs:
        rank = len(graph.shape(out))
        st = ctx.stored(out)
        dtype = "int8" if io_type == "int8" and st.dtype == "int8" else "float32"
        s = ctx.get(out, perm=identity(rank), dtype=dtype)
        if s.tensor in in_idx or s.tensor in out_idx:
            raise ModelError(
                f"output {out!r} is an input or another output; TFLite needs an op between"
            )
        w.tensors[s.tensor].name = out
        if s.dtype == "int8" and s.q is not None:
            io_q[out] = (s.q.scale[0], s.q.zero_point[0])
        out_idx.append(s.tensor)
    codes: Counter[str] = Counter()
    from compiler.tflite.flatbuffer import schema

    names = {v: k for k, v in vars(schema().BuiltinOperator).items() if not k.startswith("_")}
    float_ops = []
    for op in w.operators:
        code = names[w.opcodes[op.opcodeIndex].builtinCode]
        codes[code] += 1
    if mode == "int8":
        for op, origin in zip(w.operators, w.origins, strict=True):
            code = names[w.opcodes[op.opcodeIndex].builtinCode]
            t = w.tensors[op.outputs[0]]
            if (
                code not in ("DEQUANTIZE", "QUANTIZE", "TRANSPOSE")
                and t.type == 0
                and origin not in float_ops
            ):
                float_ops.append(origin)
    data = w.pack(in_idx, out_idx, f"{name} (edgefleet ONNX->TFLite, {mode})")
    return Conversion(
        data=data,
        mode=mode,
        io_type=io_type,
        op_counts=dict(sorted(codes.items())),
        transposes=ctx.transposes,
        dynamic_batch=bool(graph.batch_axes),
        io_quantization=io_q,
        float_ops=tuple(float_ops),
        origins=tuple(w.origins),
    )


def load_check(data: bytes, *, origins: tuple[str, ...] = (), threads: int = 1) -> Any:
    """Load and allocate in LiteRT; a refusal becomes a ModelError naming the ONNX node."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    def attempt(resolver: Any) -> Any:
        interp = Interpreter(
            model_content=data, num_threads=max(1, threads), experimental_op_resolver_type=resolver
        )
        interp.allocate_tensors()
        return interp

    try:
        return attempt(OpResolverType.AUTO)
    except (ValueError, RuntimeError) as exc:
        msg = " ".join(str(exc).split())
        # The XNNPACK delegate reports its own node number; the builtin kernels name the op.
        detail = msg
        try:
            attempt(OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        except (ValueError, RuntimeError) as exc2:
            detail = " ".join(str(exc2).split())
        where = ""
        m = _NODE_NUMBER.search(detail)
        if m and int(m.group(1)) < len(origins):
            where = f" at ONNX node {origins[int(m.group(1))]!r}"
        raise ModelError(
            f"LiteRT refuses the converted model{where}: {detail[:300]}"
            + (f" (with XNNPACK: {msg[:200]})" if detail != msg else "")
            + ". No bundle was written; compile for an ONNX Runtime profile or report the node"
        ) from exc
