"""Cohort statistics from stored telemetry windows, and the pluggable drift/shadow readings.

The canary is the stage's devices, counting only windows they ran on the new bundle; the
control is devices of the target set still waiting for a later stage, on any other bundle,
over the same time window. The control is a fixed, seeded sample (at most
``CONTROL_SAMPLE_MAX`` devices: the rollout's own order) so its cost does not grow with the
fleet.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from fleet.models import TelemetryRecord
from fleet.rollout.gate import CohortStats, ExternalReading
from fleet.rollout.store import chunks
from protocol.errors import SketchError
from protocol.sketch import FeatureSketch, SketchWire

__all__ = [
    "CONTROL_SAMPLE_MAX",
    "CohortQuery",
    "DriftSource",
    "cohort_stats",
    "default_drift_source",
    "shadow_agreement",
]

log = logging.getLogger(__name__)

CONTROL_SAMPLE_MAX = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class CohortQuery:
    """What a pluggable gate source gets: both cohorts and the time window."""

    bundle_sha256: str
    canary_device_ids: tuple[str, ...]
    control_device_ids: tuple[str, ...]
    since: datetime
    until: datetime


DriftSource = Callable[[Session, CohortQuery], ExternalReading]


def _windows(
    session: Session,
    device_ids: Sequence[str],
    since: datetime,
    until: datetime,
    *,
    bundle: str,
    on_bundle: bool,
) -> list[TelemetryRecord]:
    out: list[TelemetryRecord] = []
    for part in chunks(list(device_ids)):
        q = select(TelemetryRecord).where(
            col(TelemetryRecord.device_id).in_(part),
            col(TelemetryRecord.window_end) >= since,
            col(TelemetryRecord.window_start) <= until,
        )
        if on_bundle:
            q = q.where(TelemetryRecord.bundle_sha256 == bundle)
        else:
            q = q.where(
                col(TelemetryRecord.bundle_sha256).is_not(None),
                col(TelemetryRecord.bundle_sha256) != bundle,
            )
        out.extend(session.exec(q))
    return out


def _path(window: dict[str, Any], metric: str) -> float | None:
    value: Any = window
    for part in metric.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _battery_drain(rows: Sequence[TelemetryRecord]) -> float | None:
    """Mean over devices of %/h lost while discharging (devices with >= 2 readings)."""
    per_device: dict[str, list[tuple[datetime, float]]] = {}
    for r in rows:
        battery = r.window.get("battery") or {}
        level = battery.get("level_pct")
        if level is None or battery.get("charging"):
            continue
        per_device.setdefault(r.device_id, []).append((r.window_end, float(level)))
    rates = []
    for readings in per_device.values():
        if len(readings) < 2:
            continue
        readings.sort()
        hours = (readings[-1][0] - readings[0][0]).total_seconds() / 3600.0
        if hours > 0:
            rates.append(max(0.0, readings[0][1] - readings[-1][1]) / hours)
    return sum(rates) / len(rates) if rates else None


def cohort_stats(
    rows: Sequence[TelemetryRecord], custom_metrics: Sequence[str] = ()
) -> CohortStats:
    """Aggregate telemetry windows: totals, merged latency p95, battery drain, custom means."""
    latency: FeatureSketch | None = None
    per_metric: dict[str, dict[str, list[float]]] = {m: {} for m in custom_metrics}
    for r in rows:
        wire = r.window.get("latency_ms")
        if wire and wire.get("count"):
            try:
                sketch = FeatureSketch.from_wire(SketchWire.model_validate(wire))
            except (SketchError, ValueError):
                sketch = None
            if sketch is not None:
                if latency is None:
                    latency = sketch
                else:
                    latency.merge(sketch)
        for metric in custom_metrics:
            v = _path(r.window, metric)
            if v is not None:
                per_metric[metric].setdefault(r.device_id, []).append(v)
    custom = {}
    for metric, by_dev in per_metric.items():
        means = [sum(v) / len(v) for v in by_dev.values() if v]
        if means:
            custom[metric] = sum(means) / len(means)
    return CohortStats(
        devices=len({r.device_id for r in rows}),
        inferences=sum(r.inference_count for r in rows),
        errors=sum(r.error_count for r in rows),
        latency_p95_ms=(
            latency.quantile(0.95) if latency is not None and not latency.empty else None
        ),
        battery_drain_pct_per_h=_battery_drain(rows),
        custom=custom,
    )


def canary_and_control(
    session: Session, query: CohortQuery, custom_metrics: Sequence[str] = ()
) -> tuple[CohortStats, CohortStats, list[TelemetryRecord]]:
    canary_rows = _windows(
        session,
        query.canary_device_ids,
        query.since,
        query.until,
        bundle=query.bundle_sha256,
        on_bundle=True,
    )
    control_rows = _windows(
        session,
        query.control_device_ids,
        query.since,
        query.until,
        bundle=query.bundle_sha256,
        on_bundle=False,
    )
    return (
        cohort_stats(canary_rows, custom_metrics),
        cohort_stats(control_rows, custom_metrics),
        canary_rows,
    )


def shadow_agreement(canary_rows: Sequence[TelemetryRecord]) -> ExternalReading:
    """Sample-weighted top-1 agreement of shadow runs the canary reported (``window.shadow``)."""
    samples = agreed = 0.0
    for r in canary_rows:
        shadow = r.window.get("shadow") or {}
        n, agreement = shadow.get("samples") or 0, shadow.get("top1_agreement")
        if n and agreement is not None:
            samples += n
            agreed += n * float(agreement)
    if not samples:
        return ExternalReading(detail="no shadow comparisons in the canary's telemetry")
    value = agreed / samples
    return ExternalReading(
        value=value, available=True, detail=f"{value:.3f} top-1 agreement on {int(samples)} samples"
    )


def default_drift_source(session: Session, query: CohortQuery) -> ExternalReading:
    """Ask `fleet.drift.api.compare_cohorts` when it exists; otherwise "not available"."""
    try:
        module = importlib.import_module("fleet.drift.api")
    except ImportError:
        return ExternalReading(detail="fleet.drift is not installed; drift gate not available")
    compare = getattr(module, "compare_cohorts", None)
    if compare is None:
        return ExternalReading(detail="fleet.drift.api has no compare_cohorts; not available")
    try:
        result = compare(
            session,
            bundle_sha256=query.bundle_sha256,
            canary_device_ids=list(query.canary_device_ids),
            control_device_ids=list(query.control_device_ids),
            since=query.since,
            until=query.until,
        )
    except Exception as exc:  # a foreign module: never let it stop a rollout
        log.warning("drift comparison failed: %s", exc)
        return ExternalReading(detail=f"drift comparison failed: {type(exc).__name__}: {exc}")
    score = result if isinstance(result, int | float) else None
    detail = ""
    if score is None and isinstance(result, dict):
        score, detail = result.get("score"), str(result.get("detail", ""))
    elif score is None:
        score, detail = getattr(result, "score", None), str(getattr(result, "detail", ""))
    if score is None:
        return ExternalReading(detail=detail or "drift comparison gave no score")
    return ExternalReading(value=float(score), available=True, detail=detail or f"score {score}")
