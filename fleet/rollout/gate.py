"""Pure gate evaluation: a stage's canary cohort against a control cohort on the old version.

Every gate yields a `GateResult` with its figures, whatever the verdict, so each decision can
be recorded and explained. A gate whose data is missing never blocks: it reports
``not_available`` (no such data, e.g. no batteries) or ``no_control`` (nothing to compare).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from fleet.rollout.spec import GateConfig

__all__ = [
    "CohortStats",
    "ExternalReading",
    "GateResult",
    "GateStatus",
    "GateVerdict",
    "InstallCounts",
    "QualityReading",
    "evaluate_gates",
    "quality_gate",
]

#: defaults of the quality gate while GateConfig has no fields for it
DEFAULT_MAX_ACCURACY_DROP = 0.05
DEFAULT_MIN_QUALITY_SAMPLES = 200


class GateStatus(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    NOT_AVAILABLE = "not_available"
    NO_CONTROL = "no_control"
    OFF = "off"


@dataclass(frozen=True, slots=True, kw_only=True)
class CohortStats:
    """What a cohort's telemetry says over one window of time."""

    devices: int = 0
    inferences: int = 0
    errors: int = 0
    latency_p95_ms: float | None = None
    #: mean over devices of battery level lost per hour while discharging
    battery_drain_pct_per_h: float | None = None
    #: custom metric -> mean over devices of the per-device mean
    custom: Mapping[str, float] = field(default_factory=dict)
    #: windows left out as warm-up: over or just after a model load (cold starts), or in the
    #: bake's first ``warmup_s`` (fleet.rollout.warmup)
    cold_windows: int = 0

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.inferences if self.inferences else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["custom"] = dict(self.custom)
        d["error_rate"] = self.error_rate
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CohortStats:
        return cls(
            devices=int(d.get("devices", 0)),
            inferences=int(d.get("inferences", 0)),
            errors=int(d.get("errors", 0)),
            latency_p95_ms=d.get("latency_p95_ms"),
            battery_drain_pct_per_h=d.get("battery_drain_pct_per_h"),
            custom=dict(d.get("custom") or {}),
            cold_windows=int(d.get("cold_windows", 0)),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ExternalReading:
    """A figure from a pluggable source (drift, shadow agreement); ``value`` None = no data."""

    value: float | None = None
    available: bool = False
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class QualityReading:
    """Canary vs control accuracy from ground truth (labels) and from calibrated confidence."""

    canary_labels: int = 0
    canary_accuracy: float | None = None
    control_labels: int = 0
    control_accuracy: float | None = None
    canary_rows: int = 0
    canary_estimate: float | None = None
    control_rows: int = 0
    control_estimate: float | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class InstallCounts:
    stage_devices: int
    committed: int
    failed: int

    @property
    def settled(self) -> int:
        return self.committed + self.failed


@dataclass(frozen=True, slots=True, kw_only=True)
class GateResult:
    name: str
    status: GateStatus
    canary: float | None = None
    control: float | None = None
    limit: float | None = None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status.value}


@dataclass(frozen=True, slots=True, kw_only=True)
class GateVerdict:
    #: the minimum sample was reached (else the results are not judged)
    sample_ok: bool
    sample_detail: str
    results: tuple[GateResult, ...]

    @property
    def failed(self) -> tuple[GateResult, ...]:
        return tuple(r for r in self.results if r.status is GateStatus.FAIL)

    @property
    def passed(self) -> bool:
        return self.sample_ok and not self.failed


def _ratio_gate(
    name: str, canary: float | None, control: float | None, limit: float | None, unit: str
) -> GateResult:
    if limit is None:
        return GateResult(name=name, status=GateStatus.OFF)
    if canary is None:
        return GateResult(name=name, status=GateStatus.NOT_AVAILABLE, detail=f"no canary {unit}")
    if control is None or control <= 0:
        return GateResult(
            name=name, status=GateStatus.NO_CONTROL, canary=canary, limit=limit,
            detail=f"no control {unit} to compare with",
        )  # fmt: skip
    ratio = canary / control
    ok = ratio <= limit
    return GateResult(
        name=name,
        status=GateStatus.PASS if ok else GateStatus.FAIL,
        canary=canary,
        control=control,
        limit=limit,
        detail=f"{unit} ratio {ratio:.3f} {'<=' if ok else '>'} {limit:g}",
    )


