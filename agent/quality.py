"""Model quality on the device: prediction records, late ground truth, confidence sums.

The device is the one place where a prediction and its true label meet: labels come from the
application (local API ``POST /v1/label``, `InferenceService.report_label`) or from the fleet
(a ``label`` command carrying labels posted to its REST API). Each is joined here to a
bounded in-memory record of recent predictions (id, model, time, predicted class per row,
top-1 confidence, input hash), and only the joined figures travel, in the next telemetry
window: a sparse confusion matrix per (model version, hour of prediction), a label-lag
histogram, and counts of labels that could not be joined. Never raw inputs.

Bad input is counted, never double-counted: a label for an id the record does not hold (never
made, or evicted) is ``unknown_prediction``; a second label for a labelled prediction is
``duplicate`` (the first one stands); a label that is not a class of the model (or a list of
the wrong length for a batch) is ``wrong_type``. Labels days late are joined while the
prediction is still recorded and counted in ``late`` as well.

Label-free: each window also carries the sum of *calibrated* top-1 probabilities (the bundle's
``calibration_map``, temperature scaling fitted at compile time) and per-class probability
sums; the fleet's estimated accuracy is their mean. The map's format is the compiler's
(compiler/calibration.py); both sides read it independently.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

import numpy as np

from agent.model import LoadedModel
from protocol.messages import (
    LABEL_LAG_BOUNDS_S,
    ConfidenceSums,
    LabelEntry,
    LabelReport,
    LabelStats,
)

__all__ = [
    "CALIBRATION_FORMAT",
    "Calibration",
    "LabelOutcome",
    "QualityRecorder",
    "input_hash",
    "load_calibration",
]

log = logging.getLogger(__name__)

CALIBRATION_FORMAT: Final = "edgefleet-calibration/1"
#: label-stat groups carried per window at most (the rest wait for the next window)
MAX_GROUPS_PER_WINDOW: Final = 256
_HOUR_S: Final = 3600.0


class LabelOutcome(StrEnum):
    JOINED = "joined"
    UNKNOWN = "unknown_prediction"
    DUPLICATE = "duplicate"
    WRONG_TYPE = "wrong_type"


@dataclass(frozen=True, slots=True, kw_only=True)
class Calibration:
    """Temperature scaling of one classifier output (see compiler/calibration.py)."""

    output: str
    input_kind: str
    temperature: float

    def probabilities(self, y: np.ndarray) -> np.ndarray:
        z = np.asarray(y, dtype=np.float64)
        if self.input_kind == "probabilities":
            z = np.log(np.clip(z, 1e-12, 1.0))
        return _softmax(z, self.temperature)


def _softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    s = np.asarray(z, dtype=np.float64) / temperature
    s = s - s.max(axis=1, keepdims=True)
    e = np.exp(s)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def _raw_probabilities_by_call(z: np.ndarray, rows: Sequence[int]) -> np.ndarray:
    """Several calls' outputs, stacked in ``z`` (``rows`` each), as probabilities: a call
    whose rows all are already (non-negative, summing to 1) keeps them, the others get
    their softmax."""
    if not len(z):
        return z
    # within np.allclose's tolerance (allclose itself took ~27 us of every served call)
    ok = (z.min(axis=1) >= 0) & (np.abs(z.sum(axis=1) - 1.0) <= 1e-3 + 1e-5)
    sizes = [r for r in rows if r]  # a call of no rows has nothing to keep or convert
    starts = np.cumsum([0, *sizes[:-1]])
    keep = np.repeat(np.logical_and.reduceat(ok, starts), sizes)
    if keep.all():
        return z
    out = z.copy()
    out[~keep] = _softmax(z[~keep])
    return out


def load_calibration(model: LoadedModel) -> Calibration | None:
    """The bundle's calibration map, or None (no map, or unreadable: logged, never fatal)."""
    entry = next((f for f in model.manifest.files if f.role == "calibration_map"), None)
    if entry is None:
        return None
    try:
        doc = json.loads((model.directory / entry.path).read_bytes())
        if doc.get("format") != CALIBRATION_FORMAT or doc.get("method") != "temperature":
            raise ValueError(f"unsupported map {doc.get('format')!r}/{doc.get('method')!r}")
        t = float(doc["temperature"])
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature {t} is not a positive number")
        return Calibration(
            output=str(doc["output"]), input_kind=str(doc["input_kind"]), temperature=t
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("calibration map %s unusable (estimate uses raw confidences): %s", entry, exc)
        return None


def input_hash(inputs: Mapping[str, np.ndarray]) -> str:
    """sha256 over each input's C-order bytes in its declared dtype, inputs in name order."""
    h = hashlib.sha256()
    for name in sorted(inputs):
        h.update(np.ascontiguousarray(inputs[name]).tobytes())
    return h.hexdigest()


@dataclass(slots=True, kw_only=True)
class _Prediction:
    bundle_sha256: str | None
    model_name: str
    model_version: int
    at: float
    predicted: tuple[int, ...]
    classes: int
    class_names: tuple[str, ...]
    input_hash: str | None
    labeled: bool = False


@dataclass(slots=True)
class _Group:
    cells: collections.Counter[tuple[int, int]] = field(default_factory=collections.Counter)
    lag_counts: list[int] = field(default_factory=lambda: [0] * (len(LABEL_LAG_BOUNDS_S) + 1))
    lag_sum_s: float = 0.0
    late: int = 0


@dataclass(slots=True)
class _Sums:
    rows: int = 0
    calibrated_max: float = 0.0
    raw_max: float = 0.0
    class_probs: np.ndarray | None = None
    calibrated: bool = False


_GroupKey = tuple[str | None, str, int, float]
#: (prediction id, model, outputs as float64, input hash, time): a call not yet drained
_Pending = tuple[str, "LoadedModel", np.ndarray, str | None, float]
#: pending rows that make `QualityRecorder.record` drain
_DRAIN_ROWS: Final = 64


class QualityRecorder:
    """Thread-safe: records predictions, joins labels, hands out per-window sections."""

    def __init__(
        self,
        *,
        capacity: int = 10_000,
        late_after_s: float = 86_400.0,
        hash_inputs: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.late_after_s = late_after_s
        self.hash_inputs = hash_inputs
        self.clock = clock
        self._lock = threading.Lock()
        self._records: collections.OrderedDict[str, _Prediction] = collections.OrderedDict()
        self._by_hash: dict[str, str] = {}
        self._groups: dict[_GroupKey, _Group] = {}
        self._rejected: collections.Counter[str] = collections.Counter()
        self._sums: dict[str | None, _Sums] = {}
        self._calibrations: dict[int, tuple[LoadedModel, Calibration | None]] = {}
        #: recorded calls not yet drained into records and sums (see `record`)
        self._pending: list[_Pending] = []
        self._pending_rows = 0
        #: totals since start, by outcome (for the local API and tests)
        self.totals: collections.Counter[str] = collections.Counter()

    # -- predictions -----------------------------------------------------------------------
    def _calibration(self, model: LoadedModel) -> Calibration | None:
        cached = self._calibrations.get(id(model))
        if cached is None or cached[0] is not model:
            if len(self._calibrations) > 8:
                self._calibrations.clear()
            cached = (model, load_calibration(model))
            self._calibrations[id(model)] = cached
        return cached[1]

    def _class_output(self, model: LoadedModel, outputs: Mapping[str, np.ndarray]) -> Any:
        if model.manifest.task != "classification":
            return None
        y = outputs.get(model.manifest.outputs[0].name)
        if y is None or y.ndim != 2 or y.shape[1] < 2:
            return None
        return y

    def record(
        self,
        model: LoadedModel,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        prediction_id: str,
    ) -> None:
        """Remember one served call (any batch size) under ``prediction_id``.

        The call's outputs wait in a short list; the probabilities, the predicted classes
        and the confidence sums are computed for many calls at once (`_drain`, at
        `_DRAIN_ROWS` rows or before anything reads them). Done per call, those ~15 small
        numpy operations on one row were most of the agent's overhead on a small model.
        """
        y = self._class_output(model, outputs)
        if y is None:
            return
        # a copy: the application owns the outputs it was handed and may change them
        y = np.array(y, dtype=np.float64)
        digest = input_hash(inputs) if self.hash_inputs else None
        now = self.clock()
        with self._lock:
            # read the calibration map now, while this model's files are certainly there
            # (cached per model: a dict lookup after the first call)
            self._calibration(model)
            self._pending.append((prediction_id, model, y, digest, now))
            self._pending_rows += len(y)
            if self._pending_rows >= _DRAIN_ROWS:
                self._drain()

    def _drain(self) -> None:
        """Turn the pending calls into records and sums, a model's run of calls at once.
        Caller holds the lock."""
        pending, self._pending, self._pending_rows = self._pending, [], 0
        start = 0
        while start < len(pending):
            model = pending[start][1]
            stop = start + 1
            while (
                stop < len(pending)
                and pending[stop][1] is model
                and pending[stop][2].shape[1] == pending[start][2].shape[1]
            ):
                stop += 1
            self._drain_run(model, pending[start:stop])
            start = stop

    def _drain_run(self, model: LoadedModel, run: list[_Pending]) -> None:
        ys = [p[2] for p in run]
        rows = [len(y) for y in ys]
        z = np.concatenate(ys, axis=0)
        cal = self._calibration(model)
        raw = _raw_probabilities_by_call(z, rows)
        probs = cal.probabilities(z) if cal is not None else raw
        predicted = raw.argmax(axis=1).tolist()
        classes = int(z.shape[1])
        names = tuple(model.manifest.class_names)
        at = 0
        for (prediction_id, _, _, digest, now), n in zip(run, rows, strict=True):
            rec = _Prediction(
                bundle_sha256=model.bundle_sha256,
                model_name=model.model_name,
                model_version=model.model_version,
                at=now,
                predicted=tuple(predicted[at : at + n]),
                classes=classes,
                class_names=names,
                input_hash=digest,
            )
            at += n
            self._records[prediction_id] = rec
            if digest is not None:
                self._by_hash[digest] = prediction_id
        while len(self._records) > self.capacity:
            old_id, old = self._records.popitem(last=False)
            if old.input_hash is not None and self._by_hash.get(old.input_hash) == old_id:
                del self._by_hash[old.input_hash]
        if not len(z):
            return
        s = self._sums.setdefault(model.bundle_sha256, _Sums())
        s.rows += len(z)
        s.calibrated_max += float(probs.max(axis=1).sum())
        s.raw_max += float(raw.max(axis=1).sum())
        col = probs.sum(axis=0)
        if s.class_probs is None or len(s.class_probs) != len(col):
            s.class_probs = np.zeros(len(col))
        s.class_probs += col
        s.calibrated = cal is not None

    # -- labels ----------------------------------------------------------------------------
    def report_label(
        self, prediction_id: str, label: Any, *, labeled_at: float | None = None
    ) -> LabelOutcome:
        """Join a true label (class index, class name, or one per row) to a prediction."""
        with self._lock:
            self._drain()
            outcome = self._join(self._records.get(str(prediction_id)), label, labeled_at)
            self._rejected_or_total(outcome)
        return outcome

    def report_label_by_hash(
        self, digest: str, label: Any, *, labeled_at: float | None = None
    ) -> LabelOutcome:
        """Join a label to the latest recorded prediction of inputs with this `input_hash`."""
        with self._lock:
            self._drain()
            pid = self._by_hash.get(digest)
            rec = self._records.get(pid) if pid is not None else None
            outcome = self._join(rec, label, labeled_at)
            self._rejected_or_total(outcome)
        return outcome

    def apply(self, entries: Iterable[LabelEntry]) -> list[LabelOutcome]:
        """Labels the fleet forwarded (a ``label`` command)."""
        out = []
        for e in entries:
            at = e.labeled_at.timestamp() if e.labeled_at is not None else None
            if e.prediction_id is not None:
                out.append(self.report_label(e.prediction_id, e.label, labeled_at=at))
            elif e.input_hash is not None:
                out.append(self.report_label_by_hash(e.input_hash, e.label, labeled_at=at))
            else:
                with self._lock:
                    self._rejected_or_total(LabelOutcome.UNKNOWN)
                out.append(LabelOutcome.UNKNOWN)
        return out

    def _rejected_or_total(self, outcome: LabelOutcome) -> None:
        self.totals[outcome.value] += 1
        if outcome is not LabelOutcome.JOINED:
            self._rejected[outcome.value] += 1

    def _join(self, rec: _Prediction | None, label: Any, labeled_at: float | None) -> LabelOutcome:
        # Caller holds the lock.
        if rec is None:
            return LabelOutcome.UNKNOWN
        truth = _parse_label(label, rec)
        if truth is None:
            return LabelOutcome.WRONG_TYPE
        if rec.labeled:
            return LabelOutcome.DUPLICATE
        rec.labeled = True
        now = self.clock()
        at = labeled_at if labeled_at is not None and math.isfinite(labeled_at) else now
        lag = max(0.0, min(at, now) - rec.at)
        hour = math.floor(rec.at / _HOUR_S) * _HOUR_S
        g = self._groups.setdefault(
            (rec.bundle_sha256, rec.model_name, rec.model_version, hour), _Group()
        )
        for p, t in zip(rec.predicted, truth, strict=True):
            g.cells[(p, t)] += 1
            g.lag_counts[_lag_bucket(lag)] += 1
            g.lag_sum_s += lag
            if lag > self.late_after_s:
                g.late += 1
        return LabelOutcome.JOINED

    # -- per window ------------------------------------------------------------------------
    def take(self, bundle_sha256: str | None) -> tuple[LabelReport | None, ConfidenceSums | None]:
        """The window's sections: every label joined since the last take (any model), and the
        confidence sums of ``bundle_sha256``'s predictions; both reset."""
        with self._lock:
            self._drain()
            keys = sorted(self._groups, key=lambda k: k[3])[:MAX_GROUPS_PER_WINDOW]
            joined = [
                LabelStats(
                    bundle_sha256=k[0],
                    model_name=k[1],
                    model_version=k[2],
                    predicted_hour=datetime.fromtimestamp(k[3], UTC),
                    confusion=[(p, t, n) for (p, t), n in sorted(g.cells.items())],
                    lag_counts=list(g.lag_counts),
                    lag_sum_s=g.lag_sum_s,
                    late=g.late,
                )
                for k in keys
                for g in (self._groups.pop(k),)
            ]
            rejected = dict(self._rejected)
            self._rejected.clear()
            s = self._sums.pop(bundle_sha256, None)
        report = LabelReport(joined=joined, rejected=rejected) if joined or rejected else None
        sums = None
        if s is not None and s.rows:
            sums = ConfidenceSums(
                rows=s.rows,
                calibrated_max_sum=s.calibrated_max,
                raw_max_sum=s.raw_max,
                class_prob_sums=[
                    float(f"{x:.6g}") for x in (s.class_probs if s.class_probs is not None else [])
                ],
                calibrated=s.calibrated,
            )
        return report, sums

    def __len__(self) -> int:
        with self._lock:
            self._drain()
            return len(self._records)


def _or_empty(a: np.ndarray | None) -> list[float]:
    return [] if a is None else [float(x) for x in a]


def _lag_bucket(lag_s: float) -> int:
    for i, bound in enumerate(LABEL_LAG_BOUNDS_S):
        if lag_s <= bound:
            return i
    return len(LABEL_LAG_BOUNDS_S)


def _one(label: Any, rec: _Prediction) -> int | None:
    if isinstance(label, bool):
        return None
    if isinstance(label, int | np.integer):
        v = int(label)
        return v if 0 <= v < rec.classes else None
    if isinstance(label, str) and rec.class_names:
        try:
            return rec.class_names.index(label)
        except ValueError:
            return None
    return None


def _parse_label(label: Any, rec: _Prediction) -> tuple[int, ...] | None:
    """One class per row of the prediction, or None when the label does not fit."""
    items: Sequence[Any] = label if isinstance(label, list | tuple) else [label]
    if len(items) != len(rec.predicted):
        return None
    out = []
    for item in items:
        v = _one(item, rec)
        if v is None:
            return None
        out.append(v)
    return tuple(out)
