"""Per-node quantization sensitivity: quantize one node at a time, measure the output error."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from compiler.data import Dataset
from compiler.model import TensorInfo
from compiler.onnx_target import onnx_runner
from compiler.quantize import QuantConfig, quantize_static
from compiler.verify import MAX_SNR_DB, is_classifier_output, run_all, snr_db

__all__ = ["NodeSensitivity", "SensitivityMode", "measure_sensitivity", "quantized_nodes"]

SensitivityMode = Literal["only", "all-but"]
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeSensitivity:
    """Output error with only this node quantized (or with all but this node quantized)."""

    node: str
    op_type: str
    mode: SensitivityMode
    min_snr_db: float
    max_abs_error: float
    top1_agreement: float | None


def quantized_nodes(qdq_model: Path) -> list[tuple[str, str]]:
    """(name, op type) of the compute nodes that read a dequantized tensor in a QDQ model."""
    import onnx

    graph = onnx.load(str(qdq_model), load_external_data=False).graph
    dq_outputs = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    found = []
    for n in graph.node:
        if n.op_type in _QDQ_OPS or not n.name:
            continue
        if any(i in dq_outputs for i in n.input):
            found.append((n.name, n.op_type))
    return found


def measure_sensitivity(
    *,
    preprocessed: Path,
    qdq_model: Path,
    config: QuantConfig,
    calibration: Dataset,
    samples: Mapping[str, np.ndarray],
    float_outputs: Sequence[np.ndarray],
    model_inputs: Sequence[TensorInfo],
    workdir: Path,
    threads: int,
    mode: SensitivityMode = "only",
    on_node: Callable[[str], None] | None = None,
) -> list[NodeSensitivity]:
    """Rank the quantized nodes, most harmful first."""
    workdir.mkdir(parents=True, exist_ok=True)
    results: list[NodeSensitivity] = []
    for i, (name, op_type) in enumerate(quantized_nodes(qdq_model)):
        if mode == "only":
            cfg = config.with_changes(only_nodes=(name,), exclude_nodes=())
        else:
            cfg = config.with_changes(exclude_nodes=(*config.exclude_nodes, name))
        out = workdir / f"node{i}.onnx"
        quantize_static(preprocessed, out, calibration, cfg)
        outs = run_all(onnx_runner(out, threads=threads), samples, model_inputs)
        snrs = [snr_db(f, a) for f, a in zip(float_outputs, outs, strict=True)]
        agreement = None
        for f, a in zip(float_outputs, outs, strict=True):
            if is_classifier_output(f):
                agreement = float(np.mean(f.argmax(axis=1) == a.argmax(axis=1)))
                break
        results.append(
            NodeSensitivity(
                node=name,
                op_type=op_type,
                mode=mode,
                min_snr_db=round(min((s for s in snrs if s is not None), default=MAX_SNR_DB), 3),
                max_abs_error=float(
                    max(
                        float(np.abs(f - a).max()) for f, a in zip(float_outputs, outs, strict=True)
                    )
                ),
                top1_agreement=agreement,
            )
        )
        out.unlink(missing_ok=True)
        if on_node is not None:
            on_node(name)
    # "only": the node whose lone quantization hurts most (lowest SNR) first.
    # "all-but": the node whose exclusion helps most (highest SNR without it) first.
    results.sort(key=lambda r: r.min_snr_db, reverse=(mode == "all-but"))
    return results
