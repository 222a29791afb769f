"""Per-window telemetry: counts, errors, latency, input and output sketches, device state.

The per-inference path only appends to buffers under a lock; sketches are updated a batch of
rows at a time (every `FLUSH_ROWS` rows and at window close), because one vectorised KLL
update costs about as much as a single per-value one. Windows are aligned to multiples of
the window length in wall-clock time, so windows of different devices line up, and never
mix two models: a model switch closes the current window.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import numpy as np

from agent.model import LoadedModel
from agent.system import SystemProbe, SystemReading
from protocol.errors import SketchError
from protocol.features import FeatureExtractor, FeatureSpec
from protocol.messages import (
    ConfidenceSums,
    LabelReport,
    LabelStats,
    ShadowStats,
    TelemetryWindow,
)
from protocol.sketch import FeatureSketch, SketchBank, SketchWire
from protocol.sketchpack import is_compressed, pack_sketches

__all__ = [
    "FLUSH_ROWS",
    "ClosedWindow",
    "TelemetryRecorder",
    "feature_specs",
    "merge_confidence_sums",
    "merge_label_reports",
    "merge_window_payloads",
]

FLUSH_ROWS: Final = 64


def feature_specs(model: LoadedModel) -> tuple[FeatureSpec, ...]:
    """The bundle's baseline feature specs, or specs derived from the input signature."""
    if model.baseline is not None:
        return model.baseline.features
    specs = []
    for s in model.manifest.inputs:
        sample = s.shape[1:]
        if all(isinstance(d, int) and d > 0 for d in sample):
            specs.append(FeatureSpec.for_input(s.name, tuple(int(d) for d in sample)))  # type: ignore[arg-type]
    return tuple(specs)


def _softmax_max(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e.max(axis=1) / e.sum(axis=1), dtype=np.float32)


class _ModelWindow:
    """Sketches of one model over one window (not thread-safe; the recorder locks)."""

    def __init__(self, model: LoadedModel | None, start: float) -> None:
        self.model = model
        self.start = start
        self.count = 0
        self.errors: dict[str, int] = {}
        self.latency = FeatureSketch()
        self.confidence: FeatureSketch | None = None
        self.class_counts: np.ndarray | None = None
        self._latencies: list[float] = []
        self._inputs: dict[str, list[np.ndarray]] = {}
        self._outputs: list[np.ndarray] = []
        self._rows = 0
        self._extractors: list[tuple[FeatureExtractor, SketchBank]] = []
        self._class_output: str | None = None
        if model is not None:
            for spec in feature_specs(model):
                self._extractors.append((FeatureExtractor(spec), SketchBank(spec.names)))
                self._inputs[spec.input] = []
            out = model.manifest.outputs[0]
            if model.manifest.task == "classification" and len(out.shape) == 2:
                self._class_output = out.name
                self.confidence = FeatureSketch()

    def add(
        self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], ms: float
    ) -> None:
        self._latencies.append(ms)
        rows = 1
        for name, buf in self._inputs.items():
            arr = inputs.get(name)
            if arr is not None:
                buf.append(arr)
                rows = len(arr) if arr.ndim else 1
        if self._class_output is not None:
            y = outputs.get(self._class_output)
            if y is not None and y.ndim == 2:
                self._outputs.append(y)
        self.count += rows
        self._rows += rows
        if self._rows >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self._latencies:
            self.latency.update(np.asarray(self._latencies, dtype=np.float32))
            self._latencies.clear()
        for extractor, bank in self._extractors:
            buf = self._inputs[extractor.spec.input]
            if buf:
                bank.update_rows(extractor(np.concatenate(buf, axis=0)))
                buf.clear()
        if self._outputs and self.confidence is not None:
            y = np.concatenate(self._outputs, axis=0).astype(np.float32)
            self._outputs.clear()
            counts = np.bincount(y.argmax(axis=1), minlength=y.shape[1])
            self.class_counts = counts if self.class_counts is None else self.class_counts + counts
            self.confidence.update(_softmax_max(y))
        self._rows = 0

    def input_pack(self, *, compress: bool = False) -> bytes | None:
        """All input feature sketches in one `protocol.sketchpack` pack (None: none)."""
        sketches: dict[str, FeatureSketch] = {}
        for _, bank in self._extractors:
            sketches.update(bank.sketches)
        return pack_sketches(sketches, compress=compress) if sketches else None


