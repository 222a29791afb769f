"""The fleet overview: devices online/offline by profile and group/tag, model versions in
service, SLO status with error-budget burn, and the fleet's traffic over the last hour."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session

from fleet.dashboard import svg
from fleet.dashboard.series import bucketize, fleet_points, values
from fleet.dashboard.slo import slo_status
from fleet.inventory import list_devices
from fleet.models import DevicePublic
from fleet.settings import FleetSettings

__all__ = ["Presence", "gather_overview"]

#: devices listed on the overview at most (the counts cover every device)
DEVICES_LISTED = 500
TRAFFIC_WINDOW_S = 3600
TRAFFIC_BUCKETS = 60


@dataclass(slots=True)
class Presence:
    """Online and offline devices of one profile, group or tag."""

    name: str
    online: int = 0
    offline: int = 0

    @property
    def total(self) -> int:
        return self.online + self.offline

    def bar(self) -> Any:
        return svg.stacked_bar(
            [
                svg.Segment(label="online", value=self.online, css="ok"),
                svg.Segment(label="offline", value=self.offline, css="off"),
            ],
            label=f"{self.name}: {self.online} online, {self.offline} offline",
            width=160,
        )


def _presence(devices: list[DevicePublic]) -> dict[str, list[Presence]]:
    groups: dict[str, dict[str, Presence]] = {
        "profile": {},
        "group": {},
        "tag": {},
    }

    def count(kind: str, name: str, online: bool) -> None:
        row = groups[kind].setdefault(name, Presence(name=name))
        if online:
            row.online += 1
        else:
            row.offline += 1

    for d in devices:
        count("profile", d.profile or "(unknown)", d.online)
        for g in d.groups or []:
            count("group", g, d.online)
        for t in d.tags or []:
            count("tag", t, d.online)
    return {k: sorted(v.values(), key=lambda p: p.name) for k, v in groups.items()}


def _versions(devices: list[DevicePublic]) -> list[dict[str, Any]]:
    by: dict[tuple[str, int | None, str | None], Counter[str]] = defaultdict(Counter)
    for d in devices:
        if d.reported_bundle_sha256 is None and d.model_name is None:
            continue
        key = (d.model_name or "(unknown)", d.model_version, d.reported_bundle_sha256)
        by[key]["online" if d.online else "offline"] += 1
        by[key]["inferences"] += d.inference_count
    rows = [
        {
            "model_name": name,
            "model_version": version,
            "bundle_sha256": sha,
            "online": c["online"],
            "offline": c["offline"],
            "devices": c["online"] + c["offline"],
            "inferences": c["inferences"],
        }
        for (name, version, sha), c in by.items()
    ]
    rows.sort(key=lambda r: (r["model_name"], -(r["model_version"] or 0)))
    return rows


def gather_overview(session: Session, settings: FleetSettings, now: datetime) -> dict[str, Any]:
    """Everything the overview page shows."""
    devices = list_devices(session, offline_after_s=settings.offline_after_s, limit=10_000, now=now)
    online = sum(d.online for d in devices)
    start = now - timedelta(seconds=TRAFFIC_WINDOW_S)
    points, cut = fleet_points(session, since=start)
    width = TRAFFIC_WINDOW_S / TRAFFIC_BUCKETS
    buckets = bucketize(points, start=start, end=now, width_s=width)
    per_s = [(t, None if v is None else v / width) for t, v in values(buckets, "inferences")]
    traffic = svg.line_chart(
        [svg.Series(name="inferences/s", points=per_s)],
        title="Fleet inferences per second, last hour",
        y_unit="inf/s",
        y_min=0.0,
    )
    latency = svg.line_chart(
        [svg.Series(name="p95", points=values(buckets, "p95_ms"))],
        title="Fleet p95 latency (inference-weighted mean of window p95s), last hour",
        y_unit="ms",
        y_min=0.0,
        thresholds=[(settings.slo_latency_p95_ms, f"SLO {settings.slo_latency_p95_ms:g} ms")],
    )
    errors = svg.sparkline(
        [b.error_rate for b in buckets], label="fleet error rate over the last hour"
    )
    return {
        "now": now,
        "total": len(devices),
        "online": online,
        "offline": len(devices) - online,
        "presence": _presence(devices),
        "versions": _versions(devices),
        "slo": slo_status(session, settings, now),
        "devices": devices[:DEVICES_LISTED],
        "devices_cut": len(devices) > DEVICES_LISTED,
        "traffic_chart": traffic,
        "latency_chart": latency,
        "error_spark": errors,
        "traffic_cut": cut,
        "mismatched": sum(d.state_mismatch for d in devices),
    }
