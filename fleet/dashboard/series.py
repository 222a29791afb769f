"""Time series for the charts, from telemetry rows' scalar columns (never their sketches).

A telemetry row carries its window's whole JSON (sketches of every input feature); charts
read only the scalar columns (counts, p50/p95/p99) and, for battery, one JSON path, so a
page refresh stays cheap. Buckets are formed here in Python over a bounded number of rows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from fleet.models import TelemetryRecord

__all__ = [
    "Bucket",
    "TelemetryPoint",
    "bucketize",
    "device_points",
    "fleet_points",
    "values",
]

#: rows read for one chart at most (newest first); older data is cut, and the page says so
MAX_ROWS = 20_000


@dataclass(frozen=True, slots=True, kw_only=True)
class TelemetryPoint:
    """One telemetry window's scalar figures."""

    t: float  # window end, epoch seconds
    device_id: str
    bundle_sha256: str | None
    model_version: int | None
    inferences: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    battery_pct: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Bucket:
    """Windows whose end falls in ``[t, t + width)``, summed."""

    t: float
    windows: int
    inferences: int
    errors: int
    #: inference-weighted mean of the windows' p95 (a summary for charts, not a fleet p95)
    p95_ms: float | None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.inferences if self.inferences else None


def _point(row: Any, battery: bool) -> TelemetryPoint:
    return TelemetryPoint(
        t=row.window_end.timestamp(),
        device_id=row.device_id,
        bundle_sha256=row.bundle_sha256,
        model_version=row.model_version,
        inferences=int(row.inference_count or 0),
        errors=int(row.error_count or 0),
        p50_ms=row.latency_p50_ms,
        p95_ms=row.latency_p95_ms,
        p99_ms=row.latency_p99_ms,
        battery_pct=float(row.battery) if battery and row.battery is not None else None,
    )


def _columns(battery: bool) -> list[Any]:
    cols: list[Any] = [
        col(TelemetryRecord.window_end),
        col(TelemetryRecord.device_id),
        col(TelemetryRecord.bundle_sha256),
        col(TelemetryRecord.model_version),
        col(TelemetryRecord.inference_count),
        col(TelemetryRecord.error_count),
        col(TelemetryRecord.latency_p50_ms),
        col(TelemetryRecord.latency_p95_ms),
        col(TelemetryRecord.latency_p99_ms),
    ]
    if battery:
        # one JSON path, extracted by the database (json_extract / ->), not the whole window
        level = col(TelemetryRecord.window)[("battery", "level_pct")]
        cols.append(level.as_float().label("battery"))
    return cols


def device_points(
    session: Session, device_id: str, *, since: datetime, limit: int = 600
) -> list[TelemetryPoint]:
    """One device's windows since ``since``, oldest first (at most ``limit``, the newest)."""
    rows = session.exec(
        select(*_columns(True))
        .where(TelemetryRecord.device_id == device_id, col(TelemetryRecord.window_end) >= since)
        .order_by(col(TelemetryRecord.window_end).desc())
        .limit(limit)
    ).all()
    return [_point(r, True) for r in reversed(rows)]


def fleet_points(
    session: Session,
    *,
    since: datetime,
    device_ids: Collection[str] | None = None,
    model_name: str | None = None,
    limit: int = MAX_ROWS,
) -> tuple[list[TelemetryPoint], bool]:
    """Windows since ``since`` (optionally of some devices or one model), oldest first;
    the flag says whether ``limit`` cut older rows."""
    q = select(*_columns(False)).where(col(TelemetryRecord.window_end) >= since)
    if device_ids is not None:
        q = q.where(col(TelemetryRecord.device_id).in_(list(device_ids)[:5000]))
    if model_name is not None:
        q = q.where(TelemetryRecord.model_name == model_name)
    rows = session.exec(q.order_by(col(TelemetryRecord.window_end).desc()).limit(limit)).all()
    return [_point(r, False) for r in reversed(rows)], len(rows) >= limit


def bucketize(
    points: Iterable[TelemetryPoint],
    *,
    start: datetime,
    end: datetime,
    width_s: float,
    keep: Callable[[TelemetryPoint], bool] | None = None,
) -> list[Bucket]:
    """Fixed-width buckets from ``start`` to ``end``; empty buckets are kept (gaps show)."""
    t0 = start.timestamp()
    n = max(1, int((end - start) / timedelta(seconds=width_s)) + 1)
    acc: dict[int, list[TelemetryPoint]] = defaultdict(list)
    for p in points:
        if keep is not None and not keep(p):
            continue
        i = int((p.t - t0) // width_s)
        if 0 <= i < n:
            acc[i].append(p)
    out = []
    for i in range(n):
        items = acc.get(i, [])
        weighted = [(p.p95_ms, max(p.inferences, 1)) for p in items if p.p95_ms is not None]
        w = sum(x for _, x in weighted)
        out.append(
            Bucket(
                t=t0 + i * width_s + width_s / 2,
                windows=len(items),
                inferences=sum(p.inferences for p in items),
                errors=sum(p.errors for p in items),
                p95_ms=sum(v * x for v, x in weighted) / w if w else None,
            )
        )
    return out


def values(buckets: Sequence[Bucket], attr: str) -> list[tuple[float, float | None]]:
    """(t, value) pairs of one bucket attribute; empty buckets give None (a gap)."""
    out: list[tuple[float, float | None]] = []
    for b in buckets:
        v = getattr(b, attr) if b.windows else None
        out.append((b.t, None if v is None else float(v)))
    return out
