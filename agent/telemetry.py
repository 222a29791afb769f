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
from protocol.features import FeatureExtractor, FeatureSpec
from protocol.messages import TelemetryWindow
from protocol.sketch import FeatureSketch, SketchBank, SketchWire

__all__ = ["FLUSH_ROWS", "ClosedWindow", "TelemetryRecorder", "feature_specs"]

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

    def input_sketches(self) -> dict[str, SketchWire]:
        out: dict[str, SketchWire] = {}
        for _, bank in self._extractors:
            out.update(bank.to_wire())
        return out


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
    input_sketches: dict[str, SketchWire]
    output_class_counts: list[int]
    confidence: SketchWire | None
    system: SystemReading
    extra: dict[str, object] = field(default_factory=dict)

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
            input_sketches=self.input_sketches,
            output_class_counts=self.output_class_counts,
            confidence=self.confidence,
            battery=self.system.battery,
            cpu_temp_c=self.system.cpu_temp_c,
            load_1m=self.system.load_1m,
            mem_rss_bytes=self.system.mem_rss_bytes,
            dropped_windows=dropped_windows,
            extra=dict(self.extra),
        )


class TelemetryRecorder:
    """Thread-safe recorder of the current window; `take_closed` hands out finished ones."""

    def __init__(
        self,
        *,
        window_s: float,
        probe: SystemProbe | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.window_s = window_s
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
        return ClosedWindow(
            start=w.start,
            end=max(now, w.start),
            bundle_sha256=m.bundle_sha256 if m else None,
            model_name=m.model_name if m else None,
            model_version=m.model_version if m else None,
            inference_count=w.count,
            error_counts=dict(w.errors),
            latency_ms=w.latency.to_wire() if w.latency.count else None,
            input_sketches=w.input_sketches() if w.count else {},
            output_class_counts=[int(c) for c in w.class_counts]
            if w.class_counts is not None
            else [],
            confidence=w.confidence.to_wire() if w.confidence and w.confidence.count else None,
            system=self.probe.read(),
        )
