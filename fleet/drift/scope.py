"""Drift of each scope: the fleet (tiles), cohorts and single devices (raw windows).

- fleet: one model version's tiles over a window, against its bundle's baseline (or a
  past window of the same version).
- cohort: ``compare_cohorts`` merges the raw windows of two device lists (for rollouts:
  canary vs control) and compares them; cost ~ (windows x features) sketch reads.
- device: ``rank_devices`` compares every device's windows with the rest of the fleet
  (leave-one-out via CDF algebra, see `fleet.drift.stats.compare_to_pool`) and ranks
  devices by their worst feature's severity: finds the one broken camera.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from fleet.drift.api import DriftReport, finalize
from fleet.drift.config import DriftConfig
from fleet.drift.models import CLASSES_FEATURE, CONFIDENCE_FEATURE
from fleet.drift.stats import DriftResult, compare_histograms, compare_sketches, compare_to_pool
from fleet.drift.tiles import Bank, _Builder, read_tiles
from fleet.models import TelemetryRecord, utcnow

__all__ = ["DeviceDrift", "compare_bank", "compare_cohorts", "fleet_report", "rank_devices"]


def compare_bank(ref: Bank, cur: Bank, config: DriftConfig) -> DriftReport:
    """Inputs (one BH family) with prediction drift (confidence + classes) beside them."""
    results: list[DriftResult] = []
    for name in sorted(set(ref.inputs) | set(cur.inputs)):
        if name not in ref.sketches:
            results.append(
                DriftResult(
                    feature=name,
                    status="incompatible",
                    n_cur=cur.sketches[name].count,
                    reason="the reference has no such feature",
                )
            )
        elif name not in cur.sketches:
            results.append(
                DriftResult(
                    feature=name,
                    status="not_enough_data",
                    n_ref=ref.sketches[name].count,
                    reason="no current data for this feature",
                )
            )
        else:
            results.append(compare_sketches(name, ref.sketches[name], cur.sketches[name], config))
    report = finalize(results, config)
    prediction: list[DriftResult] = []
    if CONFIDENCE_FEATURE in ref.sketches and CONFIDENCE_FEATURE in cur.sketches:
        prediction.append(
            compare_sketches(
                "confidence",
                ref.sketches[CONFIDENCE_FEATURE],
                cur.sketches[CONFIDENCE_FEATURE],
                config,
            )
        )
    if ref.classes is not None and cur.classes is not None:
        prediction.append(
            compare_histograms("classes", ref.classes.tolist(), cur.classes.tolist(), config)
        )
    pred = finalize(prediction, config)
    report.extra.update({"windows": cur.windows, "prediction": pred.to_dict()})
    return report


def fleet_report(
    session: Session,
    ref: Bank,
    name: str,
    version: int,
    *,
    start: datetime,
    end: datetime,
    config: DriftConfig,
) -> DriftReport:
    """A model version's tiles in [start, end) against ``ref``."""
    cur = read_tiles(session, name, version, start, end)
    report = compare_bank(ref, cur, config)
    report.extra.update(
        {
            "model": name,
            "version": version,
            "start": start.isoformat(),
            "end": end.isoformat(),
            "scope": "fleet",
        }
    )
    return report


def _windows(
    session: Session,
    name: str,
    version: int | None,
    start: datetime,
    end: datetime,
    device_ids: Collection[str] | None = None,
) -> dict[str, _Builder]:
    q = select(TelemetryRecord.device_id, TelemetryRecord.window, TelemetryRecord.input_pack).where(
        TelemetryRecord.model_name == name,
        col(TelemetryRecord.window_end) >= start,
        col(TelemetryRecord.window_end) < end,
    )
    if version is not None:
        q = q.where(TelemetryRecord.model_version == version)
    wanted = set(device_ids) if device_ids is not None else None
    per_device: dict[str, _Builder] = defaultdict(_Builder)
    for device_id, window, pack in session.exec(q):
        if wanted is not None and device_id not in wanted:
            continue
        if isinstance(window, dict):
            per_device[device_id].add_window(window, pack=pack)
    return per_device