@dataclass(frozen=True, slots=True, kw_only=True)
class ClosedWindow:
    """A finished window, before it gets its sequence number."""

    start: float
    end: float
    bundle_sha256: str | None
    model_name: str | None
    model_version: int | None
    inference_count: int
    error_counts: dict[str, int]
    latency_ms: SketchWire | None
    input_pack: bytes | None
    output_class_counts: list[int]
    confidence: SketchWire | None
    system: SystemReading
    extra: dict[str, object] = field(default_factory=dict)
    shadow: ShadowStats | None = None
    labels: LabelReport | None = None
    estimate: ConfidenceSums | None = None
    cpu_time_s: float | None = None

    def to_message(
        self, *, device_id: str, seq: int, dropped_windows: int = 0, stream_id: str = ""
    ) -> TelemetryWindow:
        """The wire message for this window."""
        return TelemetryWindow(
            device_id=device_id,
            stream_id=stream_id,
            seq=seq,
            window_start=datetime.fromtimestamp(self.start, UTC),
            window_end=datetime.fromtimestamp(self.end, UTC),
            bundle_sha256=self.bundle_sha256,
            model_name=self.model_name,
            model_version=self.model_version,
            inference_count=self.inference_count,
            error_counts=self.error_counts,
            latency_ms=self.latency_ms,
            input_pack=self.input_pack,
            output_class_counts=self.output_class_counts,
            confidence=self.confidence,
            battery=self.system.battery,
            cpu_temp_c=self.system.cpu_temp_c,
            load_1m=self.system.load_1m,
            mem_rss_bytes=self.system.mem_rss_bytes,
            dropped_windows=dropped_windows,
            extra=dict(self.extra),
            shadow=self.shadow,
            labels=self.labels,
            estimate=self.estimate,
            cpu_time_s=self.cpu_time_s,
        )


class TelemetryRecorder:
    """Thread-safe recorder of the current window; `take_closed` hands out finished ones."""

    def __init__(
        self,
        *,
        window_s: float,
        probe: SystemProbe | None = None,
        clock: Callable[[], float] = time.time,
        shadow_source: Callable[[], ShadowStats | None] | None = None,
        extra_source: Callable[[], dict[str, object]] | None = None,
        quality_source: (
            Callable[[str | None], tuple[LabelReport | None, ConfidenceSums | None]] | None
        ) = None,
        cpu_clock: Callable[[], float] = time.process_time,
        compress_sketches: bool = False,
    ) -> None:
        self.window_s = window_s
        #: zlib the window's sketch pack (~20% fewer bytes on the link; the fleet inflates)
        self.compress_sketches = compress_sketches
        #: per-window extras: the shadow comparison, and the agent's counters
        self.shadow_source = shadow_source
        self.extra_source = extra_source
        #: joined labels and confidence sums for the window (agent/quality.py)
        self.quality_source = quality_source
        self.cpu_clock = cpu_clock
        self._cpu_mark = cpu_clock()
        self.probe = probe or SystemProbe()
        self.clock = clock
        self._lock = threading.Lock()
        self._current = _ModelWindow(None, clock())
        self._closed: list[ClosedWindow] = []

    def _boundary_after(self, start: float) -> float:
        return (math.floor(start / self.window_s) + 1) * self.window_s

    def set_model(self, model: LoadedModel | None) -> None:
        """Start recording for another model; the current window closes if it saw anything."""
        now = self.clock()
        with self._lock:
            cur = self._current
            if cur.count or cur.errors:
                self._closed.append(self._close(cur, now))
            self._current = _ModelWindow(model, now if (cur.count or cur.errors) else cur.start)

    def record(
        self,
        model: LoadedModel,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        latency_ms: float,
    ) -> None:
        """One successful inference (of any batch size) by ``model``."""
        with self._lock:
            if self._current.model is not model:
                return  # raced with a switch; it belongs to a closed window
            self._current.add(inputs, outputs, latency_ms)

    def record_error(self, kind: str) -> None:
        """One failed prediction, counted under ``kind``."""
        with self._lock:
            errs = self._current.errors
            errs[kind] = errs.get(kind, 0) + 1

    def take_closed(self, now: float | None = None) -> list[ClosedWindow]:
        """Close the current window if its time is up; return every finished window."""
        now = self.clock() if now is None else now
        with self._lock:
            cur = self._current
            if now >= self._boundary_after(cur.start):
                self._closed.append(self._close(cur, now))
                self._current = _ModelWindow(cur.model, now)
            closed, self._closed = self._closed, []
        return closed

    def flush_all(self) -> list[ClosedWindow]:
        """Close the current window now (at shutdown) and return every finished window."""
        now = self.clock()
        with self._lock:
            cur = self._current
            self._closed.append(self._close(cur, now))
            self._current = _ModelWindow(cur.model, now)
            closed, self._closed = self._closed, []
        return closed

    def _close(self, w: _ModelWindow, now: float) -> ClosedWindow:
        w.flush()
        m = w.model
        cpu = self.cpu_clock()
        cpu_used, self._cpu_mark = max(0.0, cpu - self._cpu_mark), cpu
        labels = estimate = None
        if self.quality_source is not None:
            labels, estimate = self.quality_source(m.bundle_sha256 if m else None)
        extra = self.extra_source() if self.extra_source is not None else {}
        if estimate is not None and estimate.rows:
            # a figure the rollout's custom gates can compare (lower is better)
            extra["quality_estimated_error"] = 1.0 - estimate.calibrated_max_sum / estimate.rows
        return ClosedWindow(
            start=w.start,
            end=max(now, w.start),
            bundle_sha256=m.bundle_sha256 if m else None,
            model_name=m.model_name if m else None,
            model_version=m.model_version if m else None,
            inference_count=w.count,
            error_counts=dict(w.errors),
            latency_ms=w.latency.to_wire() if w.latency.count else None,
            input_pack=w.input_pack(compress=self.compress_sketches) if w.count else None,
            output_class_counts=[int(c) for c in w.class_counts]
            if w.class_counts is not None
            else [],
            confidence=w.confidence.to_wire() if w.confidence and w.confidence.count else None,
            system=self.probe.read(),
            extra=extra,
            shadow=self.shadow_source() if self.shadow_source is not None else None,
            labels=labels,
            estimate=estimate,
            cpu_time_s=cpu_used,
        )