def _custom_gate(
    name: str,
    canary: float | None,
    control: float | None,
    *,
    max_ratio: float | None,
    max_increase: float | None,
    max_value: float | None,
) -> GateResult:
    if canary is None:
        return GateResult(name=name, status=GateStatus.NOT_AVAILABLE, detail="no canary data")
    problems, checks = [], []
    if max_value is not None:
        checks.append(f"value {canary:g} vs max {max_value:g}")
        if canary > max_value:
            problems.append(f"{canary:g} > max_value {max_value:g}")
    if control is not None:
        if max_ratio is not None and control > 0:
            checks.append(f"ratio {canary / control:.3f} vs {max_ratio:g}")
            if canary / control > max_ratio:
                problems.append(f"ratio {canary / control:.3f} > {max_ratio:g}")
        if max_increase is not None:
            checks.append(f"increase {canary - control:g} vs {max_increase:g}")
            if canary - control > max_increase:
                problems.append(f"increase {canary - control:g} > {max_increase:g}")
    if not checks:
        return GateResult(
            name=name, status=GateStatus.NO_CONTROL, canary=canary, detail="no control data"
        )
    return GateResult(
        name=name,
        status=GateStatus.FAIL if problems else GateStatus.PASS,
        canary=canary,
        control=control,
        limit=max_value if max_value is not None else (max_ratio or max_increase),
        detail="; ".join(problems or checks),
    )


def quality_gate(
    reading: QualityReading | None,
    *,
    max_drop: float | None = DEFAULT_MAX_ACCURACY_DROP,
    min_samples: int = DEFAULT_MIN_QUALITY_SAMPLES,
) -> GateResult:
    """Fail when the canary's accuracy is below the control's by more than ``max_drop``.

    Labeled accuracy is judged when both cohorts have ``min_samples`` labels; otherwise the
    label-free estimate (mean calibrated top-1 probability) when both have ``min_samples``
    predictions. Neither: not available (never blocks).
    """
    name = "accuracy_drop"
    if max_drop is None:
        return GateResult(name=name, status=GateStatus.OFF)
    if reading is None:
        return GateResult(name=name, status=GateStatus.NOT_AVAILABLE, detail="no quality data")
    r = reading
    for what, can, ctl, n_can, n_ctl, unit in (
        ("labeled", r.canary_accuracy, r.control_accuracy, r.canary_labels, r.control_labels,
         "labels"),
        ("estimated", r.canary_estimate, r.control_estimate, r.canary_rows, r.control_rows,
         "predictions"),
    ):  # fmt: skip
        if can is None or n_can < min_samples:
            continue
        if ctl is None or n_ctl < min_samples:
            return GateResult(
                name=name, status=GateStatus.NO_CONTROL, canary=can, limit=max_drop,
                detail=f"{what} canary {can:.4f} on {n_can} {unit}; control has {n_ctl}",
            )  # fmt: skip
        drop = ctl - can
        ok = drop <= max_drop
        return GateResult(
            name=name,
            status=GateStatus.PASS if ok else GateStatus.FAIL,
            canary=can,
            control=ctl,
            limit=max_drop,
            detail=f"{what} accuracy canary {can:.4f} ({n_can} {unit}) vs control {ctl:.4f} "
            f"({n_ctl} {unit}): drop {drop:+.4f} {'<=' if ok else '>'} {max_drop:g}",
        )
    return GateResult(
        name=name,
        status=GateStatus.NOT_AVAILABLE,
        detail=r.detail
        or f"below the minimum sample ({min_samples} labels or predictions in the canary)",
    )


