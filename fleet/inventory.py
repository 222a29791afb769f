"""The device inventory as the API shows it: registry rows joined with telemetry roll-ups."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from fleet.models import (
    Command,
    CommandPublic,
    Device,
    DeviceDetail,
    DeviceEvent,
    DeviceEventPublic,
    DevicePublic,
    TelemetryRecord,
    utcnow,
)
from protocol.errors import SketchError
from protocol.sketch import FeatureSketch, SketchWire

__all__ = ["device_detail", "is_online", "list_devices", "merged_latency"]

RECENT_EVENTS = 50
RECENT_COMMANDS = 20


def is_online(device: Device, *, now: datetime, offline_after_s: float) -> bool:
    """Online: its last presence/heartbeat said so and it was heard from recently."""
    if not device.online or device.last_seen is None:
        return False
    return now - device.last_seen <= timedelta(seconds=offline_after_s)


def _rollups(session: Session, ids: list[str]) -> tuple[dict[str, int], dict[str, float]]:
    """Per device: total inferences, and p95 latency of its latest window with latency."""
    if not ids:
        return {}, {}
    totals = {
        device_id: int(total or 0)
        for device_id, total in session.exec(
            select(TelemetryRecord.device_id, func.sum(TelemetryRecord.inference_count))
            .where(col(TelemetryRecord.device_id).in_(ids))
            .group_by(col(TelemetryRecord.device_id))
        )
    }
    ranked = (
        select(
            col(TelemetryRecord.device_id).label("device_id"),
            col(TelemetryRecord.latency_p95_ms).label("p95"),
            func.row_number()
            .over(
                partition_by=col(TelemetryRecord.device_id),
                order_by=(col(TelemetryRecord.window_end).desc(), col(TelemetryRecord.seq).desc()),
            )
            .label("rn"),
        )
        .where(col(TelemetryRecord.device_id).in_(ids))
        .where(col(TelemetryRecord.latency_p95_ms).is_not(None))
        .subquery()
    )
    latest = {
        device_id: float(p95)
        for device_id, p95 in session.exec(
            select(ranked.c.device_id, ranked.c.p95).where(ranked.c.rn == 1)
        )
    }
    return totals, latest


def _public(
    device: Device, *, now: datetime, offline_after_s: float, inferences: int, p95: float | None
) -> DevicePublic:
    return DevicePublic(
        id=device.id,
        profile=device.profile,
        tags=list(device.tags or []),
        groups=list(device.groups or []),
        registered_at=device.registered_at,
        auto_registered=device.auto_registered,
        last_seen=device.last_seen,
        online=is_online(device, now=now, offline_after_s=offline_after_s),
        agent_version=device.agent_version,
        reported_bundle_sha256=device.reported_bundle_sha256,
        model_name=device.reported_model_name,
        model_version=device.reported_model_version,
        desired_bundle_sha256=device.desired_bundle_sha256,
        inference_count=inferences,
        latency_p95_ms=p95,
        state_mismatch=device.desired_bundle_sha256 is not None
        and device.desired_bundle_sha256 != device.reported_bundle_sha256,
    )


def list_devices(
    session: Session,
    *,
    offline_after_s: float,
    profile: str | None = None,
    limit: int = 1000,
    offset: int = 0,
    now: datetime | None = None,
) -> list[DevicePublic]:
    """Devices ordered by id, with inference totals and latest p95 latency."""
    now = now or utcnow()
    query = select(Device).order_by(col(Device.id)).offset(offset).limit(limit)
    if profile is not None:
        query = query.where(Device.profile == profile)
    devices = list(session.exec(query))
    totals, p95s = _rollups(session, [d.id for d in devices])
    return [
        _public(
            d,
            now=now,
            offline_after_s=offline_after_s,
            inferences=totals.get(d.id, 0),
            p95=p95s.get(d.id),
        )
        for d in devices
    ]


def device_detail(
    session: Session, device: Device, *, offline_after_s: float, now: datetime | None = None
) -> DeviceDetail:
    """One device with its recent status events and commands (newest first)."""
    now = now or utcnow()
    totals, p95s = _rollups(session, [device.id])
    base = _public(
        device,
        now=now,
        offline_after_s=offline_after_s,
        inferences=totals.get(device.id, 0),
        p95=p95s.get(device.id),
    )
    events = session.exec(
        select(DeviceEvent)
        .where(DeviceEvent.device_id == device.id)
        .order_by(col(DeviceEvent.at).desc(), col(DeviceEvent.id).desc())
        .limit(RECENT_EVENTS)
    )
    commands = session.exec(
        select(Command)
        .where(Command.device_id == device.id)
        .order_by(col(Command.sent_at).desc())
        .limit(RECENT_COMMANDS)
    )
    return DeviceDetail(
        **base.model_dump(),
        events=[DeviceEventPublic.model_validate(e, from_attributes=True) for e in events],
        commands=[CommandPublic.model_validate(c, from_attributes=True) for c in commands],
    )


def merged_latency(
    session: Session, name: str, version: int | None, since: Any, *, limit: int
) -> tuple[FeatureSketch | None, int]:
    """Merge the newest ``limit`` latency sketches of one model version since ``since``.

    Returns the merged sketch (None when there is none) and how many windows went into it;
    a device's malformed sketch is skipped, never allowed to hide the others.
    """
    rows = session.exec(
        select(TelemetryRecord.window)
        .where(
            TelemetryRecord.model_name == name,
            TelemetryRecord.model_version == version,
            col(TelemetryRecord.window_end) >= since,
            col(TelemetryRecord.latency_count) > 0,
        )
        .order_by(col(TelemetryRecord.window_end).desc())
        .limit(limit)
    ).all()
    merged: FeatureSketch | None = None
    used = 0
    for window in rows:
        wire = (window or {}).get("latency_ms")
        if not wire:
            continue
        try:
            sketch = FeatureSketch.from_wire(SketchWire.model_validate(wire))
        except (SketchError, ValueError):
            continue
        if sketch.empty:
            continue
        if merged is None:
            merged = sketch
        else:
            merged.merge(sketch)
        used += 1
    return merged, used