def merge_window_payloads(older: bytes, newer: bytes) -> bytes | None:
    """Two stored windows of one model merged into one (the older's seq), or None.

    Used by the outbox when it is full: sketches merge, counts add, the time span covers
    both, device readings are the newer window's, ``merged_windows`` adds up. Windows of
    different models (or streams) are not merged.
    """
    from protocol.errors import ProtocolError
    from protocol.messages import decode_message, encode_message

    try:
        a = decode_message(older, expect=TelemetryWindow)
        b = decode_message(newer, expect=TelemetryWindow)
    except ProtocolError:
        return None
    if (a.bundle_sha256, a.stream_id, a.device_id) != (b.bundle_sha256, b.stream_id, b.device_id):
        return None

    def merged(x: SketchWire | None, y: SketchWire | None) -> SketchWire | None:
        if x is None or y is None:
            return x or y
        sk = FeatureSketch.from_wire(x)
        sk.merge(FeatureSketch.from_wire(y))
        return sk.to_wire()

    errors = dict(a.error_counts)
    for k, v in b.error_counts.items():
        errors[k] = errors.get(k, 0) + v
    n = max(len(a.output_class_counts), len(b.output_class_counts))
    classes = [
        (a.output_class_counts[i] if i < len(a.output_class_counts) else 0)
        + (b.output_class_counts[i] if i < len(b.output_class_counts) else 0)
        for i in range(n)
    ]
    try:
        inputs = a.sketches()
        for name, sketch in b.sketches().items():
            if name in inputs:
                inputs[name].merge(sketch)
            else:
                inputs[name] = sketch
    except SketchError:
        return None  # a window we cannot read is not merged (it is sent as it is)
    shadow = b.shadow or a.shadow
    if (
        a.shadow is not None
        and b.shadow is not None
        and a.shadow.bundle_sha256 == b.shadow.bundle_sha256
    ):
        sa, sb = a.shadow, b.shadow
        shadow = ShadowStats(
            bundle_sha256=sa.bundle_sha256,
            samples=sa.samples + sb.samples,
            top1_agreement=_weighted(sa.top1_agreement, sa.samples, sb.top1_agreement, sb.samples),
            mean_abs_error=_weighted(sa.mean_abs_error, sa.samples, sb.mean_abs_error, sb.samples),
            latency_ms=merged(sa.latency_ms, sb.latency_ms),
            errors=sa.errors + sb.errors,
            skipped=sa.skipped + sb.skipped,
        )
    extra = dict(a.extra)
    extra.update(b.extra)  # counters are cumulative: the newer value stands
    out = b.model_copy(
        update={
            "seq": a.seq,
            "message_id": a.message_id,
            "window_start": min(a.window_start, b.window_start),
            "window_end": max(a.window_end, b.window_end),
            "inference_count": a.inference_count + b.inference_count,
            "error_counts": errors,
            "latency_ms": merged(a.latency_ms, b.latency_ms),
            "input_sketches": {},
            "input_pack": (
                pack_sketches(inputs, compress=is_compressed(a.input_pack)) if inputs else None
            ),
            "output_class_counts": classes,
            "confidence": merged(a.confidence, b.confidence),
            "merged_windows": a.merged_windows + b.merged_windows,
            "dropped_windows": a.dropped_windows + b.dropped_windows,
            "extra": extra,
            "shadow": shadow,
            "labels": merge_label_reports(a.labels, b.labels),
            "estimate": merge_confidence_sums(a.estimate, b.estimate),
            "cpu_time_s": (
                None
                if a.cpu_time_s is None and b.cpu_time_s is None
                else (a.cpu_time_s or 0.0) + (b.cpu_time_s or 0.0)
            ),
        }
    )
    try:
        return encode_message(out)
    except ProtocolError:
        return None


