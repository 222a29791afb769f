"""Prometheus metrics, on a registry owned by one app (never the process-global one)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from fleet.ingest import IngestStats
from fleet.models import Device, TelemetryRecord, utcnow

__all__ = ["FleetCollector", "make_registry"]


class FleetCollector(Collector):
    """Reads the database and this process's ingest counters at each scrape."""

    def __init__(
        self,
        engine: Engine,
        stats: IngestStats,
        *,
        offline_after_s: float,
        backlog: Callable[[], int] | None = None,
    ) -> None:
        self._engine = engine
        self._stats = stats
        self._offline_after_s = offline_after_s
        self._backlog = backlog

    def describe(self) -> list[Metric]:
        # no collect() at registration time: the tables may not exist yet
        return []

    def collect(self) -> Iterator[Metric]:
        cutoff = utcnow() - timedelta(seconds=self._offline_after_s)
        with Session(self._engine) as session:
            total = session.exec(select(func.count()).select_from(Device)).one()
            online = session.exec(
                select(func.count())
                .select_from(Device)
                .where(col(Device.online).is_(True), col(Device.last_seen) >= cutoff)
            ).one()
            per_model = list(
                session.exec(
                    select(
                        TelemetryRecord.model_name,
                        TelemetryRecord.model_version,
                        func.sum(TelemetryRecord.inference_count),
                    ).group_by(col(TelemetryRecord.model_name), col(TelemetryRecord.model_version))
                )
            )
        yield GaugeMetricFamily("edgefleet_fleet_devices", "Registered devices.", value=total)
        yield GaugeMetricFamily(
            "edgefleet_fleet_devices_online",
            "Devices online and heard from recently.",
            value=online,
        )
        inferences = CounterMetricFamily(
            "edgefleet_fleet_inferences",
            "Inferences reported in telemetry, by model name and version.",
            labels=["model", "version"],
        )
        for name, version, count in per_model:
            inferences.add_metric(
                [name or "", "" if version is None else str(version)], int(count or 0)
            )
        yield inferences

        snap = self._stats.snapshot()
        yield CounterMetricFamily(
            "edgefleet_fleet_messages_received",
            "MQTT messages this process handled.",
            value=snap["received"],
        )
        yield CounterMetricFamily(
            "edgefleet_fleet_telemetry_windows_ingested",
            "Telemetry windows this process stored (duplicates excluded).",
            value=snap["stored"].get("telemetry", 0),
        )
        for name, doc, label, values in (
            (
                "edgefleet_fleet_messages_stored",
                "Messages stored, by kind.",
                "kind",
                snap["stored"],
            ),
            (
                "edgefleet_fleet_messages_duplicate",
                "Redelivered messages dropped, by kind.",
                "kind",
                snap["duplicates"],
            ),
            (
                "edgefleet_fleet_messages_rejected",
                "Messages rejected, by reason.",
                "reason",
                snap["rejected"],
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=[label])
            for key, n in sorted(values.items()):
                family.add_metric([key], n)
            yield family
        if self._backlog is not None:
            yield GaugeMetricFamily(
                "edgefleet_fleet_ingest_backlog",
                "Messages waiting for the DB writer.",
                value=self._backlog(),
            )


def make_registry(collector: FleetCollector) -> CollectorRegistry:
    """A fresh registry holding only the fleet's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
