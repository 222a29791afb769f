"""The Python API the device's application calls: ``InferenceService.predict``.

Model switches are safe under concurrent ``predict`` calls: each call leases the model it
started with, and a replaced model is closed only after its last in-flight call returns.
"""

from __future__ import annotations

import collections
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from agent.errors import AgentError, InferenceError, NoModelError
from agent.model import LoadedModel, check_inputs
from agent.telemetry import TelemetryRecorder

if TYPE_CHECKING:
    from agent.quality import LabelOutcome, QualityRecorder

__all__ = ["HealthStats", "InferenceService", "Observer"]

#: sees (inputs, outputs) of each served call
Observer = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], None]

_LATENCY_KEEP: Final = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthStats:
    """What the current model did since it was switched in (real traffic and probes)."""

    calls: int
    runtime_errors: int
    latencies_ms: tuple[float, ...]


class _Generation:
    """One model's tenure as the served model."""

    __slots__ = (
        "calls",
        "close_when_idle",
        "closed",
        "inflight",
        "latencies",
        "model",
        "runtime_errors",
    )

    def __init__(self, model: LoadedModel | None) -> None:
        self.model = model
        self.inflight = 0
        self.close_when_idle = False
        self.closed = False
        self.calls = 0
        self.runtime_errors = 0
        self.latencies: collections.deque[float] = collections.deque(maxlen=_LATENCY_KEEP)


class InferenceService:
    """Serves the active model to the application and records telemetry for each call."""

    def __init__(
        self,
        telemetry: TelemetryRecorder | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
        quality: QualityRecorder | None = None,
    ) -> None:
        self._telemetry = telemetry
        #: records served predictions by id so late ground truth can be joined (agent/quality)
        self.quality = quality
        self._clock = clock
        self._lock = threading.Lock()
        self._gen = _Generation(None)
        #: replaced models kept loaded for a possible revert, by id(model)
        self._kept: dict[int, _Generation] = {}
        #: sees each served call's (inputs, outputs) after it returned (the shadow runner)
        self.observer: (
            Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], None] | None
        ) = None

    # -- application API -------------------------------------------------------------------
    def predict(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run the active model on ``inputs`` (name -> array, batch first)."""
        return self._call(inputs, record=True)[1]

    def predict_with_id(self, inputs: Mapping[str, Any]) -> tuple[str, dict[str, np.ndarray]]:
        """`predict`, plus the prediction id to name when its true label is known."""
        return self._call(inputs, record=True)

    def report_label(self, prediction_id: str, label: Any) -> LabelOutcome:
        """The true label (class index or name; a list for a batch) of an earlier prediction."""
        if self.quality is None:
            from agent.quality import LabelOutcome

            return LabelOutcome.UNKNOWN
        return self.quality.report_label(prediction_id, label)

    @property
    def model(self) -> LoadedModel | None:
        """The model being served now (None before the first install)."""
        return self._gen.model

    # -- agent API -------------------------------------------------------------------------
    def probe(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """A health-check inference: counted in the health stats, not in telemetry."""
        return self._call(inputs, record=False)[1]

    def health(self) -> HealthStats:
        """Calls, runtime errors and latencies of the current model since it switched in."""
        with self._lock:
            g = self._gen
            return HealthStats(
                calls=g.calls, runtime_errors=g.runtime_errors, latencies_ms=tuple(g.latencies)
            )

    def swap(self, model: LoadedModel | None, *, keep_old: bool = False) -> LoadedModel | None:
        """Serve ``model`` from now on and return the replaced one.

        The replaced model is closed once its last in-flight call returns, unless
        ``keep_old`` (the installer keeps it loaded for a revert; see `release`).
        """
        with self._lock:
            old = self._gen
            self._gen = _Generation(model)
            if model is not None:
                self._kept.pop(id(model), None)
            if old.model is not None and old.model is not model:
                if keep_old:
                    self._kept[id(old.model)] = old
                else:
                    old.close_when_idle = True
            to_close = self._take_closable(old)
        if self._telemetry is not None:
            self._telemetry.set_model(model)
        if to_close is not None:
            to_close.backend.close()
        return old.model

    def release(self, model: LoadedModel) -> None:
        """Close a model kept by ``swap(keep_old=True)`` once it is idle."""
        with self._lock:
            gen = self._kept.pop(id(model), None)
            if gen is None:
                return
            gen.close_when_idle = True
            to_close = self._take_closable(gen)
        if to_close is not None:
            to_close.backend.close()

    def _take_closable(self, gen: _Generation) -> LoadedModel | None:
        # Caller holds the lock. Returns the model to close outside the lock, at most once.
        if gen.close_when_idle and gen.inflight == 0 and not gen.closed and gen.model is not None:
            gen.closed = True
            return gen.model
        return None

    # -- internals -------------------------------------------------------------------------
    def _call(
        self, inputs: Mapping[str, Any], *, record: bool
    ) -> tuple[str, dict[str, np.ndarray]]:
        with self._lock:
            gen = self._gen
            gen.inflight += 1
        try:
            model = gen.model
            if model is None:
                raise NoModelError("no model is installed yet; deploy a bundle to this device")
            arrays = check_inputs(model.manifest.inputs, inputs)
            t0 = self._clock()
            try:
                outputs = model.backend.run(arrays)
            except AgentError as exc:
                raise InferenceError(f"model {model.model_name} failed: {exc}") from exc
            ms = (self._clock() - t0) * 1000.0
            with self._lock:
                gen.calls += 1
                gen.latencies.append(ms)
            prediction_id = secrets.token_hex(16)  # 128 random bits, as uuid4 (cheaper)
            if record:
                if self._telemetry is not None:
                    self._telemetry.record(model, arrays, outputs, ms)
                if self.quality is not None:
                    self.quality.record(model, arrays, outputs, prediction_id)
                observer = self.observer
                if observer is not None:
                    observer(arrays, outputs)
            return prediction_id, outputs
        except InferenceError as exc:
            if exc.kind == "runtime_error":
                with self._lock:
                    gen.calls += 1
                    gen.runtime_errors += 1
            if record and self._telemetry is not None:
                self._telemetry.record_error(exc.kind)
            raise
        finally:
            with self._lock:
                gen.inflight -= 1
                to_close = self._take_closable(gen)
            if to_close is not None:
                to_close.backend.close()
