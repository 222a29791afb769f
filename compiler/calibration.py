"""The calibration map: temperature scaling fitted on held-out data at compile time.

A classifier's top-1 probability is what the fleet's label-free accuracy estimate averages,
so it must mean what it says: of predictions made with confidence 0.8, about 80 % should be
right. Networks are usually over-confident; one temperature ``T`` (probabilities =
softmax(z / T), ``z`` = logits, or log-probabilities when the model outputs probabilities)
fixes most of it without changing any prediction (argmax is unchanged).

The map travels in the bundle as ``model/calibration.json`` (role ``calibration_map``):

    {"format": "edgefleet-calibration/1", "method": "temperature", "output": "<name>",
     "input_kind": "logits" | "probabilities", "temperature": T, ...quality figures}

The quality figures (ECE and NLL before/after) are measured honestly: two-fold cross-fitting
on the held-out set (fit on one half, measure on the other, and the reverse); the map
shipped is then fitted on all of it. The agent applies the map itself (agent/quality.py
reads the same format; the two never import each other).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

__all__ = [
    "CALIBRATION_FORMAT",
    "CALIBRATION_PATH",
    "CalibrationMap",
    "expected_calibration_error",
    "fit_calibration",
    "fit_temperature",
]

CALIBRATION_PATH: Final = "model/calibration.json"
CALIBRATION_FORMAT: Final = "edgefleet-calibration/1"
ECE_BINS: Final = 15
_T_MIN, _T_MAX = 0.05, 20.0


def _log_inputs(outputs: np.ndarray) -> tuple[np.ndarray, str]:
    """Logits as they are; probabilities (non-negative rows summing to 1) as their log."""
    z = np.asarray(outputs, dtype=np.float64)
    if z.size and (z >= 0).all() and np.allclose(z.sum(axis=1), 1.0, atol=1e-3):
        return np.log(np.clip(z, 1e-12, 1.0)), "probabilities"
    return z, "logits"


def _softmax(z: np.ndarray, temperature: float) -> np.ndarray:
    s = z / temperature
    s = s - s.max(axis=1, keepdims=True)
    e = np.exp(s)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def _nll(z: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    p = _softmax(z, temperature)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1.0))))


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE: the sample-weighted |accuracy - confidence| gap over equal-width confidence bins."""
    conf = probs.max(axis=1)
    right = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(right[m].mean() - conf[m].mean())
    return float(ece)


def fit_temperature(outputs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising held-out NLL (golden-section search on log T)."""
    z, _ = _log_inputs(outputs)
    labels = np.asarray(labels, dtype=np.int64)
    lo, hi = math.log(_T_MIN), math.log(_T_MAX)
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = _nll(z, labels, math.exp(a)), _nll(z, labels, math.exp(b))
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = _nll(z, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = _nll(z, labels, math.exp(b))
    return math.exp((lo + hi) / 2.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class CalibrationMap:
    """Temperature scaling for one classifier output, with its measured quality."""

    output: str
    input_kind: str
    temperature: float
    fitted_on: int
    figures: dict[str, Any]

    def probabilities(self, outputs: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities of a batch of raw outputs."""
        z, _ = _log_inputs(outputs)
        return _softmax(z, self.temperature)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CALIBRATION_FORMAT,
            "method": "temperature",
            "output": self.output,
            "input_kind": self.input_kind,
            "temperature": float(f"{self.temperature:.6g}"),
            "fitted_on": self.fitted_on,
            **self.figures,
        }

    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys): identical inputs give identical bundle bytes."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()


def _r(x: float) -> float:
    return float(f"{x:.5g}")


def fit_calibration(output_name: str, outputs: np.ndarray, labels: np.ndarray) -> CalibrationMap:
    """Fit the map on all held-out rows; measure it by two-fold cross-fitting."""
    z, kind = _log_inputs(outputs)
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    # a fixed interleaved split: deterministic, and both halves span the whole set
    halves = (np.arange(n) % 2 == 0, np.arange(n) % 2 == 1)
    cross = np.empty_like(z)
    for fit_on, test_on in (halves, halves[::-1]):
        t = fit_temperature(z[fit_on], y[fit_on]) if fit_on.sum() >= 2 else 1.0
        cross[test_on] = _softmax(z[test_on], t)
    raw = _softmax(z, 1.0)
    temperature = fit_temperature(z, y)
    figures = {
        "evaluation": "two-fold cross-fit on the held-out set",
        "ece_bins": ECE_BINS,
        "ece_before": _r(expected_calibration_error(raw, y)),
        "ece_after": _r(expected_calibration_error(cross, y)),
        "nll_before": _r(float(-np.mean(np.log(np.clip(raw[np.arange(n), y], 1e-12, 1))))),
        "nll_after": _r(float(-np.mean(np.log(np.clip(cross[np.arange(n), y], 1e-12, 1))))),
        "accuracy": _r(float((raw.argmax(axis=1) == y).mean())),
        "mean_confidence_before": _r(float(raw.max(axis=1).mean())),
        "mean_confidence_after": _r(float(cross.max(axis=1).mean())),
    }
    return CalibrationMap(
        output=output_name, input_kind=kind, temperature=temperature, fitted_on=n, figures=figures
    )
