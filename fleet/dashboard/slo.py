"""Service-level status per model version: success rate, p95 latency and error-budget burn.

The same definitions as /metrics (`fleet.rollout.metric`): over the last ``slo_window_s``,
success burn = error rate / (1 - slo_success_rate); latency burn = share of inferences
slower than ``slo_latency_p95_ms`` / 5 % (the p95 objective allows 5 % to be slower).
A burn of 1 spends the error budget exactly over the SLO period; above 14.4 it spends a
30-day budget in two days (the usual fast-burn page threshold).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func
from sqlmodel import Session, col, select

from fleet.inventory import merged_latency
from fleet.models import TelemetryRecord
from fleet.settings import FleetSettings

__all__ = ["FAST_BURN", "SloStatus", "burn_level", "slo_status"]

FAST_BURN = 14.4
LATENCY_QUANTILE = 0.95
#: latency sketches merged per model version and refresh (newest windows first)
LATENCY_WINDOWS_MAX = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class SloStatus:
    model_name: str
    model_version: int | None
    window_s: float
    inferences: int
    errors: int
    success_target: float
    latency_target_ms: float
    p95_ms: float | None
    #: share of inferences slower than the latency target (from merged sketches)
    slow_share: float | None
    #: windows whose latency sketches were merged (bounded; see LATENCY_WINDOWS_MAX)
    latency_windows: int

    @property
    def success_rate(self) -> float | None:
        return 1.0 - self.errors / self.inferences if self.inferences else None

    @property
    def success_burn(self) -> float | None:
        if not self.inferences:
            return None
        return (self.errors / self.inferences) / (1.0 - self.success_target)

    @property
    def latency_burn(self) -> float | None:
        if self.slow_share is None:
            return None
        return self.slow_share / (1.0 - LATENCY_QUANTILE)

    @property
    def level(self) -> str:
        """ok, burning (budget spent faster than planned) or page (fast burn)."""
        return max(
            (burn_level(self.success_burn), burn_level(self.latency_burn)), key=_LEVELS.index
        )


_LEVELS = ["unknown", "ok", "burning", "page"]


def burn_level(burn: float | None) -> str:
    """Pure: the alert level of one burn rate."""
    if burn is None:
        return "unknown"
    if burn > FAST_BURN:
        return "page"
    return "burning" if burn > 1.0 else "ok"


def slo_status(session: Session, settings: FleetSettings, now: datetime) -> list[SloStatus]:
    """One status per model version that reported in the SLO window."""
    since = now - timedelta(seconds=settings.slo_window_s)
    totals = session.exec(
        select(
            TelemetryRecord.model_name,
            TelemetryRecord.model_version,
            func.sum(TelemetryRecord.inference_count),
            func.sum(TelemetryRecord.error_count),
        )
        .where(col(TelemetryRecord.window_end) >= since)
        .group_by(col(TelemetryRecord.model_name), col(TelemetryRecord.model_version))
    ).all()
    out = []
    for name, version, n, e in totals:
        if name is None:
            continue
        sketch, used = merged_latency(session, name, version, since, limit=LATENCY_WINDOWS_MAX)
        p95 = slow = None
        if sketch is not None:
            p95 = sketch.quantile(LATENCY_QUANTILE)
            slow = 1.0 - sketch.rank(settings.slo_latency_p95_ms)
        out.append(
            SloStatus(
                model_name=name,
                model_version=version,
                window_s=settings.slo_window_s,
                inferences=int(n or 0),
                errors=int(e or 0),
                success_target=settings.slo_success_rate,
                latency_target_ms=settings.slo_latency_p95_ms,
                p95_ms=p95,
                slow_share=slow,
                latency_windows=used,
            )
        )
    out.sort(key=lambda s: (s.model_name, s.model_version or 0))
    return out