def merge_label_reports(a: LabelReport | None, b: LabelReport | None) -> LabelReport | None:
    """Joined cells add per (model, hour); refusals add. Nothing is counted twice."""
    if a is None or b is None:
        return a or b
    groups: dict[tuple[object, ...], LabelStats] = {}
    for st in (*a.joined, *b.joined):
        key = (st.bundle_sha256, st.model_name, st.model_version, st.predicted_hour)
        old = groups.get(key)
        if old is None:
            groups[key] = st
            continue
        cells: dict[tuple[int, int], int] = {}
        for p, t, n in (*old.confusion, *st.confusion):
            cells[(p, t)] = cells.get((p, t), 0) + n
        n_lag = max(len(old.lag_counts), len(st.lag_counts))
        groups[key] = old.model_copy(
            update={
                "confusion": [(p, t, n) for (p, t), n in sorted(cells.items())],
                "lag_counts": [
                    (old.lag_counts[i] if i < len(old.lag_counts) else 0)
                    + (st.lag_counts[i] if i < len(st.lag_counts) else 0)
                    for i in range(n_lag)
                ],
                "lag_sum_s": old.lag_sum_s + st.lag_sum_s,
                "late": old.late + st.late,
            }
        )
    rejected = dict(a.rejected)
    for k, v in b.rejected.items():
        rejected[k] = rejected.get(k, 0) + v
    return LabelReport(joined=list(groups.values()), rejected=rejected)


def merge_confidence_sums(
    a: ConfidenceSums | None, b: ConfidenceSums | None
) -> ConfidenceSums | None:
    """Sums of one model's windows add up."""
    if a is None or b is None:
        return a or b
    n = max(len(a.class_prob_sums), len(b.class_prob_sums))
    return ConfidenceSums(
        rows=a.rows + b.rows,
        calibrated_max_sum=a.calibrated_max_sum + b.calibrated_max_sum,
        raw_max_sum=a.raw_max_sum + b.raw_max_sum,
        class_prob_sums=[
            (a.class_prob_sums[i] if i < len(a.class_prob_sums) else 0.0)
            + (b.class_prob_sums[i] if i < len(b.class_prob_sums) else 0.0)
            for i in range(n)
        ],
        calibrated=a.calibrated and b.calibrated,
    )


def _weighted(x: float | None, nx: int, y: float | None, ny: int) -> float | None:
    if x is None or not nx:
        return y
    if y is None or not ny:
        return x
    return (x * nx + y * ny) / (nx + ny)
