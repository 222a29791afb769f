"""Pure aggregation of the quality sections of telemetry windows (no database, no I/O).

A window's ``labels`` section holds labels joined on the device *to predictions of any model
version* (a label may arrive after the device switched models), grouped by the hour in
which the labelled predictions were made; its ``estimate`` section holds the confidence
sums of the window's own model. Both add up, so any set of windows merges exactly.

Every figure comes with its denominators: labels behind an accuracy, label coverage (labels
/ predictions of the version over the same span) and the lag distribution, so a quiet window
is never mistaken for a good one.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from protocol.messages import LABEL_LAG_BOUNDS_S

__all__ = ["QualityAccumulator", "lag_quantile", "wilson_interval"]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95 % Wilson score interval of a proportion; None without data."""
    if n <= 0:
        return None
    p = successes / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def lag_quantile(counts: list[int], q: float) -> float | None:
    """Upper bound (s) of the histogram bucket holding quantile ``q``; inf past the last."""
    total = sum(counts)
    if not total:
        return None
    target, seen = q * total, 0
    for i, c in enumerate(counts):
        seen += c
        if seen >= target and c:
            return LABEL_LAG_BOUNDS_S[i] if i < len(LABEL_LAG_BOUNDS_S) else math.inf
    return math.inf


@dataclass
class QualityAccumulator:
    """Merge windows of one model version (``model``/``version``); then read `figures`."""

    model: str
    version: int
    predictions: int = 0
    windows: int = 0
    cells: Counter[tuple[int, int]] = field(default_factory=Counter)
    lag_counts: list[int] = field(default_factory=lambda: [0] * (len(LABEL_LAG_BOUNDS_S) + 1))
    lag_sum_s: float = 0.0
    late: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    est_rows: int = 0
    est_calibrated: float = 0.0
    est_raw: float = 0.0
    est_uncalibrated_windows: int = 0
    devices: set[str] = field(default_factory=set)

    def add(self, window: Mapping[str, Any], device_id: str = "") -> None:
        """One stored window (the wire JSON as a dict)."""
        mine = window.get("model_name") == self.model and window.get("model_version") == (
            self.version
        )
        if mine:
            self.windows += 1
            self.predictions += int(window.get("inference_count") or 0)
            if device_id:
                self.devices.add(device_id)
            est = window.get("estimate") or {}
            rows = int(est.get("rows") or 0)
            if rows:
                self.est_rows += rows
                self.est_calibrated += float(est.get("calibrated_max_sum") or 0.0)
                self.est_raw += float(est.get("raw_max_sum") or 0.0)
                if not est.get("calibrated"):
                    self.est_uncalibrated_windows += 1
        labels = window.get("labels") or {}
        for st in labels.get("joined") or []:
            if st.get("model_name") != self.model or st.get("model_version") != self.version:
                continue
            for cell in st.get("confusion") or []:
                p, t, n = (int(x) for x in cell)
                self.cells[(p, t)] += n
            for i, c in enumerate(st.get("lag_counts") or []):
                if i < len(self.lag_counts):
                    self.lag_counts[i] += int(c)
            self.lag_sum_s += float(st.get("lag_sum_s") or 0.0)
            self.late += int(st.get("late") or 0)
        if mine:
            # refusals have no model (an unknown id names none): the window's model owns them
            for k, v in (labels.get("rejected") or {}).items():
                self.rejected[str(k)] += int(v)

    def add_all(self, rows: Iterable[tuple[str, Mapping[str, Any]]]) -> QualityAccumulator:
        for device_id, window in rows:
            self.add(window, device_id)
        return self

    @property
    def labels(self) -> int:
        return sum(self.cells.values())

    @property
    def correct(self) -> int:
        return sum(n for (p, t), n in self.cells.items() if p == t)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labels if self.labels else None

    @property
    def estimated_accuracy(self) -> float | None:
        return self.est_calibrated / self.est_rows if self.est_rows else None

    def figures(self, *, class_names: tuple[str, ...] = ()) -> dict[str, Any]:
        """Everything, JSON-ready: labeled figures, coverage, lag, estimate, refusals."""
        n, k = self.labels, self.correct
        classes = 1 + max([max(p, t) for p, t in self.cells] or [-1])
        per_class = []
        for c in range(classes):
            tp = self.cells.get((c, c), 0)
            pred = sum(v for (p, _), v in self.cells.items() if p == c)
            true = sum(v for (_, t), v in self.cells.items() if t == c)
            per_class.append(
                {
                    "class": c,
                    "name": class_names[c] if c < len(class_names) else str(c),
                    "precision": tp / pred if pred else None,
                    "recall": tp / true if true else None,
                    "support": true,
                }
            )
        ci = wilson_interval(k, n)
        est = self.estimated_accuracy
        return {
            "model": self.model,
            "version": self.version,
            "devices": len(self.devices),
            "windows": self.windows,
            "predictions": self.predictions,
            "labeled": {
                "labels": n,
                "accuracy": self.accuracy,
                "accuracy_ci95": list(ci) if ci else None,
                "per_class": per_class,
                "confusion": [[p, t, v] for (p, t), v in sorted(self.cells.items())],
            },
            "coverage": (n / self.predictions) if self.predictions else None,
            "label_lag": {
                "bounds_s": list(LABEL_LAG_BOUNDS_S),
                "counts": list(self.lag_counts),
                "mean_s": self.lag_sum_s / n if n else None,
                # None past the last bound (the counts still show them)
                "p50_s": _finite(lag_quantile(self.lag_counts, 0.5)),
                "p90_s": _finite(lag_quantile(self.lag_counts, 0.9)),
                "late": self.late,
            },
            "estimate": {
                "rows": self.est_rows,
                "accuracy": est,
                "raw_confidence": self.est_raw / self.est_rows if self.est_rows else None,
                "calibrated": self.est_rows > 0 and self.est_uncalibrated_windows == 0,
                "minus_labeled": (est - self.accuracy)
                if est is not None and self.accuracy is not None
                else None,
            },
            "rejected_labels": dict(self.rejected),
        }


def _finite(x: float | None) -> float | None:
    return None if x is None or math.isinf(x) else x
