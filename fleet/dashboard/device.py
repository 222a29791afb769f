"""One device: its model history, install events with reasons, latency and battery over
time, and how its inputs drift against the rest of the fleet."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from fleet.dashboard import svg
from fleet.dashboard.cache import TtlCache
from fleet.dashboard.series import device_points
from fleet.drift.config import DriftConfig
from fleet.drift.scope import DeviceDrift, rank_devices
from fleet.errors import NotFound
from fleet.inventory import device_detail
from fleet.models import Bundle, Device, DeviceEvent, DeviceEventPublic
from fleet.settings import FleetSettings

__all__ = [
    "DRIFT_WINDOW_S",
    "EventRun",
    "HistoryEntry",
    "event_runs",
    "gather_device",
    "model_history",
]

CHART_WINDOW_S = 1800
CHART_POINTS_MAX = 600
#: how far back the device's drift is judged (every device's windows of its model version)
DRIFT_WINDOW_S = 900
HISTORY_EVENTS_MAX = 2000
#: states after which the device serves ``active_bundle_sha256``
_SETTLED = frozenset({"committed", "rolled_back", "reverted"})


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryEntry:
    """From ``at`` the device served this bundle (until the next entry)."""

    at: datetime
    bundle_sha256: str
    model_name: str | None
    model_version: int | None
    how: str  # the install state that made it active
    reason: str
    command_id: str | None
    rollout_id: str | None


def model_history(session: Session, device_id: str) -> list[HistoryEntry]:
    """Every change of the bundle the device serves, oldest first (from its status events)."""
    events = session.exec(
        select(DeviceEvent)
        .where(DeviceEvent.device_id == device_id, col(DeviceEvent.state).in_(list(_SETTLED)))
        .order_by(col(DeviceEvent.at).desc(), col(DeviceEvent.id).desc())
        .limit(HISTORY_EVENTS_MAX)
    ).all()
    shas = {e.active_bundle_sha256 for e in events if e.active_bundle_sha256}
    bundles = {
        b.sha256: b for b in session.exec(select(Bundle).where(col(Bundle.sha256).in_(list(shas))))
    }
    out: list[HistoryEntry] = []
    for e in reversed(events):
        sha = e.active_bundle_sha256
        if not sha or (out and out[-1].bundle_sha256 == sha):
            continue
        b = bundles.get(sha)
        out.append(
            HistoryEntry(
                at=e.at,
                bundle_sha256=sha,
                model_name=b.model_name if b else e.model_name,
                model_version=b.model_version if b else None,
                how=e.state,
                reason=e.reason,
                command_id=e.command_id,
                rollout_id=e.rollout_id,
            )
        )
    return out


def _drift(
    session: Session,
    cache: TtlCache,
    device: Device,
    config: DriftConfig,
    now: datetime,
) -> dict[str, Any] | None:
    name, version = device.reported_model_name, device.reported_model_version
    if name is None:
        return None

    def rank() -> list[DeviceDrift]:
        return rank_devices(
            session, name, version, window_s=DRIFT_WINDOW_S, now=now, config=config, limit=10_000
        )

    ranked: list[DeviceDrift] = cache.get(("rank", name, version), rank)
    for i, d in enumerate(ranked):
        if d.device_id == device.id:
            return {
                "entry": d,
                "rank": i + 1,
                "of": len(ranked),
                "model_name": name,
                "model_version": version,
                "window_s": DRIFT_WINDOW_S,
            }
    return {
        "entry": None,
        "rank": None,
        "of": len(ranked),
        "model_name": name,
        "model_version": version,
        "window_s": DRIFT_WINDOW_S,
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class EventRun:
    """Consecutive events of one command in one state (progress reports), shown as one row."""

    event: DeviceEventPublic
    count: int


def event_runs(events: Sequence[DeviceEventPublic]) -> list[EventRun]:
    """Pure: newest-first events with repeats of the same (command, state, reason) merged."""
    out: list[EventRun] = []
    for e in events:
        prev = out[-1].event if out else None
        if prev is not None and (prev.command_id, prev.state, prev.reason, prev.detail) == (
            e.command_id,
            e.state,
            e.reason,
            e.detail,
        ):
            out[-1] = EventRun(event=out[-1].event, count=out[-1].count + 1)
        else:
            out.append(EventRun(event=e, count=1))
    return out


def gather_device(
    session: Session,
    settings: FleetSettings,
    device_id: str,
    *,
    cache: TtlCache,
    drift_config: DriftConfig,
    now: datetime,
) -> dict[str, Any]:
    """Everything the device page shows; NotFound for an unknown id."""
    device = session.get(Device, device_id)
    if device is None:
        raise NotFound(f"device {device_id!r} is not registered")
    detail = device_detail(session, device, offline_after_s=settings.offline_after_s, now=now)
    start = now - timedelta(seconds=CHART_WINDOW_S)
    points = device_points(session, device_id, since=start, limit=CHART_POINTS_MAX)
    # a young device's data fills the chart instead of its right edge
    x_min, x_max = (points[0].t if points else start.timestamp()), now.timestamp()
    latency = svg.line_chart(
        [
            svg.Series(name="p50", points=[(p.t, p.p50_ms) for p in points]),
            svg.Series(name="p95", points=[(p.t, p.p95_ms) for p in points]),
            svg.Series(name="p99", points=[(p.t, p.p99_ms) for p in points], dashed=True),
        ],
        title=f"Latency of {device_id}, last {CHART_WINDOW_S // 60} minutes",
        y_unit="ms",
        y_min=0.0,
        x_min=x_min,
        x_max=x_max,
    )
    battery_points = [(p.t, p.battery_pct) for p in points]
    battery = svg.line_chart(
        [svg.Series(name="battery", points=battery_points)],
        title=f"Battery of {device_id}",
        y_unit="%",
        y_min=0.0,
        y_max=100.0,
        x_min=x_min,
        x_max=x_max,
        empty_text="this device reports no battery",
    )
    served = [(p.t, None if p.model_version is None else float(p.model_version)) for p in points]
    known = [v for _, v in served if v is not None]
    versions = svg.line_chart(
        [svg.Series(name="model version", points=served)],
        title=f"Model version served by {device_id} (from telemetry)",
        step=True,
        x_min=x_min,
        x_max=x_max,
        y_min=max(min(known) - 1.0, 0.0) if known else None,
        y_max=max(known) + 1.0 if known else None,
        width=1100,
        height=130,
        y_integer=True,
    )
    history = model_history(session, device_id)
    bundles = {
        b.sha256: b
        for b in session.exec(
            select(Bundle).where(
                col(Bundle.sha256).in_(
                    [s for s in (device.reported_bundle_sha256, device.desired_bundle_sha256) if s]
                )
            )
        )
    }
    return {
        "device": detail,
        "event_runs": event_runs(detail.events),
        "history": list(reversed(history)),
        "events": detail.events,
        "commands": detail.commands,
        "latency_chart": latency,
        "battery_chart": battery,
        "version_chart": versions,
        "has_battery": any(v is not None for _, v in battery_points),
        "windows": len(points),
        "drift": _drift(session, cache, device, drift_config, now),
        "bundles": bundles,
        "previous": history[-2] if len(history) >= 2 else None,
    }