def evaluate_gates(
    config: GateConfig,
    *,
    install: InstallCounts,
    canary: CohortStats,
    control: CohortStats | None,
    drift: ExternalReading | None = None,
    shadow: ExternalReading | None = None,
    shadow_stage: bool = False,
    quality: QualityReading | None = None,
) -> GateVerdict:
    """Judge one stage. ``control`` None means no control cohort exists (the last stage)."""
    ctl = control or CohortStats()
    results: list[GateResult] = []

    # install failures: the stage's own devices, no control needed
    if config.max_install_failure_rate is None:
        results.append(GateResult(name="install_failure_rate", status=GateStatus.OFF))
    elif install.settled == 0:
        results.append(
            GateResult(
                name="install_failure_rate", status=GateStatus.NOT_AVAILABLE,
                detail="no settled installs",
            )
        )  # fmt: skip
    else:
        rate = install.failed / install.settled
        ok = rate <= config.max_install_failure_rate
        results.append(
            GateResult(
                name="install_failure_rate",
                status=GateStatus.PASS if ok else GateStatus.FAIL,
                canary=rate,
                limit=config.max_install_failure_rate,
                detail=f"{install.failed} of {install.settled} installs failed",
            )
        )

    # error rate: absolute increase over control
    if config.max_error_rate_increase is None:
        results.append(GateResult(name="error_rate", status=GateStatus.OFF))
    elif canary.error_rate is None:
        results.append(
            GateResult(name="error_rate", status=GateStatus.NOT_AVAILABLE, detail="no inferences")
        )
    else:
        base = ctl.error_rate
        if base is None:
            # no control: judge against zero errors plus the allowed increase
            base_txt, base = "no control (0 assumed)", 0.0
        else:
            base_txt = f"control {base:.4f}"
        ok = canary.error_rate - base <= config.max_error_rate_increase
        results.append(
            GateResult(
                name="error_rate",
                status=GateStatus.PASS if ok else GateStatus.FAIL,
                canary=canary.error_rate,
                control=ctl.error_rate,
                limit=config.max_error_rate_increase,
                detail=f"canary {canary.error_rate:.4f} vs {base_txt}, "
                f"allowed increase {config.max_error_rate_increase:g}",
            )
        )

    results.append(
        _ratio_gate(
            "latency_p95_ratio",
            canary.latency_p95_ms,
            ctl.latency_p95_ms,
            config.max_latency_p95_ratio,
            "p95 latency",
        )
    )

    # input drift: pluggable (fleet.drift); never blocks when it is not there
    if config.max_drift_score is None:
        results.append(GateResult(name="drift", status=GateStatus.OFF))
    elif drift is None or not drift.available or drift.value is None:
        results.append(
            GateResult(
                name="drift", status=GateStatus.NOT_AVAILABLE,
                detail=(drift.detail if drift else "") or "drift comparison not available",
            )
        )  # fmt: skip
    else:
        ok = drift.value <= config.max_drift_score
        results.append(
            GateResult(
                name="drift",
                status=GateStatus.PASS if ok else GateStatus.FAIL,
                canary=drift.value,
                limit=config.max_drift_score,
                detail=drift.detail,
            )
        )

    # shadow agreement: only judged on shadow stages
    if config.min_shadow_agreement is None or not shadow_stage:
        results.append(GateResult(name="shadow_agreement", status=GateStatus.OFF))
    elif shadow is None or not shadow.available or shadow.value is None:
        results.append(
            GateResult(
                name="shadow_agreement", status=GateStatus.NOT_AVAILABLE,
                detail=(shadow.detail if shadow else "") or "no shadow comparisons reported",
            )
        )  # fmt: skip
    else:
        ok = shadow.value >= config.min_shadow_agreement
        results.append(
            GateResult(
                name="shadow_agreement",
                status=GateStatus.PASS if ok else GateStatus.FAIL,
                canary=shadow.value,
                limit=config.min_shadow_agreement,
                detail=shadow.detail,
            )
        )

    results.append(
        _ratio_gate(
            "battery_drain_ratio",
            canary.battery_drain_pct_per_h,
            ctl.battery_drain_pct_per_h,
            config.max_battery_drain_ratio,
            "battery drain",
        )
    )

    # model quality (fleet.quality): judged only when a reading is passed in
    if config.max_accuracy_drop is None:
        results.append(GateResult(name="accuracy_drop", status=GateStatus.OFF))
    elif quality is not None:
        results.append(
            quality_gate(
                quality,
                max_drop=config.max_accuracy_drop,
                min_samples=config.min_quality_samples,
            )
        )

    for gate in config.custom:
        results.append(
            _custom_gate(
                f"custom:{gate.name}",
                canary.custom.get(gate.metric),
                ctl.custom.get(gate.metric),
                max_ratio=gate.max_ratio,
                max_increase=gate.max_increase,
                max_value=gate.max_value,
            )
        )

    short = []
    if install.committed < config.min_devices:
        short.append(f"{install.committed} committed devices < {config.min_devices}")
    if canary.inferences < config.min_inferences:
        short.append(f"{canary.inferences} inferences < {config.min_inferences}")
    return GateVerdict(
        sample_ok=not short,
        sample_detail="; ".join(short) or "minimum sample reached",
        results=tuple(results),
    )
