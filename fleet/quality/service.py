"""Quality and cost reports from stored telemetry, the label forwarder, the alert loop, and
the bytes-per-device ledger of bundle transfers.

Labels join on the device (one join point, works offline, no raw data leaves it): a label
posted to the fleet is stored, sent down in a ``label`` command, and comes back joined in the
device's telemetry. The fleet reads the joined figures from the stored windows.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Text, cast, func
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from fleet.models import Bundle, Device, TelemetryRecord, utcnow
from fleet.quality.alerts import AlertKey, raise_alert, resolve_others
from fleet.quality.models import QualityLabel, TransferBytes
from fleet.quality.stats import QualityAccumulator
from protocol.errors import ProtocolError
from protocol.messages import ChunkRequest, LabelCommand, LabelEntry, decode_message
from protocol.topics import parse_topic

__all__ = [
    "QualityService",
    "QualitySettings",
    "TransferLedger",
    "cost_report",
    "forward_labels",
    "quality_reading",
    "quality_report",
]

log = logging.getLogger(__name__)

#: windows read per report at most (newest first)
WINDOWS_MAX = 50_000
LABELS_PER_COMMAND = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class QualitySettings:
    interval_s: float = 30.0
    #: span of the alert evaluation (labels and estimates over the last hour)
    alert_window_s: float = 3600.0
    #: accuracy below the bundle's compile-time accuracy by more than this fires an alert
    max_accuracy_drop: float = 0.05
    min_labels: int = 100
    min_estimate_rows: int = 500
    slo_burn_fast: float = 14.4
    slo_success_rate: float = 0.999
    slo_window_s: float = 300.0
    offline_after_s: float = 180.0


def _windows(
    session: Session,
    model: str,
    since: datetime,
    until: datetime,
    device_ids: Sequence[str] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    q = select(TelemetryRecord.device_id, TelemetryRecord.window).where(
        TelemetryRecord.model_name == model,
        col(TelemetryRecord.window_end) >= since,
        col(TelemetryRecord.window_start) <= until,
    )
    if device_ids is not None:
        q = q.where(col(TelemetryRecord.device_id).in_(list(device_ids)))
    q = q.order_by(col(TelemetryRecord.window_end).desc()).limit(WINDOWS_MAX)
    return [(d, dict(w or {})) for d, w in session.exec(q)]


def _bundle(session: Session, model: str, version: int) -> Bundle | None:
    return session.exec(
        select(Bundle).where(Bundle.model_name == model, Bundle.model_version == version)
    ).first()


def quality_report(
    session: Session,
    model: str,
    version: int,
    since: datetime,
    until: datetime,
    device_ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Labeled and estimated quality of one version over [since, until], with coverage/lag."""
    acc = QualityAccumulator(model=model, version=version).add_all(
        _windows(session, model, since, until, device_ids)
    )
    bundle = _bundle(session, model, version)
    manifest = bundle.manifest if bundle is not None else {}
    out = acc.figures(class_names=tuple(manifest.get("class_names") or ()))
    out["since"], out["until"] = since.isoformat(), until.isoformat()
    out["compile_time_accuracy"] = (manifest.get("verification") or {}).get(
        "artifact_top1_accuracy"
    )
    return out


def _battery_drain(rows: Sequence[tuple[str, dict[str, Any]]]) -> float | None:
    per_device: dict[str, list[tuple[str, float]]] = {}
    for device, w in rows:
        b = w.get("battery") or {}
        if b.get("level_pct") is None or b.get("charging"):
            continue
        per_device.setdefault(device, []).append((w["window_end"], float(b["level_pct"])))
    rates = []
    for readings in per_device.values():
        if len(readings) < 2:
            continue
        readings.sort()
        t0, t1 = (datetime.fromisoformat(readings[i][0]) for i in (0, -1))
        hours = (t1 - t0).total_seconds() / 3600.0
        if hours > 0:
            rates.append(max(0.0, readings[0][1] - readings[-1][1]) / hours)
    return sum(rates) / len(rates) if rates else None


