"""Rollout and per-model-version figures for /metrics, read from the database at each scrape.

Per model version, over the last ``slo_window_s``: inference rate, error rate, p95 latency,
and error-budget burn rates against the SLOs (``slo_success_rate``: the share of inferences
that must succeed; ``slo_latency_p95_ms``: 95 % of inferences must be faster). A burn rate of
1 spends the budget exactly over the SLO period; 14.4 spends a 30-day budget in 2 days (the
usual fast-burn page threshold). Per rollout: its state, stage, and devices per phase.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from fleet.inventory import merged_latency
from fleet.models import TelemetryRecord, utcnow
from fleet.rollout.machine import RolloutPhase
from fleet.rollout.table import CommandOutbox, Rollout, RolloutDevice
from fleet.settings import FleetSettings

__all__ = ["RolloutCollector"]

#: latency sketches merged per model version and scrape (newest windows first)
LATENCY_WINDOWS_MAX = 2000
ROLLOUTS_SHOWN = 50
LATENCY_SLO_QUANTILE = 0.95


class RolloutCollector(Collector):
    def __init__(self, engine: Engine, settings: FleetSettings) -> None:
        self._engine = engine
        self._settings = settings

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        s = self._settings
        now = utcnow()
        since = now - timedelta(seconds=s.slo_window_s)
        labels = ["model", "version"]
        rate = GaugeMetricFamily(
            "edgefleet_model_inference_rate",
            f"Inferences per second over the last {s.slo_window_s:g} s, by model version.",
            labels=labels,
        )
        errors = GaugeMetricFamily(
            "edgefleet_model_error_rate", "Failed inferences / inferences, by model version.",
            labels=labels,
        )  # fmt: skip
        p95 = GaugeMetricFamily(
            "edgefleet_model_latency_p95_ms", "p95 inference latency (ms), by model version.",
            labels=labels,
        )  # fmt: skip
        burn = GaugeMetricFamily(
            "edgefleet_model_error_budget_burn_rate",
            "Error-budget burn rate against the SLO (1 = on budget), by model version and SLO.",
            labels=[*labels, "slo"],
        )
        with Session(self._engine) as session:
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
            for name, version, n, e in totals:
                if name is None:
                    continue
                key = [name, "" if version is None else str(version)]
                n, e = int(n or 0), int(e or 0)
                rate.add_metric(key, n / s.slo_window_s)
                if n:
                    errors.add_metric(key, e / n)
                    burn.add_metric([*key, "success"], (e / n) / (1.0 - s.slo_success_rate))
                sketch, _ = merged_latency(session, name, version, since, limit=LATENCY_WINDOWS_MAX)
                if sketch is not None:
                    p95.add_metric(key, sketch.quantile(0.95))
                    slow = 1.0 - sketch.rank(s.slo_latency_p95_ms)
                    burn.add_metric([*key, "latency"], slow / (1.0 - LATENCY_SLO_QUANTILE))
            rollouts = session.exec(
                select(Rollout).order_by(col(Rollout.created_at).desc()).limit(ROLLOUTS_SHOWN)
            ).all()
            phases = session.exec(
                select(RolloutDevice.rollout_id, RolloutDevice.phase, func.count())
                .where(col(RolloutDevice.rollout_id).in_([r.id for r in rollouts]))
                .group_by(col(RolloutDevice.rollout_id), col(RolloutDevice.phase))
            ).all()
            unsent = session.exec(
                select(func.count())
                .select_from(CommandOutbox)
                .where(col(CommandOutbox.sent_at).is_(None))
            ).one()
        yield from (rate, errors, p95, burn)

        rl = ["rollout", "model", "version"]
        stage = GaugeMetricFamily(
            "edgefleet_rollout_stage", "Current stage index of each rollout (-1: not started).",
            labels=rl,
        )  # fmt: skip
        percent = GaugeMetricFamily(
            "edgefleet_rollout_stage_percent", "Target share of the current stage (%).", labels=rl
        )
        state = GaugeMetricFamily(
            "edgefleet_rollout_state", "1 for the rollout's current state, 0 for the others.",
            labels=[*rl, "state"],
        )  # fmt: skip
        devices = GaugeMetricFamily(
            "edgefleet_rollout_devices", "Devices of each rollout by phase.",
            labels=["rollout", "phase"],
        )  # fmt: skip
        for r in rollouts:
            key = [r.id, r.model_name, str(r.model_version)]
            stage.add_metric(key, r.stage)
            stages = r.plan.get("stages") or []
            if 0 <= r.stage < len(stages) and stages[r.stage].get("percent") is not None:
                percent.add_metric(key, float(stages[r.stage]["percent"]))
            for p in RolloutPhase:
                state.add_metric([*key, p.value], 1.0 if p.value == r.phase else 0.0)
        for rid, phase, n in phases:
            devices.add_metric([rid, phase], n)
        yield from (stage, percent, state, devices)
        yield GaugeMetricFamily(
            "edgefleet_command_outbox_unsent", "Commands decided but not yet sent.", value=unsent
        )
