"""A synthetic application for demos and tests: feeds samples from an .npz at a steady rate."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from agent.errors import ConfigError, InferenceError
from agent.inference import InferenceService

__all__ = ["SyntheticWorkload"]

log = logging.getLogger(__name__)


class SyntheticWorkload:
    """Calls ``service.predict`` with one sample at a time, ``rate_hz`` times a second.

    Stands in for the device's application: every call is a real inference, with real
    telemetry. Samples go to the model's first input, in order, wrapping around.
    """

    def __init__(
        self,
        service: InferenceService,
        path: Path,
        *,
        rate_hz: float,
        key: str = "input",
        label_key: str = "label",
        label_fraction: float = 0.0,
        seed: int = 0,
    ) -> None:
        if rate_hz <= 0:
            raise ConfigError(f"--rate must be positive; got {rate_hz}")
        if not 0.0 <= label_fraction <= 1.0:
            raise ConfigError(f"--label-fraction must be in [0, 1]; got {label_fraction}")
        self.labels: np.ndarray | None = None
        try:
            with np.load(path, allow_pickle=False) as npz:
                if key not in npz.files:
                    raise ConfigError(f"--workload {path} has no key {key!r}; keys: {npz.files}")
                self.samples = np.asarray(npz[key])
                if label_fraction > 0:
                    if label_key not in npz.files:
                        raise ConfigError(
                            f"--label-fraction needs key {label_key!r} in {path}; keys: {npz.files}"
                        )
                    self.labels = np.asarray(npz[label_key])
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--workload {path}: {exc}") from exc
        if self.samples.ndim < 1 or len(self.samples) == 0:
            raise ConfigError(f"--workload {path}: key {key!r} holds no samples")
        self.service = service
        self.label_fraction = label_fraction
        # The application learns the truth for some predictions (an operator's correction,
        # a downstream confirmation) and reports it through the agent, as a real one would.
        self._rng = np.random.default_rng(seed)
        self.period_s = 1.0 / rate_hz
        self.calls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="workload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        i = 0
        next_t = time.monotonic()
        while not self._stop.is_set():
            model = self.service.model
            if model is not None:
                name = model.manifest.inputs[0].name
                index = i % len(self.samples)
                sample = self.samples[index][None]
                i += 1
                try:
                    if self.labels is not None and self._rng.random() < self.label_fraction:
                        prediction_id, _ = self.service.predict_with_id({name: sample})
                        self.service.report_label(prediction_id, int(self.labels[index]))
                    else:
                        self.service.predict({name: sample})
                except InferenceError as exc:
                    log.debug("workload inference failed: %s", exc)
                self.calls += 1
            next_t += self.period_s
            delay = next_t - time.monotonic()
            if delay < -1.0:
                next_t = time.monotonic()  # fell far behind (suspend, slow model): resync
            self._stop.wait(max(0.0, delay))
