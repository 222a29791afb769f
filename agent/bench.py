"""``edgefleet agent bench``: the active model measured on this device, written to bench.json.

Runs in its own process beside the agent (it only reads the slots), so the figures include
this device's runtime, threads and thermal state. The running agent reads ``bench.json``
and reports it in its heartbeats.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from agent.errors import NoModelError, StateError
from agent.fsio import atomic_write
from agent.model import load_model
from agent.state import StateDir
from agent.system import SystemProbe
from hardware_profiles import HardwareProfile
from protocol.messages import BenchResult

__all__ = ["run_bench"]


def _inputs(model_dir: Path, manifest: object, batch: int) -> dict[str, np.ndarray]:
    m = manifest
    golden = getattr(m, "golden", None)
    out: dict[str, np.ndarray] = {}
    if golden is not None:
        try:
            with np.load(model_dir / golden.path, allow_pickle=False) as npz:
                for s in m.inputs:  # type: ignore[attr-defined]
                    x = npz[f"in:{s.name}"]
                    reps = -(-batch // len(x))
                    out[s.name] = np.concatenate([x] * reps)[:batch]
            return out
        except (OSError, KeyError, ValueError):
            out = {}
    for s in m.inputs:  # type: ignore[attr-defined]
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in s.shape[1:]]
        out[s.name] = np.random.default_rng(0).random([batch, *dims]).astype(s.dtype)
    return out


def run_bench(
    state_dir: Path,
    *,
    device_id: str,
    profile: HardwareProfile,
    runs: int = 200,
    warmup: int = 20,
    batch: int = 1,
) -> BenchResult:
    """Load the active slot's model, time ``runs`` inferences, save and return the result."""
    if runs < 1 or batch < 1 or warmup < 0:
        raise StateError("runs and batch must be >= 1, warmup >= 0")
    state = StateDir.open(Path(state_dir), device_id=device_id, trust_root=None)
    active = state.read_active().active
    if active is None:
        raise NoModelError("no model is installed on this device; nothing to benchmark")
    t0 = time.perf_counter()
    model = load_model(
        state.slots.path(active.slot),
        state.slots.manifest(active.slot),
        active.bundle_sha256,
        profile,
    )
    load_ms = (time.perf_counter() - t0) * 1000.0
    try:
        x = _inputs(model.directory, model.manifest, batch)
        for _ in range(warmup):
            model.backend.run(x)
        lat = np.empty(runs)
        start = time.perf_counter()
        for i in range(runs):
            t = time.perf_counter()
            model.backend.run(x)
            lat[i] = (time.perf_counter() - t) * 1000.0
        total_s = time.perf_counter() - start
        result = BenchResult(
            bundle_sha256=active.bundle_sha256,
            measured_at=datetime.now(UTC),
            backend=model.backend.description,
            batch=batch,
            runs=runs,
            latency_p50_ms=float(np.percentile(lat, 50)),
            latency_p90_ms=float(np.percentile(lat, 90)),
            latency_p99_ms=float(np.percentile(lat, 99)),
            throughput_per_s=runs * batch / total_s,
            mem_rss_bytes=SystemProbe().mem_rss_bytes(),
            load_ms=load_ms,
        )
    finally:
        model.backend.close()
    atomic_write(state.bench_path, result.model_dump_json(indent=1).encode())
    return result
