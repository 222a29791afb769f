"""One alert record for everything the fleet raises, deduplicated by (kind, model, version,
cohort), each linking its runbook under docs/runbooks/.

New kinds live in the ``fleet_alert`` table; drift alerts keep their own table (fleet.drift
writes them) and `all_alerts` shows both in this one shape, so operators read one list.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Final

from sqlmodel import Session, col, select

from fleet.models import utcnow
from fleet.quality.models import FleetAlert

__all__ = ["RUNBOOKS", "AlertKey", "all_alerts", "raise_alert", "resolve_others"]

RUNBOOKS: Final = {
    "quality_drop": "docs/runbooks/quality-drop.md",
    "quality_estimate_drop": "docs/runbooks/quality-drop.md",
    "drift": "docs/runbooks/drift.md",
    "slo_burn": "docs/runbooks/slo-burn.md",
    "rollout_halted": "docs/runbooks/rollout-halted.md",
    "device_offline": "docs/runbooks/device-offline.md",
}
#: devices named in one alert at most (the worst first); the figures say how many in all
DEVICES_NAMED_MAX: Final = 50

AlertKey = tuple[str, str, int | None, str]


def raise_alert(
    session: Session,
    *,
    kind: str,
    model_name: str,
    model_version: int | None,
    cohort: str = "fleet",
    devices: Sequence[str] = (),
    summary: str,
    figures: dict[str, Any] | None = None,
    severity: str = "warning",
    now: datetime | None = None,
) -> FleetAlert:
    """Fire, or refresh the firing alert with the same key (never a second row)."""
    now = now or utcnow()
    alert = session.exec(
        select(FleetAlert).where(
            FleetAlert.kind == kind,
            FleetAlert.model_name == model_name,
            FleetAlert.model_version == model_version,
            FleetAlert.cohort == cohort,
            FleetAlert.status == "firing",
        )
    ).first()
    if alert is None:
        alert = FleetAlert(
            kind=kind,
            model_name=model_name,
            model_version=model_version,
            cohort=cohort,
            first_seen=now,
            runbook=RUNBOOKS.get(kind, ""),
        )
    else:
        alert.fired_count += 1
    alert.devices = list(devices)[:DEVICES_NAMED_MAX]
    alert.summary = summary
    alert.figures = {**(figures or {}), "devices_total": len(devices)}
    alert.severity = severity
    alert.last_seen = now
    session.add(alert)
    return alert


def resolve_others(
    session: Session, kind: str, firing: Iterable[AlertKey], now: datetime | None = None
) -> int:
    """Resolve every firing alert of ``kind`` whose key is not in ``firing``."""
    keep = set(firing)
    n = 0
    for alert in session.exec(
        select(FleetAlert).where(FleetAlert.kind == kind, FleetAlert.status == "firing")
    ):
        if (alert.kind, alert.model_name, alert.model_version, alert.cohort) not in keep:
            alert.status, alert.resolved_at = "resolved", now or utcnow()
            session.add(alert)
            n += 1
    return n


def _record(a: FleetAlert) -> dict[str, Any]:
    return {
        "id": f"fleet-{a.id}",
        "kind": a.kind,
        "model_name": a.model_name,
        "model_version": a.model_version,
        "cohort": a.cohort,
        "status": a.status,
        "severity": a.severity,
        "devices": list(a.devices),
        "summary": a.summary,
        "figures": dict(a.figures),
        "runbook": a.runbook,
        "first_seen": a.first_seen.isoformat(),
        "last_seen": a.last_seen.isoformat(),
        "resolved_at": a.resolved_at.isoformat() if a.resolved_at else None,
    }


def _drift_records(session: Session, status: str | None, model: str | None) -> list[dict[str, Any]]:
    try:
        from fleet.drift.models import DriftAlert
    except ImportError:
        return []
    q = select(DriftAlert)
    if status is not None:
        q = q.where(DriftAlert.status == status)
    if model is not None:
        q = q.where(DriftAlert.model_name == model)
    out = []
    for d in session.exec(q.order_by(col(DriftAlert.last_seen).desc()).limit(500)):
        scope = d.scope or "fleet"
        out.append(
            {
                "id": f"drift-{d.id}",
                "kind": "drift",
                "model_name": d.model_name,
                "model_version": d.model_version,
                "cohort": scope,
                "status": d.status,
                "severity": "warning",
                "devices": [scope.split(":", 1)[1]] if scope.startswith("device:") else [],
                "summary": f"input drift in {', '.join(d.worst_features[:5]) or 'features'}"
                f" (max severity {d.max_severity:.3f})",
                "figures": {"max_severity": d.max_severity, "drifted_count": d.drifted_count},
                "runbook": RUNBOOKS["drift"],
                "first_seen": d.first_seen.isoformat(),
                "last_seen": d.last_seen.isoformat(),
                "resolved_at": d.resolved_at.isoformat() if d.resolved_at else None,
            }
        )
    return out


def all_alerts(
    session: Session, *, status: str | None = None, model: str | None = None, limit: int = 200
) -> list[dict[str, Any]]:
    """Every alert (fleet_alert and drift_alert) in one shape, newest first."""
    q = select(FleetAlert)
    if status is not None:
        q = q.where(FleetAlert.status == status)
    if model is not None:
        q = q.where(FleetAlert.model_name == model)
    rows = [_record(a) for a in session.exec(q.order_by(col(FleetAlert.last_seen).desc()))]
    rows.extend(_drift_records(session, status, model))
    rows.sort(key=lambda r: r["last_seen"], reverse=True)
    return rows[:limit]
