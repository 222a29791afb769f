"""REST: ``POST /api/v1/labels``, ``GET /api/v1/quality``, ``GET /api/v1/cost``,
``GET /api/v1/alerts``; the router's lifespan runs `QualityService` and its collector.

Labels posted here are not joined by the fleet: they are stored (deduplicated by device and
prediction id or input hash) and forwarded to the device in a ``label`` command; the device
joins them to its own prediction record and reports the result in telemetry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from fleet.db import SessionDep
from fleet.errors import NotFound
from fleet.models import TelemetryRecord, utcnow
from fleet.quality.alerts import all_alerts
from fleet.quality.models import FleetAlert, QualityLabel
from fleet.quality.service import QualityService, QualitySettings, cost_report, quality_report
from protocol.errors import TopicError
from protocol.topics import validate_device_id

__all__ = ["LabelIn", "QualityCollector", "quality_router"]


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    s = app.state.settings
    service = QualityService(
        engine=app.state.engine,
        settings=QualitySettings(
            slo_success_rate=s.slo_success_rate,
            slo_window_s=s.slo_window_s,
            offline_after_s=s.offline_after_s,
        ),
        publisher=app.state.publisher,
    )
    app.state.quality = service
    chunks = getattr(app.state, "chunk_server", None)
    if chunks is not None:
        chunks.on_sent = service.ledger.record
    registry = getattr(app.state, "metrics_registry", None)
    collector = QualityCollector(service)
    if registry is not None:
        registry.register(collector)
    if app.state.publisher is not None or getattr(app.state, "mqtt", None) is not None:
        service.start()
    try:
        yield
    finally:
        service.stop()
        if registry is not None:
            registry.unregister(collector)


quality_router = APIRouter(prefix="/api/v1", tags=["quality"], lifespan=_lifespan)


class LabelIn(BaseModel):
    """One ground-truth label for a prediction a device made."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    device_id: str = Field(min_length=1, max_length=64)
    prediction_id: str | None = Field(default=None, min_length=1, max_length=64)
    input_hash: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    model_name: str | None = Field(default=None, max_length=128)
    model_version: int | None = Field(default=None, ge=1, le=2**31 - 1)
    labeled_at: datetime | None = None
    label: int | str | list[int | str]

    @field_validator("device_id")
    @classmethod
    def _device_id_ok(cls, v: str) -> str:
        # A label is forwarded to the device's own topic: the id must be a valid one.
        try:
            return validate_device_id(v)
        except TopicError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _names_a_prediction(self) -> LabelIn:
        if self.prediction_id is None and self.input_hash is None:
            raise ValueError("give prediction_id (from POST /v1/predict) or input_hash")
        return self


