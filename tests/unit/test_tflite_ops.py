"""Each op handler of the ONNX->TFLite converter on a tiny graph, against ONNX Runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("ai_edge_litert")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from compiler.data import validate_arrays  # noqa: E402
from compiler.errors import CompileError, ModelError, UnsupportedOpError  # noqa: E402
from compiler.model import TensorInfo  # noqa: E402
from compiler.quantize import QuantConfig, quantize_static  # noqa: E402
from compiler.tflite import HANDLERS, convert, litert_runner, load_check  # noqa: E402
from compiler.tflite.flatbuffer import ModelWriter  # noqa: E402

RNG = np.random.default_rng(7)
X4 = [2, 4, 6, 6]


def _w(*shape: int) -> np.ndarray:
    return (RNG.standard_normal(shape) * 0.5).astype(np.float32)


def _model(
    nodes: list[Any], inits: dict[str, np.ndarray], shape: list[Any], opset: int = 17
) -> Any:
    dims = ["N", *shape[1:]]
    g = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _node(op: str, inputs: list[str], out: str = "y", **attrs: Any) -> Any:
    return helper.make_node(op, inputs, [out], name=f"{op.lower()}_node", **attrs)


def _ort(model: Any, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return np.asarray(s.run(None, {"x": x})[0])


def _tfl(model: Any, mode: str, x: np.ndarray, tmp: Path) -> np.ndarray:
    conv = convert(model, mode=mode)  # type: ignore[arg-type]
    load_check(conv.data, origins=conv.origins)
    path = tmp / f"m-{mode}.tflite"
    path.write_bytes(conv.data)
    return np.asarray(litert_runner(path, threads=1)({"x": x})[0])


def _qdq(model: Any, shape: list[int], tmp: Path) -> Any:
    src = tmp / "f.onnx"
    onnx.save(model, str(src))
    cal = RNG.standard_normal((32, *shape[1:])).astype(np.float32)
    info = TensorInfo(name="x", dtype="float32", shape=("N", *shape[1:]))
    data = validate_arrays({"x": cal}, [info], role="calibration", source="rng")
    cfg = QuantConfig(
        activation_type="int8", weight_type="int8", per_channel=True, symmetric_activations=False
    )
    out = tmp / "q.onnx"
    quantize_static(src, out, data, cfg)
    return onnx.load(str(out))


CASES: dict[str, tuple[list[Any], dict[str, np.ndarray], list[int]]] = {
    "conv_relu": (
        [_node("Conv", ["x", "w", "b"], "c", pads=[1, 1, 1, 1]), _node("Relu", ["c"])],
        {"w": _w(8, 4, 3, 3), "b": _w(8)},
        X4,
    ),
    "conv_stride2_pad": (
        [_node("Conv", ["x", "w"], strides=[2, 2], pads=[1, 1, 1, 1])],
        {"w": _w(8, 4, 3, 3)},
        X4,
    ),
    "depthwise": (
        [_node("Conv", ["x", "w", "b"], group=4, pads=[1, 1, 1, 1])],
        {"w": _w(8, 1, 3, 3), "b": _w(8)},
        X4,
    ),
    "grouped": ([_node("Conv", ["x", "w"], group=2)], {"w": _w(6, 2, 1, 1)}, X4),
    "conv_transpose": (
        [_node("ConvTranspose", ["x", "w", "b"], strides=[2, 2], pads=[1, 1, 1, 1])],
        {"w": _w(4, 3, 4, 4), "b": _w(3)},
        X4,
    ),
    "gemm": ([_node("Gemm", ["x", "w", "b"], transB=1)], {"w": _w(5, 12), "b": _w(5)}, [2, 12]),
    "matmul": ([_node("MatMul", ["x", "w"])], {"w": _w(12, 5)}, [2, 12]),
    "flatten_gemm": (
        [_node("Flatten", ["x"], "f"), _node("Gemm", ["f", "w"], transB=1)],
        {"w": _w(5, 144)},
        X4,
    ),
    "add_const": ([_node("Add", ["x", "c"])], {"c": _w(4, 1, 1)}, X4),
    "sub": ([_node("Sub", ["x", "c"])], {"c": _w(1, 4, 1, 1)}, X4),
    "mul": ([_node("Mul", ["x", "c"])], {"c": _w(4, 1, 1)}, X4),
    "div": ([_node("Div", ["x", "c"])], {"c": np.full((1,), 2.0, np.float32)}, X4),
    "relu": ([_node("Relu", ["x"])], {}, X4),
    "clip6": ([_node("Clip", ["x", "lo", "hi"])], {"lo": np.float32(0), "hi": np.float32(6)}, X4),
    "clip_other": (
        [_node("Clip", ["x", "lo", "hi"])],
        {"lo": np.float32(-0.5), "hi": np.float32(0.7)},
        X4,
    ),
    "leaky_relu": ([_node("LeakyRelu", ["x"], alpha=0.1)], {}, X4),
    "sigmoid": ([_node("Sigmoid", ["x"])], {}, X4),
    "tanh": ([_node("Tanh", ["x"])], {}, X4),
    "hard_sigmoid": ([_node("HardSigmoid", ["x"], alpha=1 / 6, beta=0.5)], {}, X4),
    "hard_swish": ([_node("HardSwish", ["x"])], {}, X4),
    "softmax_2d": ([_node("Softmax", ["x"], axis=1)], {}, [2, 10]),
    "softmax_channels": ([_node("Softmax", ["x"], axis=1)], {}, X4),
    "maxpool": ([_node("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2])], {}, X4),
    "maxpool_pad": (
        [_node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
        {},
        X4,
    ),
    "avgpool_same": ([_node("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])], {}, X4),
    "global_avgpool": ([_node("GlobalAveragePool", ["x"])], {}, X4),
    "reduce_mean": ([_node("ReduceMean", ["x"], axes=[2, 3], keepdims=0)], {}, X4),
    "reshape": ([_node("Reshape", ["x", "s"])], {"s": np.array([-1, 4, 36], np.int64)}, X4),
    "transpose": ([_node("Transpose", ["x"], perm=[0, 3, 1, 2])], {}, X4),
    "concat": ([_node("Relu", ["x"], "r"), _node("Concat", ["x", "r"], axis=1)], {}, X4),
    "split": (
        [
            helper.make_node("Split", ["x", "s"], ["a", "b"], axis=1, name="split"),
            _node("Sub", ["a", "b"]),
        ],
        {"s": np.array([2, 2], np.int64)},
        X4,
    ),
    "slice": (
        [_node("Slice", ["x", "st", "en", "ax"])],
        {
            "st": np.array([1, 1], np.int64),
            "en": np.array([3, -1], np.int64),
            "ax": np.array([1, 3], np.int64),
        },
        X4,
    ),
    "pad": ([_node("Pad", ["x", "p"])], {"p": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)}, X4),
    "resize_nearest": (
        [
            _node(
                "Resize",
                ["x", "", "sc"],
                mode="nearest",
                coordinate_transformation_mode="asymmetric",
                nearest_mode="floor",
            )
        ],
        {"sc": np.array([1, 1, 2, 2], np.float32)},
        X4,
    ),
    "resize_bilinear": (
        [
            _node(
                "Resize",
                ["x", "", "sc"],
                mode="linear",
                coordinate_transformation_mode="half_pixel",
            )
        ],
        {"sc": np.array([1, 1, 2, 2], np.float32)},
        X4,
    ),
    "squeeze_unsqueeze": (
        [
            _node("GlobalAveragePool", ["x"], "g"),
            _node("Squeeze", ["g", "a"], "s"),
            _node("Unsqueeze", ["s", "b"]),
        ],
        {"a": np.array([2, 3], np.int64), "b": np.array([1], np.int64)},
        X4,
    ),
    "batchnorm": (
        [_node("BatchNormalization", ["x", "s", "b", "m", "v"])],
        {"s": _w(4), "b": _w(4), "m": _w(4), "v": np.abs(_w(4)) + 0.5},
        X4,
    ),
    "identity_dropout": (
        [_node("Identity", ["x"], "i"), _node("Dropout", ["i"], "d"), _node("Relu", ["d"])],
        {},
        X4,
    ),
}


def test_every_issue_op_has_a_handler() -> None:
    issue_ops = (
        "Conv ConvTranspose Gemm MatMul Add Sub Mul Div Relu Clip LeakyRelu Sigmoid Tanh "
        "HardSigmoid HardSwish Softmax MaxPool AveragePool GlobalAveragePool Reshape Flatten "
        "Transpose Concat Split Slice Pad Resize ReduceMean Squeeze Unsqueeze "
        "BatchNormalization Identity Dropout"
    )
    wanted = set(issue_ops.split())
    assert sorted(wanted - set(HANDLERS)) == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_float_matches_onnx_runtime(case: str, tmp_path: Path) -> None:
    nodes, inits, shape = CASES[case]
    model = _model(nodes, inits, shape)
    x = RNG.standard_normal(shape).astype(np.float32)
    ref = _ort(model, x)
    got = _tfl(model, "fp32", x, tmp_path)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


INT8 = [
    "conv_relu",
    "depthwise",
    "flatten_gemm",
    "add_const",
    "maxpool",
    "global_avgpool",
    "concat",
    "resize_nearest",
    "hard_swish",
    "softmax_2d",
    "sigmoid",
    "reshape",
]


@pytest.mark.parametrize("case", INT8)
def test_int8_matches_onnx_runtime_qdq(case: str, tmp_path: Path) -> None:
    nodes, inits, shape = CASES[case]
    model = _model(nodes, inits, shape)
    qdq = _qdq(model, shape, tmp_path)
    x = RNG.standard_normal(shape).astype(np.float32)
    ref = _ort(qdq, x)
    got = _tfl(qdq, "int8", x, tmp_path)
    span = float(ref.max() - ref.min()) or 1.0
    # Same scales: at most a couple of output quantization steps apart (1 step = span/255);
    # SOFTMAX/LOGISTIC have TFLite's fixed 1/256 output step where ORT calibrated its own.
    fixed = 2 / 256 if case in ("softmax_2d", "sigmoid") else 0.0
    assert np.abs(got - ref).max() <= 3 * span / 255 + fixed + 1e-6


def test_fp16_weights_feed_float_ops(tmp_path: Path) -> None:
    nodes, inits, shape = CASES["conv_relu"]
    model = _model(nodes, inits, shape)
    conv = convert(model, mode="fp16")
    assert conv.op_counts.get("DEQUANTIZE", 0) >= 1
    x = RNG.standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(
        _tfl(model, "fp16", x, tmp_path), _ort(model, x), atol=0.02, rtol=0.02
    )


def test_int8_io_option(tmp_path: Path) -> None:
    nodes, inits, shape = CASES["conv_relu"]
    qdq = _qdq(_model(nodes, inits, shape), shape, tmp_path)
    conv = convert(qdq, mode="int8", io_type="int8")
    interp = load_check(conv.data)
    assert interp.get_input_details()[0]["dtype"] == np.int8
    assert interp.get_output_details()[0]["dtype"] == np.int8
    assert set(conv.io_quantization) == {"x", "y"}


def test_layout_changes_only_at_the_edges() -> None:
    nodes, inits, shape = CASES["conv_relu"]
    conv = convert(
        _model([*nodes, _node("Conv", ["y", "w2"], "z")], {**inits, "w2": _w(4, 8, 1, 1)}, shape),
        mode="fp32",
    )
    # one transpose in (NCHW -> NHWC) and, for the 4-D output, one out; none in between
    assert conv.op_counts.get("TRANSPOSE", 0) == 2
    assert "RELU" not in conv.op_counts  # fused into the convolution


def test_unsupported_op_is_named_before_anything_is_written() -> None:
    model = _model(
        [_node("Relu", ["x"], "r"), helper.make_node("Erf", ["r"], ["y"], name="my_erf")], {}, X4
    )
    with pytest.raises(UnsupportedOpError, match=r"my_erf \(Erf\)"):
        convert(model, mode="fp32")


def test_dynamic_non_batch_axis_is_refused() -> None:
    model = _model([_node("Relu", ["x"])], {}, [2, 4, "H", 6])
    with pytest.raises(ModelError, match="dynamic axis 2"):
        convert(model, mode="fp32")


def test_litert_refusal_names_the_onnx_node() -> None:
    w = ModelWriter()
    w.origin = "bad_add"
    a = w.tensor("a", [2], "float32")
    b = w.tensor("b", [3], "float32")
    y = w.tensor("y", [2], "float32")
    w.op("ADD", [a, b], [y])
    data = w.pack([a, b], [y], "broken")
    with pytest.raises(CompileError, match="bad_add"):
        load_check(data, origins=tuple(w.origins))
