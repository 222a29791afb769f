"""Shadow mode: a candidate model runs beside the served one on a sample of real inputs.

The served path only flips a coin and, for a sampled call, puts (inputs, outputs) on a
bounded queue without waiting; a background thread runs the candidate and compares. When
the queue is full the sample is skipped and counted: the application never waits for the
shadow. Per telemetry window the runner reports agreement (top-1 match rate for classifiers,
mean absolute output error) and the candidate's latency sketch.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np

from agent.errors import AgentError
from agent.model import LoadedModel
from protocol.messages import ShadowStats
from protocol.sketch import FeatureSketch

__all__ = ["ShadowRunner"]

log = logging.getLogger(__name__)

_Sample = tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]


class _Stats:
    def __init__(self) -> None:
        self.samples = 0
        self.top1_n = 0
        self.top1_match = 0
        self.abs_err_sum = 0.0
        self.abs_err_n = 0
        self.errors = 0
        self.skipped = 0
        self.latency = FeatureSketch()


class ShadowRunner:
    """Runs one shadow candidate at a time in its own thread."""

    def __init__(
        self,
        *,
        queue_max: int = 64,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._rng = rng
        self._clock = clock
        self._queue: queue.Queue[_Sample | None] = queue.Queue(maxsize=queue_max)
        self._lock = threading.Lock()
        self._model: LoadedModel | None = None
        self._rate = 0.0
        self._stats = _Stats()
        self._thread: threading.Thread | None = None

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    def set_candidate(self, model: LoadedModel | None, sample_rate: float) -> None:
        """Start shadowing ``model`` (None stops); the previous candidate is closed."""
        with self._lock:
            old, self._model = self._model, model
            self._rate = sample_rate if model is not None else 0.0
            self._stats = _Stats()
        self._drain()
        if old is not None and old is not model:
            self._queue.put(None)  # let the worker finish a run in progress before closing
            if self._thread is not None:
                self._thread.join(timeout=10.0)
                self._thread = None
            old.backend.close()
        if model is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="agent-shadow", daemon=True)
            self._thread.start()
        if model is not None:
            log.info("shadowing %s v%d at %.0f%%", model.model_name, model.model_version,
                     100 * sample_rate)  # fmt: skip

    def stop(self) -> None:
        self.set_candidate(None, 0.0)

    def offer(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Served path: maybe queue this call for the candidate; never blocks."""
        if self._model is None or self._rng() >= self._rate:
            return
        try:
            self._queue.put_nowait((inputs, outputs))
        except queue.Full:
            with self._lock:
                self._stats.skipped += 1

    def take_stats(self) -> ShadowStats | None:
        """The current window's comparison, and a fresh window (None when not shadowing)."""
        with self._lock:
            model, st = self._model, self._stats
            if model is None:
                return None
            self._stats = _Stats()
        return ShadowStats(
            bundle_sha256=model.bundle_sha256,
            samples=st.samples,
            top1_agreement=st.top1_match / st.top1_n if st.top1_n else None,
            mean_abs_error=st.abs_err_sum / st.abs_err_n if st.abs_err_n else None,
            latency_ms=st.latency.to_wire() if st.latency.count else None,
            errors=st.errors,
            skipped=st.skipped,
        )

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """Tests: True once every queued sample was processed."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
                self._queue.task_done()
            except queue.Empty:
                return

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                model = self._model
                if model is not None:
                    self._compare(model, *item)
            finally:
                self._queue.task_done()

    def _compare(
        self,
        model: LoadedModel,
        inputs: Mapping[str, np.ndarray],
        served: Mapping[str, np.ndarray],
    ) -> None:
        t0 = self._clock()
        try:
            got = model.backend.run(inputs)
        except AgentError as exc:
            log.debug("shadow inference failed: %s", exc)
            with self._lock:
                if self._model is model:
                    self._stats.errors += 1
            return
        ms = (self._clock() - t0) * 1000.0
        name = model.manifest.outputs[0].name
        a, b = served.get(name), got.get(name)
        top1: tuple[int, int] | None = None
        err: tuple[float, int] | None = None
        if a is not None and b is not None and a.shape == b.shape:
            d = np.abs(a.astype(np.float64) - b.astype(np.float64))
            err = (float(d.sum()), int(d.size))
            if a.ndim == 2 and a.shape[1] > 1:
                top1 = (int((a.argmax(axis=1) == b.argmax(axis=1)).sum()), int(a.shape[0]))
        with self._lock:
            if self._model is not model:
                return
            st = self._stats
            st.samples += 1
            st.latency.update(np.asarray([ms], dtype=np.float32))
            if err is not None:
                st.abs_err_sum += err[0]
                st.abs_err_n += err[1]
            if top1 is not None:
                st.top1_match += top1[0]
                st.top1_n += top1[1]