def _union(builders: Collection[_Builder]) -> Bank:
    out = _Builder()
    for b in builders:
        for feature, acc in b.accs.items():
            out.accs.setdefault(feature, type(acc)(k=acc.k)).absorb(acc)
        out.packs.packs.extend(b.packs.packs)
        out.packs.rejected += b.packs.rejected
        out.rejected += b.rejected
        if b.classes is not None:
            out.add_classes(b.classes)
        out.windows += b.windows
    return out.bank()


def compare_cohorts(
    session: Session,
    model: str,
    version: int | None,
    canary_device_ids: Collection[str],
    control_device_ids: Collection[str] | None,
    window_s: float,
    *,
    now: datetime | None = None,
    config: DriftConfig | None = None,
) -> DriftReport:
    """Canary devices' windows (reference: control devices') over the last ``window_s``.

    ``version`` None takes windows of any version (canary and control usually run different
    ones); ``control_device_ids`` None means every other device of the model.
    """
    cfg = config or DriftConfig()
    end = now or utcnow()
    start = end - timedelta(seconds=window_s)
    canary = set(canary_device_ids)
    per_device = _windows(session, model, version, start, end)
    control = (
        set(control_device_ids) if control_device_ids is not None else set(per_device) - canary
    )
    cur = _union([b for d, b in per_device.items() if d in canary])
    ref = _union([b for d, b in per_device.items() if d in control])
    report = compare_bank(ref, cur, cfg)
    report.extra.update(
        {
            "model": model,
            "version": version,
            "scope": "cohort",
            "start": start.isoformat(),
            "end": end.isoformat(),
            "canary_devices": len(canary & set(per_device)),
            "control_devices": len(control & set(per_device)),
        }
    )
    return report


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceDrift:
    device_id: str
    #: the worst feature's severity (KS distance beyond sketch error, vs the rest)
    score: float
    drifted_features: tuple[str, ...]
    worst_feature: str | None
    windows: int
    values: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "score": self.score,
            "drifted_features": list(self.drifted_features),
            "worst_feature": self.worst_feature,
            "windows": self.windows,
            "values": self.values,
        }


def rank_devices(
    session: Session,
    model: str,
    version: int | None,
    *,
    window_s: float,
    now: datetime | None = None,
    config: DriftConfig | None = None,
    limit: int = 100,
) -> list[DeviceDrift]:
    """Every device vs the rest of the fleet, most drifted first."""
    cfg = config or DriftConfig()
    end = now or utcnow()
    per_device = _windows(session, model, version, end - timedelta(seconds=window_s), end)
    banks = {d: b.bank() for d, b in per_device.items()}
    pool = _union_banks(banks.values())
    out = []
    for device_id, bank in banks.items():
        results = [
            compare_to_pool(f, s, pool.sketches[f], cfg)
            for f, s in bank.sketches.items()
            if f in pool.sketches and f != CLASSES_FEATURE
        ]
        report = finalize(results, cfg)
        tested = [r for r in report.results if r.testable]
        worst = max(tested, key=lambda r: r.severity, default=None)
        out.append(
            DeviceDrift(
                device_id=device_id,
                score=worst.severity if worst else 0.0,
                drifted_features=report.drifted,
                worst_feature=worst.feature if worst else None,
                windows=bank.windows,
                values=max((s.count for s in bank.inputs.values()), default=0),
            )
        )
    out.sort(key=lambda d: (not d.drifted_features, -d.score, d.device_id))
    return out[:limit]


def _union_banks(banks: Collection[Bank]) -> Bank:
    from fleet.drift.wire import SketchAccumulator

    accs: dict[str, SketchAccumulator] = {}
    for b in banks:
        for f, s in b.sketches.items():
            accs.setdefault(f, SketchAccumulator(k=s.k)).add_sketch(s)
    return Bank(sketches={f: a.sketch() for f, a in accs.items()})
