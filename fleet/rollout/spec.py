"""What an operator asks for: the rollout's target, stages, gates and timing (validated).

These are the API's request models and, frozen, the configuration the pure state machine
reads. Defaults are the documented ones (docs in each field); every limit carries its unit.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

__all__ = [
    "DEFAULT_STAGE_PERCENTS",
    "DEFAULT_WARMUP_S",
    "CustomGate",
    "GateConfig",
    "RolloutCreate",
    "StageSpec",
    "TargetSpec",
]

DEFAULT_STAGE_PERCENTS = (1.0, 10.0, 50.0, 100.0)
DEFAULT_WARMUP_S = 5.0
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CustomGate(_Frozen):
    """A gate on any numeric telemetry field: ``cpu_temp_c``, ``load_1m``, ``mem_rss_bytes``,
    ``battery.power_w`` or ``extra.<key>``; the per-device mean, averaged over the cohort."""

    name: Name
    metric: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    #: fail when canary > control * max_ratio (needs a control sample)
    max_ratio: float | None = Field(default=None, gt=0.0)
    #: fail when canary - control > max_increase (needs a control sample)
    max_increase: float | None = None
    #: fail when canary > max_value (absolute; no control needed)
    max_value: float | None = None

    @model_validator(mode="after")
    def _one_limit(self) -> Self:
        if self.max_ratio is None and self.max_increase is None and self.max_value is None:
            raise ValueError(
                f"custom gate {self.name!r} has no limit; give max_ratio, max_increase or max_value"
            )
        return self


class GateConfig(_Frozen):
    """Thresholds, judged per stage after the bake time. ``None`` switches a gate off."""

    #: the stage's committed devices needed before gates are judged
    min_devices: int = Field(default=1, ge=1)
    #: inferences the stage's devices must report in the bake window
    min_inferences: int = Field(default=200, ge=0)
    #: failed installs / settled installs in the stage (absolute)
    max_install_failure_rate: float | None = Field(default=0.05, ge=0.0, le=1.0)
    #: canary error rate minus control error rate (absolute points, 0.01 = 1 %)
    max_error_rate_increase: float | None = Field(default=0.01, ge=0.0, le=1.0)
    #: canary p95 latency / control p95 latency
    max_latency_p95_ratio: float | None = Field(default=1.25, gt=0.0)
    #: a device's telemetry counts only from this long after its last model load ended:
    #: its switch window (up to the commit, the health check's cold inferences included) and
    #: the window after an agent restart are never evidence, whatever this is; the warm-up
    #: skips the windows that begin within it too, and (for both cohorts, so they cover the
    #: same time) those that begin within it of the bake's start. Applies to every cohort
    #: figure (latency, errors, inferences, battery, custom), canary and control alike
    warmup_s: float = Field(default=DEFAULT_WARMUP_S, ge=0.0, le=3600.0)
    #: input drift score of canary vs control (from `fleet.drift`, when it is there)
    max_drift_score: float | None = Field(default=0.25, ge=0.0)
    #: share of shadow predictions that agree with the active model (shadow stages only)
    min_shadow_agreement: float | None = Field(default=0.95, ge=0.0, le=1.0)
    #: canary battery drain (%/h) / control drain
    max_battery_drain_ratio: float | None = Field(default=1.25, gt=0.0)
    #: canary accuracy below control's by more than this (labels, else the calibrated
    #: label-free estimate) halts the stage; 0.05 = 5 points
    max_accuracy_drop: float | None = Field(default=0.05, ge=0.0, le=1.0)
    #: labels (or predictions, for the estimate) each cohort needs before it is judged
    min_quality_samples: int = Field(default=200, ge=1)
    custom: tuple[CustomGate, ...] = ()
    #: what a failed gate does: roll back at once, or pause for a person
    on_fail: Literal["rollback", "pause"] = "rollback"


class StageSpec(_Frozen):
    """One stage: a cumulative share of the target set, and/or explicit devices or tags."""

    #: cumulative percentage of the target set that runs the bundle after this stage
    percent: float | None = Field(default=None, gt=0.0, le=100.0)
    #: explicit canary devices (must be in the target set)
    devices: tuple[Name, ...] = ()
    #: canary by tag: every target device carrying any of these tags
    tags: tuple[Name, ...] = ()
    bake_s: float = Field(default=600.0, ge=0.0)
    #: wait for a person's approval after the gates pass
    require_approval: bool = False
    #: deploy in shadow (beside the active model) instead of switching
    shadow: bool = False
    #: gates for this stage only (default: the rollout's)
    gates: GateConfig | None = None

    @model_validator(mode="after")
    def _chooses_something(self) -> Self:
        if self.percent is None and not self.devices and not self.tags:
            raise ValueError("a stage needs a percent, devices or tags")
        return self


class TargetSpec(_Frozen):
    """The devices a rollout may touch: every filter given must match (AND)."""

    group: Name | None = None
    #: devices that carry ALL of these tags
    tags: tuple[Name, ...] = ()
    #: default: the bundle's profile
    profile: Name | None = None
    device_ids: tuple[Name, ...] | None = Field(default=None, min_length=1, max_length=100_000)


class RolloutCreate(_Frozen):
    """POST /api/v1/rollouts."""

    bundle_sha256: Sha256Hex
    target: TargetSpec = TargetSpec()
    stages: tuple[StageSpec, ...] = Field(
        default=tuple(StageSpec(percent=p) for p in DEFAULT_STAGE_PERCENTS),
        min_length=1,
        max_length=32,
    )
    gates: GateConfig = GateConfig()
    #: seed of the device choice (random when omitted; stored, so the choice is reproducible)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    #: spread each stage across tag combinations in proportion to their size
    spread_by_tag: bool = False
    #: no terminal report this long after a command: send it again (new attempt)
    command_timeout_s: float = Field(default=600.0, gt=0.0)
    #: retries after a timeout while the device was online; then it counts as failed
    max_retries: int = Field(default=2, ge=0, le=100)
    #: offline devices are waited for this long after their stage began, then unreachable
    stage_timeout_s: float = Field(default=3600.0, gt=0.0)
    #: after the bake, wait this long for the minimum sample, then pause for a person
    sample_timeout_s: float = Field(default=3600.0, ge=0.0)
    #: a rollback follows offline devices this long, then ends (desired state stays set)
    rollback_timeout_s: float = Field(default=86400.0, gt=0.0)
    created_by: str = Field(default="", max_length=128)

    @model_validator(mode="after")
    def _stages_ok(self) -> Self:
        last = self.stages[-1]
        if last.percent != 100.0 or last.devices or last.tags:
            raise ValueError(
                "the last stage must be exactly {'percent': 100} (every target device); "
                f"it is {last.model_dump(exclude_defaults=True)}"
            )
        prev = 0.0
        for i, stage in enumerate(self.stages):
            if stage.percent is None:
                continue
            if stage.percent < prev:
                raise ValueError(
                    f"stage {i} has percent {stage.percent}, below the previous {prev}; "
                    "percentages are cumulative and must not decrease"
                )
            prev = stage.percent
        return self

    def gates_for(self, stage: int) -> GateConfig:
        """The gates that apply to ``stage``."""
        return self.stages[stage].gates or self.gates
