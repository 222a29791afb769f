"""Drift per model version: features ranked by drift, each with its reference and current
distributions as two CDF curves, the devices that drift most, and the alert history.

The figures are the ones GET /api/v1/drift reports (the same tiles, baseline and tests);
the curves are read from the same sketches at a fixed grid of points.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import func
from sqlmodel import Session, col, select

from fleet.dashboard import svg
from fleet.dashboard.cache import TtlCache
from fleet.drift.models import CLASSES_FEATURE, CONFIDENCE_FEATURE, DriftAlert, DriftTile
from fleet.drift.reference import ReferenceCache
from fleet.drift.scope import DeviceDrift, compare_bank, rank_devices
from fleet.drift.settings import DriftSettings
from fleet.drift.tiles import read_tiles
from fleet.errors import NotFound
from fleet.models import Device
from protocol.errors import SketchError
from protocol.sketch import FeatureSketch

__all__ = ["cdf_curve", "gather_drift", "gather_drift_index"]

PLOTTED_FEATURES = 12
CDF_POINTS = 64
ALERTS_LISTED = 50
DEVICES_RANKED = 10


def cdf_curve(sketch: FeatureSketch, grid: np.ndarray) -> list[tuple[float, float | None]]:
    """P(X <= x) at each grid point, read from the sketch."""
    if sketch.empty:
        return []
    try:
        cdf = sketch.cdf(grid)[: grid.size]
    except SketchError:
        return []
    return [(float(x), float(y)) for x, y in zip(grid, cdf, strict=True)]


def _grid(a: FeatureSketch, b: FeatureSketch) -> np.ndarray:
    lows = [s.min for s in (a, b) if s.min is not None]
    highs = [s.max for s in (a, b) if s.max is not None]
    lo, hi = min(lows), max(highs)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    # the sketch reads float32 split points: they must stay sorted and distinct
    return np.unique(np.linspace(lo, hi, CDF_POINTS, dtype=np.float32)).astype(np.float64)


def _plot(feature: str, ref: FeatureSketch | None, cur: FeatureSketch | None) -> Any:
    if ref is None or cur is None or ref.empty or cur.empty:
        return None
    grid = _grid(ref, cur)
    return svg.line_chart(
        [
            svg.Series(name="reference", points=cdf_curve(ref, grid), css="reference"),
            svg.Series(name="current", points=cdf_curve(cur, grid), css="current"),
        ],
        title=f"CDF of {feature}: reference vs current",
        time_axis=False,
        step=True,
        y_min=0.0,
        y_max=1.0,
        width=300,
        height=120,
    )


def gather_drift_index(session: Session) -> dict[str, Any]:
    """Model versions with drift data or devices, and their alerts."""
    tiles = session.exec(
        select(
            DriftTile.model_name, DriftTile.model_version, func.max(DriftTile.bucket_start)
        ).group_by(col(DriftTile.model_name), col(DriftTile.model_version))
    ).all()
    versions: dict[tuple[str, int], dict[str, Any]] = {
        (n, int(v)): {"model_name": n, "model_version": int(v), "last_tile": t, "devices": 0}
        for n, v, t in tiles
    }
    running = session.exec(
        select(Device.reported_model_name, Device.reported_model_version, func.count())
        .where(col(Device.reported_model_name).is_not(None))
        .group_by(col(Device.reported_model_name), col(Device.reported_model_version))
    ).all()
    for n, v, count in running:
        if v is None:
            continue
        row = versions.setdefault(
            (n, int(v)),
            {"model_name": n, "model_version": int(v), "last_tile": None, "devices": 0},
        )
        row["devices"] = int(count)
    firing = session.exec(
        select(DriftAlert.model_name, DriftAlert.model_version, func.count())
        .where(DriftAlert.status == "firing")
        .group_by(col(DriftAlert.model_name), col(DriftAlert.model_version))
    ).all()
    for n, v, count in firing:
        if (n, int(v)) in versions:
            versions[(n, int(v))]["firing"] = int(count)
    alerts = session.exec(
        select(DriftAlert).order_by(col(DriftAlert.last_seen).desc()).limit(ALERTS_LISTED)
    ).all()
    return {
        "versions": sorted(versions.values(), key=lambda r: (r["model_name"], -r["model_version"])),
        "alerts": alerts,
    }


def gather_drift(
    session: Session,
    *,
    references: ReferenceCache,
    settings: DriftSettings,
    cache: TtlCache,
    model: str,
    version: int,
    now: datetime,
) -> dict[str, Any]:
    """One model version's drift page; NotFound when the version is unknown."""
    known = (
        session.exec(
            select(func.count())
            .select_from(DriftTile)
            .where(DriftTile.model_name == model, DriftTile.model_version == version)
        ).one()
        or session.exec(
            select(func.count())
            .select_from(Device)
            .where(Device.reported_model_name == model, Device.reported_model_version == version)
        ).one()
    )
    alerts = session.exec(
        select(DriftAlert)
        .where(DriftAlert.model_name == model, DriftAlert.model_version == version)
        .order_by(col(DriftAlert.last_seen).desc())
        .limit(ALERTS_LISTED)
    ).all()
    if not known and not alerts:
        raise NotFound(f"no device runs {model} v{version} and there is no drift data for it")
    window_s = settings.report_window_s
    start = now - timedelta(seconds=window_s)
    base: dict[str, Any] = {
        "model": model,
        "version": version,
        "window_s": window_s,
        "tile_s": settings.tile_s,
        "interval_s": settings.interval_s,
        "alerts": alerts,
    }
    try:
        ref, sha = references.for_version(session, model, version)
    except NotFound as exc:
        return {**base, "problem": exc.message, "features": [], "report": None}
    cur = read_tiles(session, model, version, start, now)
    report = compare_bank(ref, cur, settings.config())
    features = [
        {
            "result": r,
            "plot": _plot(r.feature, ref.sketches.get(r.feature), cur.sketches.get(r.feature)),
        }
        for r in report.results[:PLOTTED_FEATURES]
    ]
    prediction = []
    for r in report.extra.get("prediction", {}).get("results", []):
        sketch_name = CONFIDENCE_FEATURE if r["feature"] == "confidence" else CLASSES_FEATURE
        plot = None
        if sketch_name == CONFIDENCE_FEATURE:
            plot = _plot("confidence", ref.sketches.get(sketch_name), cur.sketches.get(sketch_name))
        prediction.append({"result": r, "plot": plot})

    def rank() -> list[DeviceDrift]:
        return rank_devices(
            session, model, version, window_s=900, now=now, config=settings.config(), limit=10_000
        )

    ranked: list[DeviceDrift] = cache.get(("rank", model, version), rank)
    return {
        **base,
        "problem": None,
        "reference_sha256": sha,
        "report": report,
        "windows": cur.windows,
        "features": features,
        "more_features": report.results[PLOTTED_FEATURES:],
        "prediction": prediction,
        "ranked": ranked[:DEVICES_RANKED],
        "ranked_total": len(ranked),
    }
