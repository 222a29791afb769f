"""Golden input/output pairs of the artifact, for the agent's on-device self-test.

Tolerance: an honest device differs from this host by rounding (other int8 kernels and
requantization on ARM, fp16 on a GPU): a few quantization steps of an output. A wrong model
(other weights, a broken conversion) moves outputs by a large part of their range and flips
predictions. So atol = max(1e-3, 5% of the output range, 4x the noise measured here between
two ONNX Runtime configurations of the same artifact), rtol = 1%, and for classifiers every
golden sample's top-1 must match. Samples are picked with a top-1 margin of at least
2 x atol, so honest rounding cannot flip them.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from compiler.model import TensorInfo
from compiler.verify import is_classifier_output

__all__ = [
    "GOLDEN_COUNT",
    "GOLDEN_MAX",
    "GOLDEN_MIN",
    "GOLDEN_PATH",
    "GoldenSet",
    "deterministic_npz",
    "pick_golden",
    "tolerance",
]

GOLDEN_PATH = "golden/golden.npz"
GOLDEN_COUNT = 16
#: the agent's self-test wants enough pairs to catch a wrong model, few enough to run fast
GOLDEN_MIN = 8
GOLDEN_MAX = 32
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class GoldenSet:
    indices: tuple[int, ...]
    data: bytes
    atol: float
    rtol: float
    min_top1_match: float | None
    noise_abs: float


def deterministic_npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An .npz np.load reads, with fixed member order and timestamps (np.savez uses now)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(
                member, np.ascontiguousarray(arrays[name]), allow_pickle=False
            )
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def tolerance(outputs: Sequence[np.ndarray], noise_abs: float) -> tuple[float, float]:
    """(atol, rtol) from the artifact's output range and the measured noise."""
    spans = [float(o.max() - o.min()) for o in outputs if o.size and o.dtype.kind == "f"]
    span = max(spans, default=0.0)
    atol = max(1e-3, 0.05 * span, 4.0 * noise_abs)
    return float(f"{atol:.4g}"), 0.01


def _margin(scores: np.ndarray) -> np.ndarray:
    top2 = np.sort(scores, axis=1)[:, -2:]
    return np.asarray(top2[:, 1] - top2[:, 0])


def pick_golden(
    inputs: Mapping[str, np.ndarray],
    artifact_outputs: Sequence[np.ndarray],
    model_inputs: Sequence[TensorInfo],
    model_outputs: Sequence[TensorInfo],
    *,
    noise_abs: float,
    count: int = GOLDEN_COUNT,
) -> GoldenSet:
    """Choose `count` held-out samples and pack them with the artifact's outputs."""
    n = int(next(iter(inputs.values())).shape[0])
    count = min(count, n)
    atol, rtol = tolerance(artifact_outputs, noise_abs)
    scores = next((o for o in artifact_outputs if is_classifier_output(o)), None)
    candidates = np.arange(n)
    if scores is not None:
        margin = _margin(scores)
        clear = np.flatnonzero(margin >= 2.0 * atol)
        candidates = clear if len(clear) >= count else np.argsort(-margin, kind="stable")[:count]
        candidates = np.sort(candidates)
    # Evenly spread over the candidates: covers the held-out set, not only its head.
    idx = candidates[np.linspace(0, len(candidates) - 1, count).round().astype(np.int64)]
    idx = np.unique(idx)
    arrays = {f"in:{t.name}": inputs[t.name][idx] for t in model_inputs}
    arrays.update(
        {f"out:{t.name}": o[idx] for t, o in zip(model_outputs, artifact_outputs, strict=True)}
    )
    return GoldenSet(
        indices=tuple(int(i) for i in idx),
        data=deterministic_npz(arrays),
        atol=atol,
        rtol=rtol,
        min_top1_match=1.0 if scores is not None else None,
        noise_abs=noise_abs,
    )
