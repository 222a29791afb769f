"""The drift loop (a background thread) and its Prometheus collector.

Each tick: tile new telemetry (until caught up), then for each model version with tiles,
evaluate every alert window (tumbling, ``alert_window_s`` wide, aligned to multiples of it)
that completed since the last one evaluated, step the consecutive-window state machine, and
write `DriftAlert` rows. Overlapping sliding windows are not used for alerts: two overlapping
windows that both drift are barely more evidence than one.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from fleet.db import reader_engine
from fleet.drift.alert import AlertState, Observation, step
from fleet.drift.api import DriftReport
from fleet.drift.models import DriftAlert, DriftTile
from fleet.drift.reference import ReferenceCache
from fleet.drift.scope import fleet_report
from fleet.drift.settings import DriftSettings
from fleet.drift.tiles import claim_drift_lease, tile_new_telemetry
from fleet.errors import NotFound
from fleet.models import utcnow

__all__ = ["DriftCollector", "DriftService"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Latest:
    report: DriftReport
    at: datetime


@dataclass
class DriftService:
    engine: Engine
    settings: DriftSettings
    references: ReferenceCache = field(default_factory=ReferenceCache.create)
    latest: dict[tuple[str, int], _Latest] = field(default_factory=dict)
    states: dict[tuple[str, int, str], AlertState] = field(default_factory=dict)
    evaluated_until: dict[tuple[str, int], datetime] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    #: reads for the tiler that hold no write lock (`fleet.db.reader_engine`)
    _reader: Engine | None = None
    #: this process's name in the drift lease
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")

    def start(self) -> None:
        if not self.settings.enabled:
            return
        self._thread = threading.Thread(target=self._run, name="drift", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.interval_s):
            try:
                self.tick()
            except Exception:  # the loop must survive one bad tick; the log says why
                log.exception("drift tick failed")

    def tick(self, now: datetime | None = None) -> bool:
        """Tile, then evaluate every completed alert window (callable directly in tests).

        Only the process holding the drift lease does this (False: another one does): with
        several fleet processes, each merging the same telemetry wasted its CPU, and two
        evaluating the same window could both fire an alert.
        """
        now = now or utcnow()
        s = self.settings
        with Session(self.engine) as session:
            if not claim_drift_lease(session, self.owner, now, max(30.0, 3 * s.interval_s)):
                log.debug("drift: another fleet process holds the lease")
                with self._lock:
                    self.latest.clear()  # the holder exports current figures; not stale ones
                return False
        if self._reader is None:
            self._reader = reader_engine(self.engine)
        reader = self._reader
        with Session(self.engine) as session:
            for _ in range(1000):
                with Session(reader) as read_session:
                    stats = tile_new_telemetry(
                        session,
                        tile_s=s.tile_s,
                        grace_s=s.tile_grace_s,
                        batch_rows=s.tile_batch_rows,
                        now=now,
                        reader=read_session if reader is not self.engine else None,
                    )
                if stats.rows < s.tile_batch_rows or self._stop.is_set():
                    break
            width = max(s.alert_window_s, s.tile_s)
            since = now - timedelta(seconds=width * 3)
            versions = session.exec(
                select(DriftTile.model_name, DriftTile.model_version)
                .where(col(DriftTile.bucket_start) >= since)
                .distinct()
            ).all()
            for name, version in versions:
                self._evaluate(session, name, int(version), now, width)
        return True

    def _evaluate(
        self, session: Session, name: str, version: int, now: datetime, width: int
    ) -> None:
        key = (name, version)
        epoch = int(now.timestamp())
        last_end = datetime.fromtimestamp(epoch - epoch % width, tz=UTC)
        start = self.evaluated_until.get(key, last_end - timedelta(seconds=width))
        try:
            ref, _sha = self.references.for_version(session, name, version)
        except NotFound as exc:
            log.debug("drift: %s", exc)
            return
        cfg = self.settings.config()
        while start + timedelta(seconds=width) <= last_end:
            end = start + timedelta(seconds=width)
            report = fleet_report(session, ref, name, version, start=start, end=end, config=cfg)
            with self._lock:
                self.latest[key] = _Latest(report=report, at=now)
            seen: Observation = (
                "drifted" if report.drifted else "stable" if report.tested else "unknown"
            )
            self._step_alert(session, name, version, "fleet", seen, report, end)
            start = end
        self.evaluated_until[key] = start

    def _step_alert(
        self,
        session: Session,
        name: str,
        version: int,
        scope: str,
        seen: Observation,
        report: DriftReport,
        at: datetime,
    ) -> None:
        key = (name, version, scope)
        current = session.exec(
            select(DriftAlert).where(
                DriftAlert.model_name == name,
                DriftAlert.model_version == version,
                DriftAlert.scope == scope,
                DriftAlert.status == "firing",
            )
        ).first()
        state = self.states.get(key) or AlertState(firing=current is not None)
        state, what = step(
            state,
            seen,
            consecutive=self.settings.consecutive,
            resolve_after=self.settings.resolve_after,
        )
        self.states[key] = state
        worst = list(report.drifted[:5])
        if what == "fired":
            session.add(
                DriftAlert(
                    model_name=name,
                    model_version=version,
                    scope=scope,
                    status="firing",
                    worst_features=worst,
                    max_severity=report.max_severity,
                    drifted_count=len(report.drifted),
                    first_seen=at,
                    last_seen=at,
                    detail=f"drift share {report.drift_share:.0%} of {report.tested} features",
                )
            )
            log.warning("drift alert: %s v%d %s: %s", name, version, scope, ", ".join(worst))
        elif current is not None and what == "still_firing" and seen == "drifted":
            current.last_seen = at
            current.worst_features = worst
            current.max_severity = max(current.max_severity, report.max_severity)
            current.drifted_count = len(report.drifted)
            session.add(current)
        elif current is not None and what == "resolved":
            current.status = "resolved"
            current.resolved_at = at
            session.add(current)
        session.commit()

    def snapshot(self) -> dict[tuple[str, int], _Latest]:
        with self._lock:
            return dict(self.latest)


class DriftCollector(Collector):
    """Per model version: the worst drift score and the count of drifted features.

    Bounded cardinality: two series per model version, no feature label.
    """

    def __init__(self, service: DriftService) -> None:
        self._service = service

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Any:
        score = GaugeMetricFamily(
            "edgefleet_fleet_drift_score",
            "Worst input-feature drift severity (KS distance beyond sketch error) of the "
            "latest alert window, per model version.",
            labels=["model", "version"],
        )
        drifted = GaugeMetricFamily(
            "edgefleet_fleet_drift_features",
            "Input features that drifted in the latest alert window, per model version.",
            labels=["model", "version"],
        )
        for (name, version), latest in sorted(self._service.snapshot().items()):
            labels = [name, str(version)]
            score.add_metric(labels, latest.report.max_severity)
            drifted.add_metric(labels, len(latest.report.drifted))
        yield score
        yield drifted