def cost_report(
    session: Session, model: str, version: int, since: datetime, until: datetime
) -> dict[str, Any]:
    """Energy (CPU s and battery per 1,000 inferences), bandwidth, per profile."""
    rows = [
        (d, w)
        for d, w in _windows(session, model, since, until)
        if w.get("model_version") == version
    ]
    profiles = dict(
        session.exec(
            select(Device.id, Device.profile).where(
                col(Device.id).in_(sorted({d for d, _ in rows}) or [""])
            )
        ).all()
    )
    days = max((until - since).total_seconds() / 86400.0, 1e-9)
    by_profile: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for d, w in rows:
        by_profile.setdefault(profiles.get(d) or "unknown", []).append((d, w))
    # payload sizes: the stored window is the exact bytes received at ingest (its JSON, and
    # a framed window's sketch pack; the frame's 8-byte header is not counted)
    stored_bytes = func.length(cast(TelemetryRecord.window, Text)) + func.coalesce(
        func.length(TelemetryRecord.input_pack), 0
    )
    sizes = dict(
        session.exec(
            select(TelemetryRecord.device_id, func.sum(stored_bytes))
            .where(
                TelemetryRecord.model_name == model,
                TelemetryRecord.model_version == version,
                col(TelemetryRecord.window_end) >= since,
                col(TelemetryRecord.window_start) <= until,
            )
            .group_by(col(TelemetryRecord.device_id))
        ).all()
    )
    out_profiles = []
    for profile, prow in sorted(by_profile.items()):
        inferences = sum(int(w.get("inference_count") or 0) for _, w in prow)
        timed = [w for _, w in prow if w.get("cpu_time_s") is not None]
        cpu = sum(float(w["cpu_time_s"]) for w in timed)
        timed_inf = sum(int(w.get("inference_count") or 0) for w in timed)
        drain = _battery_drain(prow)
        rate_per_h = inferences / max(days * 24.0, 1e-9) / max(len({d for d, _ in prow}), 1)
        devs = {d for d, _ in prow}
        tel_bytes = sum(int(sizes.get(d) or 0) for d in devs)
        out_profiles.append(
            {
                "profile": profile,
                "devices": len(devs),
                "inferences": inferences,
                "cpu_s_per_1k_inferences": 1000.0 * cpu / timed_inf if timed_inf else None,
                "battery_drain_pct_per_h": drain,
                # drain per 1,000 inferences at each device's own rate; absent battery = None
                "battery_pct_per_1k_inferences": (1000.0 * drain / rate_per_h)
                if drain is not None and rate_per_h > 0
                else None,
                "telemetry_bytes_per_device_per_day": tel_bytes / len(devs) / days
                if devs
                else None,
            }
        )
    bundle = _bundle(session, model, version)
    transfer: dict[str, Any] = {"bundle_sha256": None}
    if bundle is not None:
        per_dev = session.exec(
            select(
                TransferBytes.device_id,
                func.sum(TransferBytes.bytes),
                func.sum(TransferBytes.chunks),
                func.sum(TransferBytes.requests),
            )
            .where(TransferBytes.bundle_sha256 == bundle.sha256)
            .group_by(col(TransferBytes.device_id))
        ).all()
        total = sum(int(b or 0) for _, b, _, _ in per_dev)
        transfer = {
            "bundle_sha256": bundle.sha256,
            "bundle_size": bundle.size,
            "devices": len(per_dev),
            "bytes_total": total,
            "bytes_per_device_mean": total / len(per_dev) if per_dev else None,
            # > 1 means retries and re-requests; HTTP downloads are not counted yet
            "overhead_ratio": (total / len(per_dev) / bundle.size)
            if per_dev and bundle.size
            else None,
            "channel": "mqtt_chunks",
        }
    return {
        "model": model,
        "version": version,
        "since": since.isoformat(),
        "until": until.isoformat(),
        "profiles": out_profiles,
        "transfer": transfer,
    }