class LabelsIn(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    labels: list[LabelIn] = Field(min_length=1, max_length=10_000)


@quality_router.post("/labels")
def post_labels(body: LabelsIn, session: SessionDep) -> dict[str, Any]:
    """Store labels for forwarding to their devices; a repeated (device, prediction) is a
    duplicate (the first label stands), counted, never sent twice."""
    accepted = duplicates = 0
    for item in body.labels:
        pid, digest = item.prediction_id, item.input_hash
        key = f"id:{pid}" if pid is not None else f"hash:{digest}"
        exists = session.exec(
            select(QualityLabel.id).where(
                QualityLabel.device_id == item.device_id, QualityLabel.key == key
            )
        ).first()
        if exists is not None:
            duplicates += 1
            continue
        session.add(
            QualityLabel(
                device_id=item.device_id,
                key=key,
                prediction_id=item.prediction_id,
                input_hash=item.input_hash,
                model_name=item.model_name,
                model_version=item.model_version,
                label=item.label,
                labeled_at=item.labeled_at,
            )
        )
        try:
            session.flush()
        except IntegrityError:  # a concurrent post of the same key
            session.rollback()
            duplicates += 1
            continue
        accepted += 1
    session.commit()
    return {"accepted": accepted, "duplicates": duplicates}


def _span(window_s: int | None, since: datetime | None) -> tuple[datetime, datetime]:
    until = utcnow()
    return (since or until - timedelta(seconds=window_s or 86400)), until


def _latest_version(session: Session, model: str) -> int:
    v = session.exec(
        select(func.max(TelemetryRecord.model_version)).where(TelemetryRecord.model_name == model)
    ).one()
    if v is None:
        raise NotFound(f"no telemetry for model {model!r} yet")
    return int(v)


@quality_router.get("/quality")
def get_quality(
    session: SessionDep,
    model: str,
    version: int | None = None,
    window_s: Annotated[int | None, Query(ge=60, le=90 * 86400)] = None,
    since: datetime | None = None,
    device_id: Annotated[list[str] | None, Query(max_length=1000)] = None,
) -> dict[str, Any]:
    """Labeled accuracy, per-class precision/recall, confusion, coverage, lag and the
    label-free estimate of one model version (default: the newest, last 24 h)."""
    version = version if version is not None else _latest_version(session, model)
    start, end = _span(window_s, since)
    return quality_report(session, model, version, start, end, device_id)


@quality_router.get("/cost")
def get_cost(
    session: SessionDep,
    model: str,
    version: int | None = None,
    window_s: Annotated[int | None, Query(ge=60, le=90 * 86400)] = None,
    since: datetime | None = None,
) -> dict[str, Any]:
    """CPU s and battery per 1,000 inferences by profile; bytes sent per device."""
    version = version if version is not None else _latest_version(session, model)
    start, end = _span(window_s, since)
    return cost_report(session, model, version, start, end)


@quality_router.get("/alerts")
def get_alerts(
    session: SessionDep,
    status: str | None = None,
    model: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[dict[str, Any]]:
    """Every alert (quality, drift, SLO burn, rollout halted, device offline), newest first."""
    return all_alerts(session, status=status, model=model, limit=limit)


@quality_router.post("/quality/evaluate")
def post_evaluate(request: Request) -> dict[str, Any]:
    """Run one quality tick now (forward labels, evaluate alerts); for operators and tests."""
    service: QualityService | None = getattr(request.app.state, "quality", None)
    if service is None:
        service = request.app.state.quality = QualityService(
            engine=request.app.state.engine, publisher=request.app.state.publisher
        )
    service.tick()
    with Session(request.app.state.engine) as session:
        firing = session.exec(
            select(func.count()).select_from(FleetAlert).where(col(FleetAlert.status) == "firing")
        ).one()
    return {"firing": int(firing)}


class QualityCollector(Collector):
    """Per model version: accuracy (labels / estimate), coverage, lag, labels, alerts."""

    def __init__(self, service: QualityService) -> None:
        self._service = service

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        acc = GaugeMetricFamily(
            "edgefleet_model_accuracy",
            "Top-1 accuracy over the quality window, by source (labels | estimate).",
            labels=[*labels, "source"],
        )
        expected = GaugeMetricFamily(
            "edgefleet_model_expected_accuracy",
            "The bundle's compile-time top-1 accuracy on held-out data.",
            labels=labels,
        )
        coverage = GaugeMetricFamily(
            "edgefleet_model_label_coverage",
            "Labels joined / predictions, over the quality window.",
            labels=labels,
        )
        count = GaugeMetricFamily(
            "edgefleet_model_labels", "Labels joined over the quality window.", labels=labels
        )
        lag = GaugeMetricFamily(
            "edgefleet_model_label_lag_p50_seconds",
            "Median label lag (upper bucket bound), over the quality window.",
            labels=labels,
        )
        rejected = GaugeMetricFamily(
            "edgefleet_model_labels_rejected",
            "Labels not joined over the quality window, by reason.",
            labels=[*labels, "reason"],
        )
        for (name, version), f in sorted(self._service.latest.items()):
            key = [name, str(version)]
            if f["labeled"]["accuracy"] is not None:
                acc.add_metric([*key, "labels"], f["labeled"]["accuracy"])
            if f["estimate"]["accuracy"] is not None:
                acc.add_metric([*key, "estimate"], f["estimate"]["accuracy"])
            if f.get("expected") is not None:
                expected.add_metric(key, f["expected"])
            if f["coverage"] is not None:
                coverage.add_metric(key, f["coverage"])
            count.add_metric(key, f["labeled"]["labels"])
            if f["label_lag"]["p50_s"] is not None:
                lag.add_metric(key, f["label_lag"]["p50_s"])
            for reason, n in f["rejected_labels"].items():
                rejected.add_metric([*key, reason], n)
        yield from (acc, expected, coverage, count, lag, rejected)
        cpu = GaugeMetricFamily(
            "edgefleet_model_cpu_seconds_per_1k_inferences",
            "Agent process CPU seconds per 1,000 inferences, by model version and profile.",
            labels=[*labels, "profile"],
        )
        drain = GaugeMetricFamily(
            "edgefleet_model_battery_drain_pct_per_hour",
            "Mean battery drain while discharging (devices with a battery only).",
            labels=[*labels, "profile"],
        )
        tel = GaugeMetricFamily(
            "edgefleet_model_telemetry_bytes_per_device_day",
            "Telemetry payload bytes per device per day (sizes at ingest).",
            labels=[*labels, "profile"],
        )
        sent = GaugeMetricFamily(
            "edgefleet_model_bundle_bytes_sent",
            "Bundle bytes sent to devices over MQTT chunks (retries included), all time.",
            labels=labels,
        )
        for (name, version), c in sorted(self._service.cost.items()):
            key = [name, str(version)]
            for p in c["profiles"]:
                pk = [*key, p["profile"]]
                if p["cpu_s_per_1k_inferences"] is not None:
                    cpu.add_metric(pk, p["cpu_s_per_1k_inferences"])
                if p["battery_drain_pct_per_h"] is not None:
                    drain.add_metric(pk, p["battery_drain_pct_per_h"])
                if p["telemetry_bytes_per_device_per_day"] is not None:
                    tel.add_metric(pk, p["telemetry_bytes_per_device_per_day"])
            if c["transfer"].get("bytes_total") is not None:
                sent.add_metric(key, c["transfer"]["bytes_total"])
        yield from (cpu, drain, tel, sent)
        firing = GaugeMetricFamily(
            "edgefleet_alerts_firing",
            "Firing alerts (fleet_alert table) by kind and model version.",
            labels=["kind", "model", "version"],
        )
        with Session(self._service.engine) as session:
            for kind, name, ver, n in session.exec(
                select(
                    FleetAlert.kind, FleetAlert.model_name, FleetAlert.model_version, func.count()
                )
                .where(FleetAlert.status == "firing")
                .group_by(
                    col(FleetAlert.kind), col(FleetAlert.model_name), col(FleetAlert.model_version)
                )
            ).all():
                firing.add_metric([kind, name, "" if ver is None else str(ver)], n)
        yield firing
