"""Running a .tflite file in LiteRT on this host (verification, golden pairs, benchmarks)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import ModelError

__all__ = ["litert_runner"]


def _q(x: np.ndarray, scale: float, zp: int, dtype: Any) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.asarray(
        np.clip(np.round(x.astype(np.float32) / scale) + zp, info.min, info.max).astype(dtype)
    )


def litert_runner(path: Path | str, *, threads: int, optimized: bool = True) -> Any:
    """A runner (feeds by input name -> outputs in order) over LiteRT's interpreter.

    optimized=False uses TFLite's reference kernels without delegates: a second
    implementation of the same graph, to measure rounding noise. Float feeds are quantized for
    int8 inputs and int8 outputs are dequantized, like the agent's backend does.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if optimized else OpResolverType.BUILTIN_REF
    try:
        interp = Interpreter(
            model_path=str(path),
            num_threads=max(1, threads),
            experimental_op_resolver_type=resolver,
        )
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"LiteRT cannot load {path}: {exc}") from exc
    inputs = interp.get_input_details()
    outputs = interp.get_output_details()
    dynamic = all(len(d["shape_signature"]) and d["shape_signature"][0] == -1 for d in inputs)
    fixed = int(inputs[0]["shape"][0]) if inputs and len(inputs[0]["shape"]) else 1
    state = {"batch": fixed}

    def invoke(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        n = int(next(iter(feeds.values())).shape[0])
        if dynamic and state["batch"] != n:
            for d in inputs:
                interp.resize_tensor_input(d["index"], [n, *d["shape"][1:]], strict=True)
            interp.allocate_tensors()
            state["batch"] = n
        for d in inputs:
            x = np.asarray(feeds[d["name"]])
            scale, zp = d["quantization"]
            if np.dtype(d["dtype"]).kind in "iu" and scale and x.dtype.kind == "f":
                x = _q(x, scale, zp, d["dtype"])
            interp.set_tensor(d["index"], np.ascontiguousarray(x, dtype=d["dtype"]))
        interp.invoke()
        outs = []
        for d in outputs:
            y = interp.get_tensor(d["index"])
            scale, zp = d["quantization"]
            if np.dtype(d["dtype"]).kind in "iu" and scale:
                y = (y.astype(np.float32) - zp) * np.float32(scale)
            outs.append(np.array(y, copy=True))
        return outs

    def run(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        n = int(next(iter(feeds.values())).shape[0])
        if dynamic or n == fixed:
            return invoke(feeds)
        # Fixed batch (e.g. ConvTranspose graphs): run in slices of the model's batch.
        parts = [
            invoke({k: v[i : i + fixed] for k, v in feeds.items()}) for i in range(0, n, fixed)
        ]
        return [np.concatenate([p[j] for p in parts]) for j in range(len(outputs))]

    return run