def quality_reading(
    session: Session,
    *,
    bundle_sha256: str,
    canary_device_ids: Sequence[str],
    control_device_ids: Sequence[str],
    since: datetime,
    until: datetime,
) -> Any:
    """The rollout quality gate's input: canary vs control accuracy (labels, else estimate)."""
    from fleet.rollout.gate import QualityReading

    bundle = session.get(Bundle, bundle_sha256)
    if bundle is None:
        return QualityReading(detail="unknown bundle")

    def acc_of(devices: Sequence[str], on_bundle: bool) -> tuple[int, int, int, float]:
        n = k = rows = 0
        est = 0.0
        for part in range(0, len(devices), 500):
            q = select(TelemetryRecord.window).where(
                col(TelemetryRecord.device_id).in_(list(devices[part : part + 500])),
                col(TelemetryRecord.window_end) >= since,
                col(TelemetryRecord.window_start) <= until,
            )
            for w in session.exec(q):
                w = w or {}
                same = w.get("bundle_sha256") == bundle_sha256
                if same != on_bundle or w.get("bundle_sha256") is None:
                    continue
                e = w.get("estimate") or {}
                rows += int(e.get("rows") or 0)
                est += float(e.get("calibrated_max_sum") or 0.0)
                for st in (w.get("labels") or {}).get("joined") or []:
                    if (st.get("bundle_sha256") == bundle_sha256) != on_bundle:
                        continue
                    for p, t, c in st.get("confusion") or []:
                        n += int(c)
                        k += int(c) if p == t else 0
        return n, k, rows, est

    cn, ck, crows, cest = acc_of(list(canary_device_ids), True)
    kn, kk, krows, kest = acc_of(list(control_device_ids), False)
    return QualityReading(
        canary_labels=cn,
        canary_accuracy=ck / cn if cn else None,
        control_labels=kn,
        control_accuracy=kk / kn if kn else None,
        canary_rows=crows,
        canary_estimate=cest / crows if crows else None,
        control_rows=krows,
        control_estimate=kest / krows if krows else None,
        detail="",
    )


# -- labels posted to the fleet ------------------------------------------------------------


def forward_labels(session: Session, publisher: Any, now: datetime | None = None) -> int:
    """Send pending labels to their devices (one command per device and batch)."""
    now = now or utcnow()
    pending = session.exec(
        select(QualityLabel).where(col(QualityLabel.sent_at).is_(None)).limit(5000)
    ).all()
    by_device: dict[str, list[QualityLabel]] = {}
    for row in pending:
        by_device.setdefault(row.device_id, []).append(row)
    sent = 0
    for device, rows in by_device.items():
        for i in range(0, len(rows), LABELS_PER_COMMAND):
            part = rows[i : i + LABELS_PER_COMMAND]
            try:
                cmd = _label_command(device, part)
            except ValueError as exc:  # stored before ids were validated: never sendable
                log.warning("dropping %d labels for %r: %s", len(part), device, exc)
                for r in part:
                    r.sent_at = now
                    session.add(r)
                continue
            try:
                publisher.publish_command(cmd)
            except Exception as exc:  # broker down: they stay pending and go next time
                log.info("label forward to %s deferred: %s", device, exc)
                break
            for r in part:
                r.sent_at, r.command_id = now, cmd.command_id
                session.add(r)
            sent += len(part)
    return sent


def _label_command(device: str, part: Sequence[QualityLabel]) -> LabelCommand:
    """The command carrying these labels to their device (ValueError: not a valid command)."""
    return LabelCommand(
        device_id=device,
        labels=tuple(
            LabelEntry(
                prediction_id=r.prediction_id,
                input_hash=r.input_hash,
                label=r.label,
                labeled_at=r.labeled_at,
            )
            for r in part
        ),
    )


# -- bytes sent per device -----------------------------------------------------------------


