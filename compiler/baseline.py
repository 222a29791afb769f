"""The bundle's baseline: input feature sketches, output class counts and confidence.

Sketches are exact (KLL with k >= rows, so it never compacts): KLL compaction flips random
coins seeded per process, which would make two compiles of the same model differ. Above
`BASELINE_MAX_ROWS` rows a fixed, evenly spaced subsample is sketched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from compiler.verify import is_classifier_output
from protocol.canonical import canonical_bytes
from protocol.features import Baseline, FeatureExtractor, FeatureSpec
from protocol.sketch import DEFAULT_K, FeatureSketch, SketchBank

__all__ = ["BASELINE_MAX_ROWS", "BASELINE_PATH", "baseline_bytes", "build_baseline", "confidence"]

BASELINE_PATH = "baseline/sketches.json"
#: exact KLL sketches of 4,096 float32 values serialize to ~16 KB, half MAX_SKETCH_BYTES
BASELINE_MAX_ROWS = 4096


def confidence(scores: np.ndarray) -> np.ndarray:
    """Max class probability per row; softmax first unless rows already are probabilities."""
    s = scores.astype(np.float64)
    is_prob = bool(np.all(s >= 0) and np.allclose(s.sum(axis=1), 1.0, atol=1e-3))
    if not is_prob:
        s = np.exp(s - s.max(axis=1, keepdims=True))
        s /= s.sum(axis=1, keepdims=True)
    return np.asarray(s.max(axis=1), dtype=np.float32)


def _subsample(n: int) -> np.ndarray:
    if n <= BASELINE_MAX_ROWS:
        return np.arange(n)
    return np.linspace(0, n - 1, BASELINE_MAX_ROWS).round().astype(np.int64)


def build_baseline(
    inputs: Sequence[Mapping[str, np.ndarray]],
    float_outputs: Sequence[Sequence[np.ndarray]],
) -> Baseline:
    """Sketch every input (calibration + held-out) and the float model's first class output."""
    names = list(inputs[0])
    stacked = {k: np.concatenate([part[k] for part in inputs]) for k in names}
    rows = int(next(iter(stacked.values())).shape[0])
    pick = _subsample(rows)
    k = max(DEFAULT_K, len(pick))
    specs: list[FeatureSpec] = []
    sketches = {}
    for name in names:
        arr = stacked[name][pick]
        spec = FeatureSpec.for_input(name, tuple(int(d) for d in arr.shape[1:]))
        bank = SketchBank(spec.names, k=k)
        bank.update_rows(FeatureExtractor(spec)(arr))
        specs.append(spec)
        sketches.update(bank.to_wire())
    class_counts: list[int] = []
    conf = None
    first = [
        np.concatenate([outs[i] for outs in float_outputs]) for i in range(len(float_outputs[0]))
    ]
    scores = next((o for o in first if is_classifier_output(o)), None)
    if scores is not None:
        class_counts = np.bincount(scores.argmax(axis=1), minlength=scores.shape[1]).tolist()
        conf = FeatureSketch.of(confidence(scores[pick]), k=k).to_wire()
    return Baseline(
        rows=rows,
        features=tuple(specs),
        sketches=sketches,
        output_class_counts=class_counts,
        confidence=conf,
    )


def baseline_bytes(baseline: Baseline) -> bytes:
    """Canonical JSON, as stored in the bundle."""
    return canonical_bytes(baseline.model_dump(mode="json"))
