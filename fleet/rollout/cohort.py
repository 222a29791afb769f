"""Cohort statistics from stored telemetry windows, and the pluggable drift/shadow readings.

The canary is the stage's devices, counting only windows they ran on the new bundle; the
control is devices of the target set still waiting for a later stage, counting only windows
on the bundle each ran when the rollout chose it (any other bundle when that is unknown),
over the same time window. In both, a window that overlaps one of the device's model loads,
or began less than ``GateConfig.warmup_s`` after it, is left out (`fleet.rollout.warmup`):
for a canary that is its switch window, up to its commit; for either cohort, an agent
restart. So are both cohorts' windows that began less than ``warmup_s`` into the bake, so
that the two still cover the same time. The control is a fixed, seeded sample (at most
``CONTROL_SAMPLE_MAX`` devices: the rollout's own order) so its cost does not grow with the
fleet.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from fleet.models import DeviceEvent, TelemetryRecord
from fleet.rollout.gate import CohortStats, ExternalReading
from fleet.rollout.spec import DEFAULT_WARMUP_S
from fleet.rollout.store import chunks
from fleet.rollout.warmup import LOAD_STATES, LoadSpan, load_spans, restart_spans, warm_windows
from protocol.errors import SketchError
from protocol.sketch import FeatureSketch, SketchWire

__all__ = [
    "CONTROL_SAMPLE_MAX",
    "CohortQuery",
    "DriftSource",
    "canary_and_control",
    "cohort_stats",
    "default_drift_source",
    "shadow_agreement",
]

log = logging.getLogger(__name__)

CONTROL_SAMPLE_MAX = 500
#: status events are read from this long before the earliest window judged (device clock),
#: on top of the warm-up: long enough to see the switch that opens a load whose commit is in
#: view (a health check lasts seconds, or ``health_timeout_s``), and a load that ended
#: earlier covers none of those windows
_LOAD_LOOKBACK = timedelta(minutes=10)


@dataclass(frozen=True, slots=True, kw_only=True)
class CohortQuery:
    """What a pluggable gate source gets: both cohorts and the time window."""

    bundle_sha256: str
    canary_device_ids: tuple[str, ...]
    control_device_ids: tuple[str, ...]
    since: datetime
    until: datetime
    #: windows that began less than this after a device's model load are not evidence
    warmup_s: float = DEFAULT_WARMUP_S
    #: control device -> the bundle it ran when the rollout chose it (its "old" version)
    control_bundles: Mapping[str, str] = field(default_factory=dict)


DriftSource = Callable[[Session, CohortQuery], ExternalReading]


def _windows(
    session: Session, device_ids: Sequence[str], since: datetime, until: datetime
) -> list[TelemetryRecord]:
    """Every window of these devices that overlaps [since, until], on any bundle."""
    out: list[TelemetryRecord] = []
    for part in chunks(list(device_ids)):
        q = select(TelemetryRecord).where(
            col(TelemetryRecord.device_id).in_(part),
            col(TelemetryRecord.window_end) >= since,
            col(TelemetryRecord.window_start) <= until,
        )
        out.extend(session.exec(q))
    return out


def _previous_ends(
    session: Session, device_ids: Sequence[str], since: datetime
) -> dict[str, datetime]:
    """Per device, the end of its last window before ``since`` (to see a restart gap)."""
    out: dict[str, datetime] = {}
    for part in chunks(list(device_ids)):
        q = (
            select(TelemetryRecord.device_id, func.max(TelemetryRecord.window_end))
            .where(
                col(TelemetryRecord.device_id).in_(part),
                col(TelemetryRecord.window_end) < since,
            )
            .group_by(col(TelemetryRecord.device_id))
        )
        for device_id, end in session.exec(q):
            if end is not None:
                out[device_id] = end
    return out


def _load_events(
    session: Session, device_ids: Sequence[str], after: datetime
) -> list[tuple[str, str, datetime]]:
    """(device, state, sent_at) of the devices' model-load status events since ``after``."""
    out: list[tuple[str, str, datetime]] = []
    for part in chunks(list(device_ids)):
        q = select(DeviceEvent.device_id, DeviceEvent.state, DeviceEvent.sent_at).where(
            col(DeviceEvent.device_id).in_(part),
            col(DeviceEvent.state).in_(sorted(LOAD_STATES)),
            col(DeviceEvent.sent_at) >= after,
        )
        out.extend((d, st, at) for d, st, at in session.exec(q))
    return out


def _load_spans(
    session: Session, rows: Sequence[TelemetryRecord], since: datetime, warmup_s: float
) -> list[LoadSpan]:
    """The model loads that may cover any of ``rows`` (every bundle of the devices)."""
    if not rows:
        return []
    device_ids = sorted({r.device_id for r in rows})
    earliest = min(r.window_start for r in rows)
    events = _load_events(
        session, device_ids, earliest - timedelta(seconds=warmup_s) - _LOAD_LOOKBACK
    )
    return load_spans(events) + restart_spans(rows, _previous_ends(session, device_ids, since))


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
    rows: Sequence[TelemetryRecord], custom_metrics: Sequence[str] = (), *, cold_windows: int = 0
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
        cold_windows=cold_windows,
    )


def _on_old_bundle(row: TelemetryRecord, query: CohortQuery) -> bool:
    if row.bundle_sha256 is None or row.bundle_sha256 == query.bundle_sha256:
        return False
    old = query.control_bundles.get(row.device_id)
    return old is None or row.bundle_sha256 == old


def _cohort(
    session: Session,
    query: CohortQuery,
    device_ids: Sequence[str],
    wanted: Callable[[TelemetryRecord], bool],
    custom_metrics: Sequence[str],
) -> tuple[CohortStats, list[TelemetryRecord]]:
    """One cohort's statistics over its warm ``wanted`` windows, and every ``wanted`` one."""
    every = _windows(session, device_ids, query.since, query.until)
    rows = [r for r in every if wanted(r)]
    spans = _load_spans(session, every, query.since, query.warmup_s)
    warm = warm_windows(rows, spans, query.warmup_s, since=query.since)
    return cohort_stats(warm, custom_metrics, cold_windows=len(rows) - len(warm)), rows


def canary_and_control(
    session: Session, query: CohortQuery, custom_metrics: Sequence[str] = ()
) -> tuple[CohortStats, CohortStats, list[TelemetryRecord]]:
    """Both cohorts' statistics over their warm windows, and every canary window on the new
    bundle (shadow agreement reads those: a cold start does not change what a model says)."""
    canary, canary_rows = _cohort(
        session,
        query,
        query.canary_device_ids,
        lambda r: r.bundle_sha256 == query.bundle_sha256,
        custom_metrics,
    )
    control, _ = _cohort(
        session,
        query,
        query.control_device_ids,
        lambda r: _on_old_bundle(r, query),
        custom_metrics,
    )
    return canary, control, canary_rows


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