@dataclass
class TransferLedger:
    """Counts chunk bytes the chunk server published, per (device, bundle); flushed to SQL."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pending: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    _chunks: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    _requests: Counter[tuple[str, str, str]] = field(default_factory=Counter)

    def record(self, topic: str, request: bytes, sent_bytes: int, chunks: int) -> None:
        """Called by fleet/transfer.py after each served request."""
        try:
            device = parse_topic(topic).device_id
            req = decode_message(request, expect=ChunkRequest)
        except (ProtocolError, ValueError):
            return
        key = (device, req.bundle_sha256, utcnow().date().isoformat())
        with self._lock:
            self._pending[key] += sent_bytes
            self._chunks[key] += chunks
            self._requests[key] += 1

    def flush(self, session: Session) -> int:
        with self._lock:
            pending, self._pending = self._pending, Counter()
            chunks, self._chunks = self._chunks, Counter()
            requests, self._requests = self._requests, Counter()
        for (device, sha, day), n in pending.items():
            row = session.exec(
                select(TransferBytes).where(
                    TransferBytes.device_id == device,
                    TransferBytes.bundle_sha256 == sha,
                    TransferBytes.day == day,
                    TransferBytes.channel == "mqtt_chunks",
                )
            ).first() or TransferBytes(device_id=device, bundle_sha256=sha, day=day)
            row.bytes += n
            row.chunks += chunks[(device, sha, day)]
            row.requests += requests[(device, sha, day)]
            session.add(row)
        return len(pending)


# -- the loop ------------------------------------------------------------------------------


@dataclass
class QualityService:
    engine: Engine
    settings: QualitySettings = field(default_factory=QualitySettings)
    publisher: Any = None
    ledger: TransferLedger = field(default_factory=TransferLedger)
    #: (model, version) -> latest fleet figures, for /metrics
    latest: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    #: (model, version) -> latest cost figures over the alert window, for /metrics
    cost: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    #: one tick at a time (the loop and POST /quality/evaluate)
    _tick_lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fleet-quality", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.interval_s):
            try:
                self.tick()
            except Exception:  # the loop must survive a bad tick
                log.exception("quality tick failed")

    def tick(self, now: datetime | None = None) -> None:
        """Forward labels, flush the byte ledger, evaluate alerts: one transaction."""
        now = now or utcnow()
        with self._tick_lock, Session(self.engine) as session:
            if self.publisher is not None:
                forward_labels(session, self.publisher, now)
            self.ledger.flush(session)
            self._quality_alerts(session, now)
            self._slo_alerts(session, now)
            self._rollout_alerts(session, now)
            self._offline_alerts(session, now)
            session.commit()

    def _quality_alerts(self, session: Session, now: datetime) -> None:
        s = self.settings
        since = now - timedelta(seconds=s.alert_window_s)
        versions = session.exec(
            select(TelemetryRecord.model_name, TelemetryRecord.model_version)
            .where(col(TelemetryRecord.window_end) >= since)
            .distinct()
        ).all()
        firing: dict[str, list[AlertKey]] = {"quality_drop": [], "quality_estimate_drop": []}
        for name, version in versions:
            if name is None or version is None:
                continue
            rows = _windows(session, name, since, now)
            fleet = QualityAccumulator(model=name, version=version).add_all(rows)
            bundle = _bundle(session, name, version)
            expected = ((bundle.manifest if bundle else {}).get("verification") or {}).get(
                "artifact_top1_accuracy"
            )
            self.latest[(name, version)] = {**fleet.figures(), "expected": expected}
            self.cost[(name, version)] = cost_report(session, name, version, since, now)
            if expected is None:
                continue
            per_device: dict[str, QualityAccumulator] = {}
            for d, w in rows:
                per_device.setdefault(d, QualityAccumulator(model=name, version=version)).add(w, d)
            limit = expected - s.max_accuracy_drop
            acc, est = fleet.accuracy, fleet.estimated_accuracy
            checks = (
                ("quality_drop", acc, fleet.labels >= s.min_labels, "labeled accuracy"),
                (
                    "quality_estimate_drop",
                    est,
                    fleet.est_rows >= s.min_estimate_rows,
                    "estimated accuracy",
                ),
            )
            for kind, value, enough, what in checks:
                if value is None or not enough or value >= limit:
                    continue
                worst = sorted(
                    (
                        (a.accuracy if kind == "quality_drop" else a.estimated_accuracy, d)
                        for d, a in per_device.items()
                    ),
                    key=lambda x: (x[0] is None, x[0] if x[0] is not None else 1.0),
                )
                devices = [d for v, d in worst if v is not None and v < limit]
                raise_alert(
                    session,
                    kind=kind,
                    model_name=name,
                    model_version=version,
                    devices=devices,
                    summary=f"{name} v{version}: {what} {value:.3f} < {limit:.3f} "
                    f"(compile-time {expected:.3f} - {s.max_accuracy_drop:g}); "
                    f"labels {fleet.labels}, coverage "
                    f"{fleet.labels / fleet.predictions if fleet.predictions else 0:.1%}",
                    figures={
                        "value": value,
                        "expected": expected,
                        "labels": fleet.labels,
                        "estimate_rows": fleet.est_rows,
                        "predictions": fleet.predictions,
                    },
                    severity="critical" if kind == "quality_drop" else "warning",
                    now=now,
                )
                firing[kind].append((kind, name, version, "fleet"))
        for kind, keys in firing.items():
            resolve_others(session, kind, keys, now)

    def _slo_alerts(self, session: Session, now: datetime) -> None:
        s = self.settings
        since = now - timedelta(seconds=s.slo_window_s)
        keys: list[AlertKey] = []
        for name, version, n, e in session.exec(
            select(
                TelemetryRecord.model_name,
                TelemetryRecord.model_version,
                func.sum(TelemetryRecord.inference_count),
                func.sum(TelemetryRecord.error_count),
            )
            .where(col(TelemetryRecord.window_end) >= since)
            .group_by(col(TelemetryRecord.model_name), col(TelemetryRecord.model_version))
        ).all():
            n, e = int(n or 0), int(e or 0)
            if name is None or not n:
                continue
            burn = (e / n) / (1.0 - s.slo_success_rate)
            if burn < s.slo_burn_fast:
                continue
            devices = session.exec(
                select(TelemetryRecord.device_id)
                .where(
                    TelemetryRecord.model_name == name,
                    TelemetryRecord.model_version == version,
                    col(TelemetryRecord.window_end) >= since,
                    col(TelemetryRecord.error_count) > 0,
                )
                .distinct()
            ).all()
            raise_alert(
                session,
                kind="slo_burn",
                model_name=name,
                model_version=version,
                devices=list(devices),
                summary=f"{name} v{version}: error budget burning {burn:.1f}x "
                f"({e} errors in {n} inferences)",
                figures={"burn_rate": burn, "errors": e, "inferences": n},
                severity="critical",
                now=now,
            )
            keys.append(("slo_burn", name, version, "fleet"))
        resolve_others(session, "slo_burn", keys, now)

    def _rollout_alerts(self, session: Session, now: datetime) -> None:
        try:
            from fleet.rollout.table import Rollout, RolloutDevice
        except ImportError:
            return
        keys: list[AlertKey] = []
        recent = now - timedelta(days=1)
        for r in session.exec(
            select(Rollout).where(
                col(Rollout.phase).in_(["paused", "rolling_back", "rolled_back"]),
                col(Rollout.updated_at) >= recent,
            )
        ):
            devices = session.exec(
                select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == r.id).limit(50)
            ).all()
            cohort = f"rollout:{r.id}"
            raise_alert(
                session,
                kind="rollout_halted",
                model_name=r.model_name,
                model_version=r.model_version,
                cohort=cohort,
                devices=list(devices),
                summary=f"rollout {r.id} of {r.model_name} v{r.model_version} {r.phase} at "
                f"stage {r.stage}: {r.reason[:300]}",
                figures={"phase": r.phase, "stage": r.stage},
                severity="critical" if r.phase != "paused" else "warning",
                now=now,
            )
            keys.append(("rollout_halted", r.model_name, r.model_version, cohort))
        resolve_others(session, "rollout_halted", keys, now)

    def _offline_alerts(self, session: Session, now: datetime) -> None:
        cutoff = now - timedelta(seconds=self.settings.offline_after_s)
        groups: dict[tuple[str, int | None], list[str]] = {}
        for d in session.exec(
            select(Device).where(
                col(Device.reported_model_name).is_not(None),
                col(Device.last_seen).is_not(None),
                col(Device.last_seen) < cutoff,
            )
        ):
            groups.setdefault((d.reported_model_name or "", d.reported_model_version), []).append(
                d.id
            )
        keys: list[AlertKey] = []
        for (name, version), devices in groups.items():
            raise_alert(
                session,
                kind="device_offline",
                model_name=name,
                model_version=version,
                devices=sorted(devices),
                summary=f"{len(devices)} device(s) running {name} v{version} silent for more "
                f"than {self.settings.offline_after_s:g} s",
                now=now,
            )
            keys.append(("device_offline", name, version, "fleet"))
        resolve_others(session, "device_offline", keys, now)
