"""One small handler per ONNX op type, in `HANDLERS` (op type -> function(ctx, node)).

A handler reads its node's inputs through `Context.get` (which supplies the layout and type
it asks for), emits TFLite operators and records its outputs with `Context.output`. It runs
the node in int8 when ONNX Runtime quantized it (the output carries calibrated parameters)
and its inputs are int8-ready; otherwise in float, exactly as ONNX Runtime's QDQ graph does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from compiler.tflite.context import NHWC, Context, Stored, default_perm, identity, quantize_array
from compiler.tflite.flatbuffer import QParams
from compiler.tflite.graph import attr

__all__ = ["HANDLERS", "Handler"]

Handler = Callable[[Context, Any], None]
HANDLERS: dict[str, Handler] = {}

#: TFLite's fixed output parameters for int8 LOGISTIC / SOFTMAX and TANH (its quantization spec)
_Q_UNIT = QParams.of(1.0 / 256.0, -128)
_Q_TANH = QParams.of(1.0 / 128.0, 0)


def handles(*op_types: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for t in op_types:
            HANDLERS[t] = fn
        return fn

    return register


def _inputs(node: Any) -> list[str]:
    return [i for i in node.input]


# -- helpers ---------------------------------------------------------------------------------
def _fused_activation(ctx: Context, node: Any) -> tuple[str, str]:
    """(fused activation name, the ONNX tensor the op's output becomes) for Conv+Relu etc."""
    out = node.output[0]
    users = ctx.graph.consumers.get(out, [])
    if out in ctx.graph.outputs or len(users) != 1:
        return "NONE", out
    nxt = users[0]
    kind = None
    if nxt.op_type == "Relu":
        kind = "RELU"
    elif nxt.op_type == "Clip":
        lo, hi = _clip_bounds(ctx, nxt)
        if lo == 0.0 and hi == 6.0:
            kind = "RELU6"
        elif lo == 0.0 and hi == math.inf:
            kind = "RELU"
    if kind is None:
        return "NONE", out
    if ctx.mode == "int8" and (ctx.ann(out) is None) != (ctx.ann(nxt.output[0]) is None):
        return "NONE", out
    ctx.absorbed.add(id(nxt))
    return kind, nxt.output[0]


def _act(ctx: Context, name: str) -> int:
    return ctx.enum("ActivationFunctionType", name)


def _padding(
    in_hw: Sequence[int], k: Sequence[int], s: Sequence[int], d: Sequence[int], pads: Sequence[int]
) -> str | None:
    """ "VALID" / "SAME" when ONNX's pads equal TFLite's, else None (an explicit PAD is needed)."""
    if not any(pads):
        return "VALID"
    for i in range(2):
        out = -(-in_hw[i] // s[i])
        eff = (k[i] - 1) * d[i] + 1
        total = max((out - 1) * s[i] + eff - in_hw[i], 0)
        if (pads[i], pads[i + 2]) != (total // 2, total - total // 2):
            return None
        if (in_hw[i] + pads[i] + pads[i + 2] - eff) // s[i] + 1 != out:
            return None
    return "SAME"


def _spatial(
    ctx: Context, node: Any, kernel: Sequence[int]
) -> tuple[list[int], list[int], list[int]]:
    strides = list(attr(node, "strides", [1, 1]))
    dil = list(attr(node, "dilations", [1, 1]))
    pads = list(attr(node, "pads", [0, 0, 0, 0]))
    auto = attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        h, w = ctx.shape(node.input[0])[2:4]
        pads = [0, 0, 0, 0]
        if auto != "VALID":
            for i, size in enumerate((h, w)):
                out = -(-size // strides[i])
                total = max((out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - size, 0)
                small, big = total // 2, total - total // 2
                pads[i], pads[i + 2] = (small, big) if auto == "SAME_UPPER" else (big, small)
    return strides, dil, pads


def _explicit_pad(
    ctx: Context, name: str, x: Stored, pads: Sequence[int], value: float | None
) -> Stored:
    """Pad an NHWC tensor's H and W explicitly (value None: zero, i.e. the zero point)."""
    shape = ctx.shape(name)
    n, c, h, w = shape
    new_shape = [n, h + pads[0] + pads[2], w + pads[1] + pads[3], c]
    paddings = ctx.int_const(
        name + "/pads", [[0, 0], [pads[0], pads[2]], [pads[1], pads[3]], [0, 0]]
    )
    out = ctx.tensor(name + "/padded", new_shape, x.dtype, q=x.q, like=name, perm=NHWC)
    if value is None:
        ctx.op("PAD", [x.tensor, paddings], [out])
    else:
        if x.dtype == "int8":
            v = ctx.w.tensor(
                ctx.fresh(name + "/padval"), [], "int8", q=x.q, data=np.asarray(-128, np.int8)
            )
        else:
            v = ctx.w.tensor(
                ctx.fresh(name + "/padval"), [], "float32", data=np.asarray(value, np.float32)
            )
        ctx.op("PADV2", [x.tensor, paddings, v], [out])
    return Stored(tensor=out, perm=NHWC, dtype=x.dtype, q=x.q)


def _channel_scales(ctx: Context, wname: str, w: np.ndarray, channels_axis: int) -> np.ndarray:
    """Per-output-channel weight scales: ONNX Runtime's when it quantized along this axis."""
    n = w.shape[channels_axis]
    q = ctx.ann(wname)
    if q is not None:
        if q.per_tensor:
            return np.full(n, q.scale[0], dtype=np.float64)
        if q.axis == channels_axis and len(q.scale) == n:
            return np.asarray(q.scale, dtype=np.float64)
    amax = np.abs(np.moveaxis(w, channels_axis, 0).reshape(n, -1)).max(axis=1).astype(np.float64)
    return np.where(amax > 0, amax / 127.0, 1.0)


def _weights(
    ctx: Context,
    wname: str,
    w_onnx: np.ndarray,
    ch_axis_onnx: int,
    w_tfl: np.ndarray,
    ch_axis_tfl: int,
    *,
    int8: bool,
) -> tuple[int, np.ndarray | None]:
    """The filter tensor (int8 per-channel symmetric, or float); returns (index, scales)."""
    if not int8:
        return ctx.get_const_array(wname, w_tfl), None
    scales = _channel_scales(ctx, wname, w_onnx, ch_axis_onnx)
    q = QParams.of(scales.astype(np.float32), np.zeros(len(scales), np.int64), ch_axis_tfl)
    data = quantize_array(w_tfl, q)
    # int8 weights are symmetric in [-127, 127] (TFLite's spec)
    data = np.clip(data, -127, 127).astype(np.int8)
    return ctx.w.tensor(ctx.fresh(wname), data.shape, "int8", q=q, data=data), scales


def _bias(
    ctx: Context,
    name: str | None,
    n: int,
    in_q: QParams | None,
    w_scales: np.ndarray | None,
    values: np.ndarray | None = None,
) -> int:
    """Bias: int32 with scale input_scale * weight_scale (zero point 0), or float."""
    b = (
        values
        if values is not None
        else (ctx.const(name).astype(np.float64) if name else np.zeros(n))
    )
    b = np.broadcast_to(np.asarray(b, dtype=np.float64).reshape(-1), (n,))
    if w_scales is None or in_q is None:
        return ctx.get_const_array((name or "bias"), b.astype(np.float32))
    scales = (in_q.scale[0] * w_scales).astype(np.float32)
    data = np.clip(np.round(b / scales.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)
    q = QParams.of(scales, np.zeros(n, np.int64), 0)
    return ctx.w.tensor(ctx.fresh((name or "bias") + "/i32"), [n], "int32", q=q, data=data)


def _out_q(ctx: Context, out: str, int8: bool) -> tuple[str, QParams | None]:
    if not int8:
        return "float32", None
    q = ctx.ann(out)
    assert q is not None
    return "int8", q


# -- convolution -----------------------------------------------------------------------------
@handles("Conv")
def conv(ctx: Context, node: Any) -> None:
    x, wname = node.input[0], node.input[1]
    bname = node.input[2] if len(node.input) > 2 and node.input[2] else None
    w = ctx.const(wname).astype(np.float32)
    if w.ndim != 4:
        raise ctx.unsupported(f"only 2-D convolutions are supported (weight rank {w.ndim})")
    group = int(attr(node, "group", 1))
    c_out, c_in_g, kh, kw = w.shape
    c_in = ctx.shape(x)[1]
    strides, dil, pads = _spatial(ctx, node, (kh, kw))
    act, out = _fused_activation(ctx, node)
    int8 = ctx.want_int8([x], out)
    dtype, q = _out_q(ctx, out, int8)
    xs = ctx.get(x, perm=NHWC, dtype=dtype)
    padding = _padding(ctx.shape(x)[2:], (kh, kw), strides, dil, pads)
    if padding is None:
        xs = _explicit_pad(ctx, x, xs, pads, None)
        padding = "VALID"
    pad_enum = ctx.enum("Padding", padding)
    depthwise = group > 1 and group == c_in and c_in_g == 1
    if depthwise:
        w_tfl = w.transpose(1, 2, 3, 0)  # [1, kh, kw, C_out]
        wt, ws = _weights(ctx, wname, w, 0, w_tfl, 3, int8=int8)
        bt = _bias(ctx, bname, c_out, xs.q, ws)
        y = ctx.output(out, perm=NHWC, dtype=dtype, q=q)
        opts = ctx.options(
            "DepthwiseConv2DOptions",
            padding=pad_enum,
            strideH=strides[0],
            strideW=strides[1],
            depthMultiplier=c_out // c_in,
            fusedActivationFunction=_act(ctx, act),
            dilationHFactor=dil[0],
            dilationWFactor=dil[1],
        )
        ctx.op("DEPTHWISE_CONV_2D", [xs.tensor, wt, bt], [y], opts)
        return
    opts = ctx.options(
        "Conv2DOptions",
        padding=pad_enum,
        strideH=strides[0],
        strideW=strides[1],
        fusedActivationFunction=_act(ctx, act),
        dilationHFactor=dil[0],
        dilationWFactor=dil[1],
    )
    if group == 1:
        wt, ws = _weights(ctx, wname, w, 0, w.transpose(0, 2, 3, 1), 0, int8=int8)
        bt = _bias(ctx, bname, c_out, xs.q, ws)
        y = ctx.output(out, perm=NHWC, dtype=dtype, q=q)
        ctx.op("CONV_2D", [xs.tensor, wt, bt], [y], opts)
        return
    # Grouped: split channels, one convolution per group, concatenate (runs everywhere).
    in_shape = [ctx.shape(x)[i] for i in NHWC]
    part_shape = [*in_shape[:3], c_in // group]
    parts = [
        ctx.tensor(f"{x}/g{i}", part_shape, xs.dtype, q=xs.q, like=x, perm=NHWC)
        for i in range(group)
    ]
    ctx.op(
        "SPLIT",
        [ctx.int_const(x + "/axis", 3), xs.tensor],
        parts,
        ctx.options("SplitOptions", numSplits=group),
    )
    out_shape = [ctx.shape(out)[i] for i in NHWC]
    per = c_out // group
    b_all = ctx.const(bname).astype(np.float64) if bname else np.zeros(c_out)
    ys = []
    all_scales = _channel_scales(ctx, wname, w, 0) if int8 else None
    for i in range(group):
        wg = w[i * per : (i + 1) * per]
        if int8:
            assert all_scales is not None
            sc = all_scales[i * per : (i + 1) * per]
            qw = QParams.of(sc.astype(np.float32), np.zeros(per, np.int64), 0)
            data = np.clip(quantize_array(wg.transpose(0, 2, 3, 1), qw), -127, 127).astype(np.int8)
            wt = ctx.w.tensor(ctx.fresh(f"{wname}/g{i}"), data.shape, "int8", q=qw, data=data)
            ws = sc
        else:
            wt, ws = ctx.get_const_array(f"{wname}/g{i}", wg.transpose(0, 2, 3, 1)), None
        bt = _bias(
            ctx, f"{bname or 'bias'}/g{i}", per, xs.q, ws, values=b_all[i * per : (i + 1) * per]
        )
        yi = ctx.tensor(f"{out}/g{i}", [*out_shape[:3], per], dtype, q=q, like=out, perm=NHWC)
        ctx.op("CONV_2D", [parts[i], wt, bt], [yi], opts)
        ys.append(yi)
    y = ctx.output(out, perm=NHWC, dtype=dtype, q=q)
    ctx.op("CONCATENATION", ys, [y], ctx.options("ConcatenationOptions", axis=3))


@handles("ConvTranspose")
def conv_transpose(ctx: Context, node: Any) -> None:
    x, wname = node.input[0], node.input[1]
    bname = node.input[2] if len(node.input) > 2 and node.input[2] else None
    w = ctx.const(wname).astype(np.float32)  # [C_in, C_out/g, kh, kw]
    if int(attr(node, "group", 1)) != 1 or w.ndim != 4:
        raise ctx.unsupported("only 2-D, ungrouped ConvTranspose is supported")
    if any(d != 1 for d in attr(node, "dilations", [1, 1])):
        raise ctx.unsupported("dilated ConvTranspose is not supported by TFLite")
    c_out, kh, kw = w.shape[1], w.shape[2], w.shape[3]
    strides = list(attr(node, "strides", [1, 1]))
    pads = list(attr(node, "pads", [0, 0, 0, 0]))
    out = node.output[0]
    in_hw = ctx.shape(x)[2:]
    out_hw = ctx.shape(out)[2:]
    if not any(pads) and all(
        out_hw[i] == (in_hw[i] - 1) * strides[i] + (kh, kw)[i] for i in range(2)
    ):
        padding = "VALID"
    else:
        padding = "SAME"
        for i, k in enumerate((kh, kw)):
            total = max((in_hw[i] - 1) * strides[i] + k - out_hw[i], 0)
            if out_hw[i] != in_hw[i] * strides[i] or pads[i] != total // 2:
                raise ctx.unsupported(
                    f"ConvTranspose pads {pads} / output {list(out_hw)} match neither "
                    f"TFLite's SAME nor VALID padding"
                )
    int8 = ctx.want_int8([x], out)
    dtype, q = _out_q(ctx, out, int8)
    xs = ctx.get(x, perm=NHWC, dtype=dtype)
    w_tfl = w.transpose(1, 2, 3, 0)  # [C_out, kh, kw, C_in]
    wt, ws = _weights(ctx, wname, w, 1, w_tfl, 0, int8=int8)
    bt = _bias(ctx, bname, c_out, xs.q, ws)
    y = ctx.output(out, perm=NHWC, dtype=dtype, q=q)
    shape_t = ctx.int_const(out + "/shape", [ctx.shape(out)[i] for i in NHWC])
    opts = ctx.options(
        "TransposeConvOptions",
        padding=ctx.enum("Padding", padding),
        strideH=strides[0],
        strideW=strides[1],
    )
    ctx.op("TRANSPOSE_CONV", [shape_t, wt, xs.tensor, bt], [y], opts)


# -- dense -----------------------------------------------------------------------------------
def _fully_connected(
    ctx: Context,
    node: Any,
    a: str,
    w_nk: np.ndarray,
    wname: str,
    w_axis_onnx: int,
    w_onnx: np.ndarray,
    bias: np.ndarray | None,
    bname: str | None,
) -> None:
    act, out = _fused_activation(ctx, node)
    int8 = ctx.want_int8([a], out)
    dtype, q = _out_q(ctx, out, int8)
    st = ctx.stored(a) if a in ctx.values else None
    rank = len(ctx.shape(a))
    if st is not None and st.cols is not None:
        xs = st if st.dtype == dtype else ctx._convert(a, st, dtype)
        w_nk = w_nk[:, st.cols]
    else:
        xs = ctx.get(a, perm=identity(rank), dtype=dtype)
    n = w_nk.shape[0]
    if int8:
        scales = _channel_scales(ctx, wname, w_onnx, w_axis_onnx)
        qw = QParams.of(scales.astype(np.float32), np.zeros(n, np.int64), 0)
        data = np.clip(quantize_array(w_nk, qw), -127, 127).astype(np.int8)
        wt = ctx.w.tensor(ctx.fresh(wname), data.shape, "int8", q=qw, data=data)
        bt = _bias(ctx, bname, n, xs.q, scales, values=bias if bias is not None else np.zeros(n))
    else:
        wt = ctx.get_const_array(wname, w_nk)
        bt = ctx.get_const_array(
            bname or (wname + "/bias"),
            np.zeros(n, np.float32)
            if bias is None
            else np.broadcast_to(bias, (n,)).astype(np.float32),
        )
    y = ctx.output(out, perm=identity(len(ctx.shape(out))), dtype=dtype, q=q)
    opts = ctx.options(
        "FullyConnectedOptions", fusedActivationFunction=_act(ctx, act), keepNumDims=rank > 2
    )
    ctx.op("FULLY_CONNECTED", [xs.tensor, wt, bt], [y], opts)


@handles("Gemm")
def gemm(ctx: Context, node: Any) -> None:
    a, b = node.input[0], node.input[1]
    c = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if attr(node, "transA", 0):
        raise ctx.unsupported("Gemm with transA=1 is not supported")
    if not ctx.is_const(b):
        return matmul(ctx, node)
    alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
    bw = ctx.const(b).astype(np.float32)
    trans_b = bool(attr(node, "transB", 0))
    w_nk = (bw if trans_b else bw.T) * alpha
    n = w_nk.shape[0]
    bias = None
    if c is not None:
        cv = ctx.const(c).astype(np.float64) * beta
        if cv.size not in (1, n):
            raise ctx.unsupported(f"Gemm bias of shape {list(cv.shape)} (only [N] or scalar)")
        bias = np.broadcast_to(cv.reshape(-1), (n,)).astype(np.float64)
    _fully_connected(ctx, node, a, np.ascontiguousarray(w_nk), b, 0 if trans_b else 1, bw, bias, c)


@handles("MatMul")
def matmul(ctx: Context, node: Any) -> None:
    a, b = node.input[0], node.input[1]
    if ctx.is_const(b) and ctx.const(b).ndim == 2:
        bw = ctx.const(b).astype(np.float32)
        _fully_connected(ctx, node, a, np.ascontiguousarray(bw.T), b, 1, bw, None, None)
        return
    out = node.output[0]
    ra, rb = len(ctx.shape(a)), len(ctx.shape(b))
    xa = ctx.get(a, perm=identity(ra), dtype="float32")
    xb = ctx.get(b, perm=identity(rb), dtype="float32")
    y = ctx.output(out, perm=identity(len(ctx.shape(out))), dtype="float32")
    ctx.op("BATCH_MATMUL", [xa.tensor, xb.tensor], [y], ctx.options("BatchMatMulOptions"))


# -- elementwise -----------------------------------------------------------------------------
def _layout_for(ctx: Context, names: Sequence[str], out: str) -> tuple[int, ...]:
    rank = len(ctx.shape(out))
    for n in names:
        if n and not ctx.is_const(n) and len(ctx.shape(n)) == rank:
            return ctx.perm_of(n)
    return default_perm(rank)


def _binary(ctx: Context, node: Any, code: str, options: Any) -> None:
    a, b = node.input[0], node.input[1]
    act, out = ("NONE", node.output[0]) if code != "ADD" else _fused_activation(ctx, node)
    perm = _layout_for(ctx, [a, b], out)
    rank = len(perm)
    for n in (a, b):
        if not ctx.is_const(n) and len(ctx.shape(n)) != rank:
            raise ctx.unsupported(
                f"broadcasting a rank-{len(ctx.shape(n))} tensor against rank {rank}"
            )
    int8 = ctx.want_int8([a, b], out)
    dtype, q = _out_q(ctx, out, int8)
    ta = ctx.get(a, perm=perm, dtype=dtype)
    tb = ctx.get(b, perm=perm, dtype=dtype)
    y = ctx.output(out, perm=perm, dtype=dtype, q=q)
    if options is not None and act != "NONE":
        options.fusedActivationFunction = _act(ctx, act)
    ctx.op(code, [ta.tensor, tb.tensor], [y], options)


@handles("Add")
def add(ctx: Context, node: Any) -> None:
    _binary(ctx, node, "ADD", ctx.options("AddOptions"))


@handles("Sub")
def sub(ctx: Context, node: Any) -> None:
    _binary(ctx, node, "SUB", ctx.options("SubOptions"))


@handles("Mul")
def mul(ctx: Context, node: Any) -> None:
    _binary(ctx, node, "MUL", ctx.options("MulOptions"))


@handles("Div")
def div(ctx: Context, node: Any) -> None:
    a, b = node.input[0], node.input[1]
    out = node.output[0]
    perm = _layout_for(ctx, [a, b], out)
    ta = ctx.get(a, perm=perm, dtype="float32")
    y = ctx.output(out, perm=perm, dtype="float32")
    if ctx.is_const(b):  # x / c == x * (1 / c): MUL is faster and supported everywhere
        recip = (1.0 / ctx.const(b).astype(np.float64)).astype(np.float32)
        arr = (
            recip.reshape((1,) * (len(perm) - recip.ndim) + recip.shape).transpose(perm)
            if recip.ndim
            else recip
        )
        ctx.op(
            "MUL",
            [ta.tensor, ctx.get_const_array(b + "/recip", arr)],
            [y],
            ctx.options("MulOptions"),
        )
        return
    tb = ctx.get(b, perm=perm, dtype="float32")
    ctx.op("DIV", [ta.tensor, tb.tensor], [y], ctx.options("DivOptions"))


def _unary(
    ctx: Context,
    node: Any,
    code: str,
    options: Any = None,
    *,
    fixed_q: QParams | None = None,
    int8_ok: bool = True,
) -> None:
    x, out = node.input[0], node.output[0]
    perm = ctx.perm_of(x)
    int8 = int8_ok and ctx.want_int8([x], out, free_q=fixed_q is None)
    if fixed_q is not None and int8 and ctx.ann(out) is None:
        int8 = False
    dtype = "int8" if int8 else "float32"
    q = (fixed_q or ctx.ann(out)) if int8 else None
    xs = ctx.get(x, perm=perm, dtype=dtype)
    y = ctx.output(out, perm=perm, dtype=dtype, q=q)
    ctx.op(code, [xs.tensor], [y], options)


def _clip_bounds(ctx: Context, node: Any) -> tuple[float, float]:
    lo, hi = attr(node, "min", -math.inf), attr(node, "max", math.inf)
    if len(node.input) > 1 and node.input[1]:
        lo = float(ctx.const(node.input[1]))
    if len(node.input) > 2 and node.input[2]:
        hi = float(ctx.const(node.input[2]))
    return float(lo), float(hi)


@handles("Relu")
def relu(ctx: Context, node: Any) -> None:
    _unary(ctx, node, "RELU")


@handles("Clip")
def clip(ctx: Context, node: Any) -> None:
    lo, hi = _clip_bounds(ctx, node)
    known = {
        (0.0, 6.0): "RELU6",
        (0.0, math.inf): "RELU",
        (-1.0, 1.0): "RELU_N1_TO_1",
        (0.0, 1.0): "RELU_0_TO_1",
    }
    code = known.get((lo, hi))
    if code is not None:
        _unary(ctx, node, code)
        return
    x, out = node.input[0], node.output[0]
    perm = ctx.perm_of(x)
    xs = ctx.get(x, perm=perm, dtype="float32")
    cur = xs.tensor
    shape = [ctx.shape(x)[i] for i in perm]
    if hi != math.inf:
        t = (
            ctx.tensor(out + "/min", shape, "float32", like=out, perm=perm)
            if lo != -math.inf
            else ctx.output(out, perm=perm, dtype="float32")
        )
        ctx.op("MINIMUM", [cur, ctx.get_const_array(out + "/hi", np.asarray(hi, np.float32))], [t])
        cur = t
    if lo != -math.inf:
        t = ctx.output(out, perm=perm, dtype="float32")
        ctx.op("MAXIMUM", [cur, ctx.get_const_array(out + "/lo", np.asarray(lo, np.float32))], [t])
    if lo == -math.inf and hi == math.inf:
        ctx.alias(out, x)


@handles("LeakyRelu")
def leaky_relu(ctx: Context, node: Any) -> None:
    _unary(
        ctx,
        node,
        "LEAKY_RELU",
        ctx.options("LeakyReluOptions", alpha=float(attr(node, "alpha", 0.01))),
    )


@handles("Sigmoid")
def sigmoid(ctx: Context, node: Any) -> None:
    _unary(ctx, node, "LOGISTIC", fixed_q=_Q_UNIT)


@handles("Tanh")
def tanh(ctx: Context, node: Any) -> None:
    _unary(ctx, node, "TANH", fixed_q=_Q_TANH)


@handles("HardSwish")
def hard_swish(ctx: Context, node: Any) -> None:
    _unary(ctx, node, "HARD_SWISH")


@handles("HardSigmoid")
def hard_sigmoid(ctx: Context, node: Any) -> None:
    """max(0, min(1, alpha * x + beta)): MUL, ADD, RELU_0_TO_1 in float."""
    x, out = node.input[0], node.output[0]
    alpha, beta = float(attr(node, "alpha", 0.2)), float(attr(node, "beta", 0.5))
    perm = ctx.perm_of(x)
    shape = [ctx.shape(x)[i] for i in perm]
    xs = ctx.get(x, perm=perm, dtype="float32")
    t1 = ctx.tensor(out + "/mul", shape, "float32", like=out, perm=perm)
    ctx.op(
        "MUL",
        [xs.tensor, ctx.get_const_array(out + "/alpha", np.asarray(alpha, np.float32))],
        [t1],
        ctx.options("MulOptions"),
    )
    t2 = ctx.tensor(out + "/add", shape, "float32", like=out, perm=perm)
    ctx.op(
        "ADD",
        [t1, ctx.get_const_array(out + "/beta", np.asarray(beta, np.float32))],
        [t2],
        ctx.options("AddOptions"),
    )
    y = ctx.output(out, perm=perm, dtype="float32")
    ctx.op("RELU_0_TO_1", [t2], [y])


@handles("Softmax")
def softmax(ctx: Context, node: Any) -> None:
    x, out = node.input[0], node.output[0]
    rank = len(ctx.shape(x))
    axis = int(attr(node, "axis", -1 if ctx.graph.opset >= 13 else 1)) % rank
    if ctx.graph.opset < 13 and axis != rank - 1:
        raise ctx.unsupported(
            f"Softmax (opset {ctx.graph.opset}) over axis {axis} of a rank-{rank} tensor"
        )
    stored = ctx.perm_of(x)
    perm = stored if stored[-1] == axis else tuple([a for a in range(rank) if a != axis] + [axis])
    int8 = ctx.want_int8([x], out, free_q=False) and ctx.ann(out) is not None
    dtype = "int8" if int8 else "float32"
    xs = ctx.get(x, perm=perm, dtype=dtype)
    y = ctx.output(out, perm=perm, dtype=dtype, q=_Q_UNIT if int8 else None)
    ctx.op("SOFTMAX", [xs.tensor], [y], ctx.options("SoftmaxOptions", beta=1.0))


@handles("BatchNormalization")
def batch_norm(ctx: Context, node: Any) -> None:
    """A BatchNormalization the optimizer could not fold into a convolution: MUL + ADD."""
    x, out = node.input[0], node.output[0]
    scale, bias, mean, var = (ctx.const(n).astype(np.float64) for n in node.input[1:5])
    eps = float(attr(node, "epsilon", 1e-5))
    a = scale / np.sqrt(var + eps)
    b = bias - mean * a
    rank = len(ctx.shape(x))
    perm = ctx.perm_of(x)
    shape = [1] * rank
    shape[1] = a.size
    a_t = a.reshape(shape).transpose(perm).astype(np.float32)
    b_t = b.reshape(shape).transpose(perm).astype(np.float32)
    xs = ctx.get(x, perm=perm, dtype="float32")
    t = ctx.tensor(out + "/scaled", [ctx.shape(x)[i] for i in perm], "float32", like=out, perm=perm)
    ctx.op("MUL", [xs.tensor, ctx.get_const_array(out + "/a", a_t)], [t], ctx.options("MulOptions"))
    y = ctx.output(out, perm=perm, dtype="float32")
    ctx.op("ADD", [t, ctx.get_const_array(out + "/b", b_t)], [y], ctx.options("AddOptions"))


@handles("Identity", "Dropout")
def identity_op(ctx: Context, node: Any) -> None:
    ctx.alias(node.output[0], node.input[0])


# -- pooling ---------------------------------------------------------------------------------
def _shared(ctx: Context, x: str) -> tuple[str, QParams | None]:
    """Ops whose int8 output reuses the input's parameters (pooling, layout, slicing)."""
    if ctx.mode == "int8" and ctx.int8_ready(x):
        s = ctx.get(x, dtype="int8")
        return "int8", s.q
    return "float32", None


@handles("MaxPool", "AveragePool")
def pool(ctx: Context, node: Any) -> None:
    x, out = node.input[0], node.output[0]
    k = list(attr(node, "kernel_shape"))
    if len(k) != 2:
        raise ctx.unsupported("only 2-D pooling is supported")
    strides, dil, pads = _spatial(ctx, node, k)
    if any(d != 1 for d in dil):
        raise ctx.unsupported("dilated pooling is not supported by TFLite")
    in_hw = ctx.shape(x)[2:]
    out_hw = ctx.shape(out)[2:]
    dtype, q = _shared(ctx, x)
    xs = ctx.get(x, perm=NHWC, dtype=dtype)
    is_max = node.op_type == "MaxPool"
    padding = _padding(in_hw, k, strides, dil, pads)
    if not is_max and padding == "SAME" and int(attr(node, "count_include_pad", 0)):
        padding = None
    if padding is None:
        if not is_max and not int(attr(node, "count_include_pad", 0)):
            raise ctx.unsupported(f"AveragePool pads {pads} differ from TFLite's SAME padding")
        xs = _explicit_pad(ctx, x, xs, pads, -3.4e38 if is_max else None)
        padding = "VALID"
    expect = [
        (in_hw[i] + pads[i] + pads[i + 2] - k[i]) // strides[i] + 1
        if padding == "VALID"
        else -(-in_hw[i] // strides[i])
        for i in range(2)
    ]
    if list(out_hw) != expect:
        raise ctx.unsupported(
            f"pooling output {list(out_hw)} (ceil_mode?) differs from TFLite's {expect}"
        )
    y = ctx.output(out, perm=NHWC, dtype=dtype, q=q)
    opts = ctx.options(
        "Pool2DOptions",
        padding=ctx.enum("Padding", padding),
        strideH=strides[0],
        strideW=strides[1],
        filterHeight=k[0],
        filterWidth=k[1],
    )
    ctx.op("MAX_POOL_2D" if is_max else "AVERAGE_POOL_2D", [xs.tensor], [y], opts)


def _mean(ctx: Context, x: str, out: str, axes: Sequence[int], keep: bool) -> None:
    rank = len(ctx.shape(x))
    axes = sorted({a % rank for a in axes})
    perm = ctx.perm_of(x)
    int8 = ctx.want_int8([x], out)
    dtype, q = _out_q(ctx, out, int8)
    xs = ctx.get(x, perm=perm, dtype=dtype)
    t_axes = [perm.index(a) for a in axes]
    if keep:
        out_perm = perm
    else:
        kept = [p for p in perm if p not in axes]
        renum = {a: a - sum(1 for r in axes if r < a) for a in kept}
        out_perm = tuple(renum[p] for p in kept)
    y = ctx.output(out, perm=out_perm, dtype=dtype, q=q)
    ctx.op(
        "MEAN",
        [xs.tensor, ctx.int_const(out + "/axes", t_axes)],
        [y],
        ctx.options("ReducerOptions", keepDims=keep),
    )


@handles("GlobalAveragePool")
def global_average_pool(ctx: Context, node: Any) -> None:
    _mean(ctx, node.input[0], node.output[0], list(range(2, len(ctx.shape(node.input[0])))), True)


@handles("ReduceMean")
def reduce_mean(ctx: Context, node: Any) -> None:
    x = node.input[0]
    axes = attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = [int(a) for a in ctx.const(node.input[1]).reshape(-1)]
    if axes is None:
        axes = list(range(len(ctx.shape(x))))
    _mean(ctx, x, node.output[0], axes, bool(attr(node, "keepdims", 1)))


# -- layout and shape ------------------------------------------------------------------------
def _free_view(shape: Sequence[int], perm: Sequence[int]) -> bool:
    """Is the permuted tensor laid out in memory exactly like the canonical one?"""
    return [p for p in perm if shape[p] != 1] == [i for i in range(len(shape)) if shape[i] != 1]


def _reshape(ctx: Context, node: Any) -> None:
    x, out = node.input[0], node.output[0]
    in_shape, out_shape = ctx.shape(x), ctx.shape(out)
    dtype, q = _shared(ctx, x)
    st = ctx.stored(x)
    out_perm = default_perm(len(out_shape))
    cols = None
    if _free_view(in_shape, st.perm) and st.cols is None:
        xs = ctx.get(x, dtype=dtype)
        if not _free_view(out_shape, out_perm):
            out_perm = identity(len(out_shape))
    elif (
        len(in_shape) == 4
        and len(out_shape) == 2
        and st.perm == NHWC
        and st.cols is None
        and out not in ctx.graph.outputs
        and _feeds_only_dense(ctx, out)
    ):
        # Flatten after a convolution: flatten NHWC as is; the dense layer permutes its weights.
        xs = ctx.get(x, dtype=dtype)
        _n, c, h, w = in_shape
        cols = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)
        out_perm = identity(2)
    else:
        xs = ctx.get(x, perm=identity(len(in_shape)), dtype=dtype)
        out_perm = identity(len(out_shape))
    tshape = [out_shape[p] for p in out_perm]
    sig = ctx.graph.signature(out)
    new_shape = [sig[p] for p in out_perm]
    y = ctx.output(out, perm=out_perm, dtype=dtype, q=q, cols=cols)
    ctx.op(
        "RESHAPE",
        [xs.tensor, ctx.int_const(out + "/shape", new_shape)],
        [y],
        ctx.options("ReshapeOptions", newShape=[int(d) for d in tshape]),
    )


def _feeds_only_dense(ctx: Context, name: str) -> bool:
    users = ctx.graph.consumers.get(name, [])
    return bool(users) and all(
        (
            u.op_type == "Gemm"
            and not attr(u, "transA", 0)
            and u.input[0] == name
            and ctx.is_const(u.input[1])
        )
        or (
            u.op_type == "MatMul"
            and u.input[0] == name
            and ctx.is_const(u.input[1])
            and ctx.const(u.input[1]).ndim == 2
        )
        for u in users
    )


HANDLERS.update(
    {"Reshape": _reshape, "Flatten": _reshape, "Squeeze": _reshape, "Unsqueeze": _reshape}
)


@handles("Transpose")
def transpose(ctx: Context, node: Any) -> None:
    """Free: the output is the input tensor with a different recorded layout."""
    x, out = node.input[0], node.output[0]
    rank = len(ctx.shape(x))
    t = list(attr(node, "perm", list(range(rank))[::-1]))
    st = ctx.stored(x)
    if st.cols is not None:
        st = ctx.get(x, perm=identity(rank))
    inv_t = [0] * rank
    for i, p in enumerate(t):
        inv_t[p] = i
    ctx.values[out] = Stored(
        tensor=st.tensor, perm=tuple(inv_t[p] for p in st.perm), dtype=st.dtype, q=st.q
    )


@handles("Concat")
def concat(ctx: Context, node: Any) -> None:
    out = node.output[0]
    ins = [i for i in node.input if i]
    rank = len(ctx.shape(out))
    axis = int(attr(node, "axis")) % rank
    perm = _layout_for(ctx, ins, out)
    int8 = ctx.mode == "int8" and all(ctx.int8_ready(i) for i in ins)
    q = ctx.ann(out) if int8 else None
    if int8 and q is None:
        qs = {ctx.get(i, dtype="int8").q for i in ins if not ctx.is_const(i)}
        q = qs.pop() if len(qs) == 1 else None
        int8 = q is not None
    dtype = "int8" if int8 else "float32"
    ts = []
    for i in ins:
        s = ctx.get(i, perm=perm, dtype=dtype)
        if int8 and q is not None:
            # XNNPACK (and TFLite's converter) want one scale across a concatenation.
            s = ctx.requantize(i, s, q)
        ts.append(s.tensor)
    y = ctx.output(out, perm=perm, dtype=dtype, q=q)
    ctx.op("CONCATENATION", ts, [y], ctx.options("ConcatenationOptions", axis=perm.index(axis)))


@handles("Split")
def split(ctx: Context, node: Any) -> None:
    x = node.input[0]
    rank = len(ctx.shape(x))
    axis = int(attr(node, "axis", 0)) % rank
    sizes = [ctx.shape(o)[axis] for o in node.output]
    dtype, q = _shared(ctx, x)
    perm = ctx.perm_of(x)
    xs = ctx.get(x, dtype=dtype)
    ys = [ctx.output(o, perm=perm, dtype=dtype, q=q) for o in node.output]
    ctx.op(
        "SPLIT_V",
        [
            xs.tensor,
            ctx.int_const(x + "/sizes", sizes),
            ctx.int_const(x + "/axis", perm.index(axis)),
        ],
        ys,
        ctx.options("SplitVOptions", numSplits=len(ys)),
    )


@handles("Slice")
def slice_op(ctx: Context, node: Any) -> None:
    x, out = node.input[0], node.output[0]
    shape = ctx.shape(x)
    rank = len(shape)
    starts = [int(v) for v in ctx.const(node.input[1]).reshape(-1)]
    ends = [int(v) for v in ctx.const(node.input[2]).reshape(-1)]
    axes = (
        [int(v) % rank for v in ctx.const(node.input[3]).reshape(-1)]
        if len(node.input) > 3 and node.input[3]
        else list(range(len(starts)))
    )
    steps = (
        [int(v) for v in ctx.const(node.input[4]).reshape(-1)]
        if len(node.input) > 4 and node.input[4]
        else [1] * len(starts)
    )
    if any(s <= 0 for s in steps):
        raise ctx.unsupported("Slice with negative or zero steps is not supported")
    begin, end, stride = [0] * rank, list(shape), [1] * rank
    mask = (1 << rank) - 1
    for a, s0, e0, st in zip(axes, starts, ends, steps, strict=True):
        d = shape[a]
        s0 = min(max(s0 + d if s0 < 0 else s0, 0), d)
        e0 = min(max(e0 + d if e0 < 0 else e0, 0), d)
        begin[a], end[a], stride[a] = s0, e0, st
        mask &= ~(1 << a)
    dtype, q = _shared(ctx, x)
    perm = ctx.perm_of(x)
    xs = ctx.get(x, dtype=dtype)
    t_mask = sum(1 << i for i, p in enumerate(perm) if mask >> p & 1)
    y = ctx.output(out, perm=perm, dtype=dtype, q=q)
    ctx.op(
        "STRIDED_SLICE",
        [
            xs.tensor,
            ctx.int_const(out + "/begin", [begin[p] for p in perm]),
            ctx.int_const(out + "/end", [end[p] for p in perm]),
            ctx.int_const(out + "/strides", [stride[p] for p in perm]),
        ],
        [y],
        ctx.options("StridedSliceOptions", beginMask=t_mask, endMask=t_mask),
    )


@handles("Pad")
def pad(ctx: Context, node: Any) -> None:
    x, out = node.input[0], node.output[0]
    rank = len(ctx.shape(x))
    mode = attr(node, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = attr(node, "pads", None)
    if pads is None:
        pads = [int(v) for v in ctx.const(node.input[1]).reshape(-1)]
    value = 0.0
    if len(node.input) > 2 and node.input[2]:
        value = float(ctx.const(node.input[2]).reshape(-1)[0])
    if len(node.input) > 3 and node.input[3]:
        raise ctx.unsupported("Pad with an axes input is not supported")
    if any(p < 0 for p in pads):
        raise ctx.unsupported("negative pads (cropping) are not supported")
    dtype, q = _shared(ctx, x)
    perm = ctx.perm_of(x)
    xs = ctx.get(x, dtype=dtype)
    paddings = ctx.int_const(out + "/pads", [[pads[p], pads[p + rank]] for p in perm])
    y = ctx.output(out, perm=perm, dtype=dtype, q=q)
    if mode == "reflect":
        ctx.op(
            "MIRROR_PAD",
            [xs.tensor, paddings],
            [y],
            ctx.options("MirrorPadOptions", mode=ctx.enum("MirrorPadMode", "REFLECT")),
        )
    elif mode != "constant":
        raise ctx.unsupported(f"Pad mode {mode!r} is not supported (constant and reflect are)")
    elif value == 0.0:
        ctx.op("PAD", [xs.tensor, paddings], [y])
    else:
        if dtype == "int8":
            assert q is not None
            v = ctx.w.tensor(
                ctx.fresh(out + "/value"),
                [],
                "int8",
                q=q,
                data=quantize_array(np.asarray(value), q),
            )
        else:
            v = ctx.w.tensor(
                ctx.fresh(out + "/value"), [], "float32", data=np.asarray(value, np.float32)
            )
        ctx.op("PADV2", [xs.tensor, paddings, v], [y])


@handles("Resize", "Upsample")
def resize(ctx: Context, node: Any) -> None:
    x, out = node.input[0], node.output[0]
    if len(ctx.shape(x)) != 4 or ctx.shape(x)[:2] != ctx.shape(out)[:2]:
        raise ctx.unsupported("only resizing H and W of a 4-D tensor is supported")
    mode = attr(node, "mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    ctm = attr(
        node,
        "coordinate_transformation_mode",
        b"half_pixel" if node.op_type == "Resize" else b"asymmetric",
    )
    ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
    if ctx.graph.opset < 11:
        ctm = "asymmetric"
    nearest_mode = attr(node, "nearest_mode", b"round_prefer_floor")
    nearest_mode = nearest_mode.decode() if isinstance(nearest_mode, bytes) else nearest_mode
    if mode == "nearest":
        code, kind = "RESIZE_NEAREST_NEIGHBOR", "ResizeNearestNeighborOptions"
        if ctm == "asymmetric" and nearest_mode != "floor":
            raise ctx.unsupported(
                f"nearest Resize with nearest_mode {nearest_mode!r} and asymmetric coordinates"
            )
    elif mode in ("linear", "bilinear"):
        code, kind = "RESIZE_BILINEAR", "ResizeBilinearOptions"
    else:
        raise ctx.unsupported(f"Resize mode {mode!r} (nearest and linear are supported)")
    if ctm not in ("asymmetric", "align_corners", "half_pixel", "pytorch_half_pixel"):
        raise ctx.unsupported(f"Resize coordinate_transformation_mode {ctm!r}")
    dtype, q = _shared(ctx, x)
    xs = ctx.get(x, perm=NHWC, dtype=dtype)
    y = ctx.output(out, perm=NHWC, dtype=dtype, q=q)
    size = ctx.int_const(out + "/size", list(ctx.shape(out)[2:]))
    opts = ctx.options(
        kind,
        alignCorners=ctm == "align_corners",
        halfPixelCenters=ctm in ("half_pixel", "pytorch_half_pixel"),
    )
    ctx.op(code, [xs.tensor, size], [y], opts)
