"""Reading ONNX Runtime's calibration out of a QDQ model.

ONNX Runtime's static quantizer writes QuantizeLinear/DequantizeLinear pairs around every
activation it quantized and DequantizeLinear after every int8 weight. This module removes
those nodes and keeps what they said: each float tensor's scale and zero point (per-tensor for
activations, per-channel for weights). The result is the float graph the quantizer saw plus
the exact quantization ONNX Runtime runs, so TFLite quantizes the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compiler.errors import ModelError
from compiler.tflite.flatbuffer import QParams

__all__ = ["strip_qdq"]


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def strip_qdq(model: Any) -> tuple[Any, dict[str, QParams]]:
    """(float model without Q/DQ nodes, {float tensor name: quantization}); input untouched."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    alias: dict[str, str] = {}
    ann: dict[str, QParams] = {}
    weights: dict[str, np.ndarray] = {}
    kept: list[Any] = []

    def resolve(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    def params(node: Any) -> tuple[np.ndarray, np.ndarray]:
        if node.input[1] not in inits:
            raise ModelError(
                f"{node.op_type} node {node.name!r} has a computed scale; only constant "
                f"quantization parameters (as ONNX Runtime's quantizer writes) can be converted"
            )
        scale = np.asarray(inits[node.input[1]], dtype=np.float32)
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zp = np.asarray(inits[zp_name]) if zp_name else np.zeros(scale.shape, np.int64)
        return scale, zp

    for node in g.node:
        if node.op_type == "QuantizeLinear":
            scale, zp = params(node)
            x = resolve(node.input[0])
            if zp.dtype not in (np.int8, np.dtype("int8")) and zp.dtype.kind == "u":
                raise ModelError(
                    f"QuantizeLinear {node.name!r} quantizes to {zp.dtype}; TFLite's int8 spec "
                    f"needs int8 activations (quantize with activation_type int8)"
                )
            ann[x] = QParams.of(scale, zp, _attr(node, "axis", 1) if scale.size > 1 else None)
            alias[node.output[0]] = x
            continue
        if node.op_type == "DequantizeLinear":
            src = node.input[0]
            if src in inits:
                scale, zp = params(node)
                q = inits[src].astype(np.float64)
                axis = int(_attr(node, "axis", 1))
                if scale.size > 1:
                    axis = axis % q.ndim
                    shape = [1] * q.ndim
                    shape[axis] = scale.size
                    w = (q - zp.reshape(shape)) * scale.reshape(shape).astype(np.float64)
                else:
                    w = (q - zp.astype(np.float64)) * float(scale)
                name = node.output[0]
                weights[name] = w.astype(np.float32)
                ann[name] = QParams.of(scale, zp, axis if scale.size > 1 else None)
            else:
                alias[node.output[0]] = resolve(src)
            continue
        kept.append(node)

    # Graph outputs keep their names: the float tensor behind an output's DQ takes it.
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    for o in outputs:
        src = resolve(o)
        if src != o:
            rename[src] = o
    for node in kept:
        for i, name in enumerate(node.input):
            if name:
                r = resolve(name)
                node.input[i] = rename.get(r, r)
        for i, name in enumerate(node.output):
            node.output[i] = rename.get(name, name)
    ann = {rename.get(k, k): v for k, v in ann.items()}

    used = {i for n in kept for i in n.input} | outputs
    new_inits = [t for t in g.initializer if t.name in used and t.name not in weights]
    new_inits += [numpy_helper.from_array(w, name) for name, w in weights.items() if name in used]
    del g.node[:]
    g.node.extend(kept)
    del g.initializer[:]
    g.initializer.extend(new_inits)
    del g.value_info[:]
    return m, ann
