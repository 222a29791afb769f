"""The ONNX graph made static and simple before conversion.

Fixes the batch axis to 1 (TFLite tensors need static shapes; the batch axis stays resizable
through each tensor's shape signature), infers every shape with ONNX's shape inference and
folds constant subgraphs with ONNX's reference evaluator (shape arithmetic from exporters).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compiler.errors import ModelError
from compiler.tflite.flatbuffer import QParams

__all__ = ["Graph", "attr", "prepare_graph"]

# Ops never folded even with constant inputs (none today; kept for clarity of intent).
_NO_FOLD: frozenset[str] = frozenset()


def attr(node: Any, name: str, default: Any = None) -> Any:
    """A node attribute's Python value, or `default`."""
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


@dataclass(slots=True, kw_only=True)
class Graph:
    """A static-shape ONNX graph with its constants, shapes and quantization annotations."""

    nodes: list[Any]
    consts: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]
    #: per tensor and axis: does the size follow the batch? (resizable in LiteRT)
    batch_axes: dict[str, tuple[bool, ...]]
    dtypes: dict[str, str]
    inputs: list[str]
    outputs: list[str]
    ann: dict[str, QParams]
    dynamic_batch: bool
    opset: int
    consumers: dict[str, list[Any]] = field(default_factory=dict)

    def shape(self, name: str) -> tuple[int, ...]:
        try:
            return self.shapes[name]
        except KeyError:
            raise ModelError(
                f"the shape of tensor {name!r} could not be inferred statically; TFLite needs "
                f"static shapes (re-export the model with fixed input sizes)"
            ) from None

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name)

    def signature(self, name: str) -> tuple[int, ...]:
        """The shape with -1 on batch-following axes."""
        shape = self.shape(name)
        flags = self.batch_axes.get(name, (False,) * len(shape))
        return tuple(-1 if f else d for d, f in zip(shape, flags, strict=True))


def _fix_inputs(model: Any, batch: int) -> bool:
    """Set dynamic batch axes to `batch`; refuse other dynamic axes. Returns: was any dynamic?"""
    init = {t.name for t in model.graph.initializer}
    dynamic = False
    for v in model.graph.input:
        if v.name in init:
            continue
        dims = v.type.tensor_type.shape.dim
        for axis, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                continue
            if axis == 0:
                dynamic = True
                d.Clear()
                d.dim_value = batch
                continue
            what = d.dim_param or "unknown"
            raise ModelError(
                f"input {v.name!r} has a dynamic axis {axis} ({what!r}); TFLite needs static "
                f"shapes apart from the batch axis: re-export the model with a fixed size on "
                f"axis {axis}"
            )
    for v in model.graph.output:
        dims = v.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
    return dynamic


def _infer(model: Any) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    import onnx

    del model.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # onnx raises several private error types
        raise ModelError(f"ONNX shape inference failed: {exc}") from exc
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    g = inferred.graph
    for v in [*g.input, *g.value_info, *g.output]:
        tt = v.type.tensor_type
        if tt.elem_type:
            dtypes[v.name] = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if all(d >= 0 for d in dims):
            shapes[v.name] = tuple(int(d) for d in dims)
    return shapes, dtypes


def _evaluate(node: Any, values: Mapping[str, np.ndarray], opset: int) -> list[np.ndarray]:
    import onnx
    from onnx.reference import ReferenceEvaluator

    graph = onnx.helper.make_graph(
        [node],
        "fold",
        [
            onnx.helper.make_tensor_value_info(
                n, onnx.helper.np_dtype_to_tensor_dtype(values[n].dtype), values[n].shape
            )
            for n in dict.fromkeys(i for i in node.input if i)
        ],
        [
            onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
            for o in node.output
        ],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    feeds = {n: values[n] for n in dict.fromkeys(i for i in node.input if i)}
    return [np.asarray(x) for x in ReferenceEvaluator(model).run(None, feeds)]


def _fold(model: Any, shapes: Mapping[str, tuple[int, ...]], opset: int) -> bool:
    """Fold constant nodes (and Shape of static tensors) into initializers; True if any."""
    from onnx import numpy_helper

    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    outputs = {o.name for o in g.output}
    kept = []
    changed = False
    for node in g.node:
        ins = [i for i in node.input if i]
        folded: list[np.ndarray] | None = None
        if node.op_type == "Shape" and node.input[0] in shapes:
            shape = np.asarray(shapes[node.input[0]], dtype=np.int64)
            start = attr(node, "start", 0)
            end = attr(node, "end", None)
            folded = [shape[start:end]]
        elif node.op_type == "Constant":
            folded = _evaluate(node, {}, opset)
        elif (
            ins
            and all(i in consts for i in ins)
            and node.op_type not in _NO_FOLD
            and not any(o in outputs for o in node.output)
        ):
            try:
                folded = _evaluate(node, consts, opset)
            except Exception:  # leave it to its handler, which reports clearly
                folded = None
        if folded is None or any(o in outputs for o in node.output):
            kept.append(node)
            continue
        changed = True
        for name, value in zip(node.output, folded, strict=False):
            consts[name] = value
            g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    del g.node[:]
    g.node.extend(kept)
    used = {i for n in kept for i in n.input} | outputs
    keep_init = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep_init)
    return changed


def prepare_graph(model: Any, ann: Mapping[str, QParams]) -> Graph:
    """Static shapes (batch 1), folded constants, shapes and dtypes of every tensor."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 13)
    dynamic = _fix_inputs(m, 1)
    for _ in range(4):
        shapes, _dtypes = _infer(m)
        if not _fold(m, shapes, opset):
            break
    shapes, dtypes = _infer(m)
    batch_axes: dict[str, tuple[bool, ...]] = {}
    if dynamic:
        m2 = onnx.ModelProto()
        m2.CopyFrom(m)
        for v in m2.graph.input:
            dims = v.type.tensor_type.shape.dim
            if dims:
                dims[0].dim_value = 2
        shapes2, _ = _infer(m2)
        for name, s1 in shapes.items():
            s2 = shapes2.get(name)
            if s2 is not None and len(s2) == len(s1):
                batch_axes[name] = tuple(a != b for a, b in zip(s1, s2, strict=True))
    g = m.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for name, c in consts.items():
        shapes[name] = tuple(int(d) for d in c.shape)
        dtypes[name] = c.dtype.name
    init = set(consts)
    graph = Graph(
        nodes=list(g.node),
        consts=consts,
        shapes=shapes,
        batch_axes=batch_axes,
        dtypes=dtypes,
        inputs=[v.name for v in g.input if v.name not in init],
        outputs=[v.name for v in g.output],
        ann=dict(ann),
        dynamic_batch=dynamic,
        opset=opset,
    )
    for node in graph.nodes:
        for i in node.input:
            if i:
                graph.consumers.setdefault(i, []).append(node)
    return graph
