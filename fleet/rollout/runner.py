"""The shell around the machine: one loop per fleet process that steps every active rollout.

Each tick, for each active rollout: take its lease (or skip it: another process has it),
load its state, turn the database into events (status reports for its commands, what the
registry says of pending devices, operator requests, stage telemetry once the bake is over),
call `machine.step`, and write the new state, commands (outbox) and decisions in ONE
transaction guarded by revision and lease. Only then are commands published, from the
outbox. Then the reconciler queues repairs and the dispatcher sends whatever is unsent.

A crash anywhere leaves either the old state and no commands, or the new state and its
commands waiting in the outbox (published again, identically, if they may already have
been). Several fleet processes can run this loop on one database.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from fleet.deployment import CommandPublisher
from fleet.models import Device, DeviceEvent, utcnow
from fleet.rollout.cohort import (
    CONTROL_SAMPLE_MAX,
    CohortQuery,
    DriftSource,
    canary_and_control,
    default_drift_source,
    shadow_agreement,
)
from fleet.rollout.crash import CrashPoints
from fleet.rollout.machine import (
    ACTIVE_PHASES,
    DEPLOY_PENDING,
    ROLLBACK_PENDING,
    DevicePhase,
    DeviceReport,
    DeviceSeen,
    Event,
    OperatorRequest,
    RolloutState,
    StageMetrics,
    step,
    wants_metrics,
)
from fleet.rollout.outbox import OutboxDispatcher
from fleet.rollout.reconcile import reconcile
from fleet.rollout.store import (
    LeaseLost,
    chunks,
    claim_lease,
    load_state,
    release_lease,
    save_transition,
)
from fleet.rollout.table import CommandOutbox, Rollout, RolloutRequest
from fleet.settings import FleetSettings

__all__ = ["RolloutRunner", "TickReport", "owner_id"]

log = logging.getLogger(__name__)

_TERMINAL_REPORTS = ("committed", "failed", "rejected", "reverted", "rolled_back")
#: status events are read again this far back: a batch may commit after a later one
_EVENT_MARGIN = timedelta(minutes=10)


def owner_id() -> str:
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in "-_")[:32] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class TickReport:
    stepped: int = 0
    commands: int = 0
    decisions: int = 0
    repairs: int = 0
    sent: int = 0


class RolloutRunner:
    def __init__(
        self,
        engine: Engine,
        settings: FleetSettings,
        publisher: CommandPublisher,
        *,
        owner: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        drift_source: DriftSource = default_drift_source,
        crash: CrashPoints | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.owner = owner or owner_id()
        self.clock = clock
        self.drift_source = drift_source
        self.crash = crash or CrashPoints(settings.crash_at_checkpoint)
        self.dispatcher = OutboxDispatcher(
            engine,
            publisher,
            owner=self.owner,
            claim_s=settings.rollout_lease_s,
            concurrency=settings.rollout_publish_concurrency,
            crash=self.crash,
            clock=clock,
        )
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick_lock = threading.Lock()

    # -- the loop -----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("RolloutRunner already started")
        self._thread = threading.Thread(target=self._run, name="fleet-rollouts", daemon=True)
        self._thread.start()
        log.info(
            "rollout runner %s started (tick %.1f s)", self.owner, self.settings.rollout_tick_s
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self._release_all()

    def kick(self) -> None:
        """Run a tick soon (an operator request or a new rollout arrived)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the loop must outlive any one bad tick
                log.exception("rollout tick failed")
            self._wake.wait(self.settings.rollout_tick_s)
            self._wake.clear()

    def _release_all(self) -> None:
        with Session(self.engine) as session:
            ids = session.exec(select(Rollout.id).where(Rollout.lease_owner == self.owner)).all()
            for rid in ids:
                release_lease(session, rid, self.owner)

    # -- one tick -----------------------------------------------------------------------
    def tick(self, now: datetime | None = None) -> TickReport:
        """Step every active rollout, queue repairs, send the outbox."""
        with self._tick_lock:
            now = now or self.clock()
            stepped = commands = decisions = 0
            for rid in self._due_rollouts():
                saved = self.step_rollout(rid, now)
                if saved is not None:
                    stepped += 1
                    commands += saved[0]
                    decisions += saved[1]
            repairs = self._reconcile(now)
            sent = self.dispatcher.dispatch()
            return TickReport(
                stepped=stepped, commands=commands, decisions=decisions, repairs=repairs, sent=sent
            )

    def _due_rollouts(self) -> list[str]:
        with Session(self.engine) as session:
            active = session.exec(
                select(Rollout.id)
                .where(col(Rollout.phase).in_([p.value for p in ACTIVE_PHASES]))
                .order_by(col(Rollout.created_at))
            ).all()
            requested = session.exec(
                select(RolloutRequest.rollout_id).where(col(RolloutRequest.applied_at).is_(None))
            ).all()
        return list(dict.fromkeys([*active, *requested]))

    def step_rollout(self, rollout_id: str, now: datetime) -> tuple[int, int] | None:
        """One machine step for one rollout, if this process holds its lease."""
        with Session(self.engine) as session:
            if not claim_lease(session, rollout_id, self.owner, now, self.settings.rollout_lease_s):
                return None
            row = session.get(Rollout, rollout_id)
            assert row is not None
            state = load_state(session, row)
            requests = list(
                session.exec(
                    select(RolloutRequest)
                    .where(
                        RolloutRequest.rollout_id == rollout_id,
                        col(RolloutRequest.applied_at).is_(None),
                    )
                    .order_by(col(RolloutRequest.created_at), col(RolloutRequest.id))
                )
            )
            events: list[Event] = [
                OperatorRequest(
                    request_id=r.id,
                    action=r.action,  # type: ignore[arg-type]
                    reason=r.reason,
                    actor=r.actor,
                    keep_devices=r.keep_devices,
                )
                for r in requests
            ]
            events.extend(self._reports(session, row))
            events.extend(self._seen(session, state, now))
            if wants_metrics(state, now):
                events.append(self._metrics(session, state, now))
            transition = step(state, events, now)
            same = dataclasses.replace(transition.state, devices={}) == dataclasses.replace(
                state, devices={}
            )
            if same and not transition.changed and not transition.actions and not requests:
                session.rollback()
                return None
            try:
                saved = save_transition(
                    session,
                    row,
                    transition,
                    owner=self.owner,
                    now=now,
                    settings=self.settings,
                    applied_requests=requests,
                    events_seen_at=now,
                )
            except LeaseLost as exc:
                session.rollback()
                log.warning("%s", exc.message)
                return None
            self.crash.hit("step written, not committed")
            session.commit()
        self.crash.hit("step committed, commands not sent")
        if saved.commands or saved.decisions:
            log.info(
                "rollout %s: %s stage %d, %d commands, %d decisions",
                rollout_id,
                transition.state.phase.value,
                transition.state.stage,
                saved.commands,
                saved.decisions,
            )
        return saved.commands, saved.decisions

    # -- events from the database ---------------------------------------------------------
    def _reports(self, session: Session, row: Rollout) -> list[DeviceReport]:
        q = (
            select(
                DeviceEvent.device_id,
                DeviceEvent.command_id,
                DeviceEvent.state,
                DeviceEvent.reason,
                DeviceEvent.detail,
                DeviceEvent.active_bundle_sha256,
                CommandOutbox.kind,
            )
            .join(
                CommandOutbox,
                (col(CommandOutbox.id) == col(DeviceEvent.command_id))
                & (col(CommandOutbox.device_id) == col(DeviceEvent.device_id)),
            )
            .where(
                CommandOutbox.rollout_id == row.id,
                col(DeviceEvent.state).in_(_TERMINAL_REPORTS),
            )
            .order_by(col(DeviceEvent.id))
        )
        if row.events_seen_at is not None:
            q = q.where(col(DeviceEvent.at) >= row.events_seen_at - _EVENT_MARGIN)
        return [
            DeviceReport(
                device_id=device_id,
                command_id=command_id or "",
                kind="rollback" if kind == "rollback" else "deploy",
                state=state,
                reason=reason,
                detail=detail,
                active_sha256=active,
            )
            for device_id, command_id, state, reason, detail, active, kind in session.exec(q)
        ]

    def _seen(self, session: Session, state: RolloutState, now: datetime) -> list[DeviceSeen]:
        pending = [
            d for d in state.devices.values() if d.phase in DEPLOY_PENDING | ROLLBACK_PENDING
        ]
        if not pending:
            return []
        found: dict[str, Any] = {}
        cols = (Device.id, Device.online, Device.last_seen, Device.reported_bundle_sha256)
        for part in chunks([d.device_id for d in pending]):
            # plain rows: this runs every tick for every pending device
            found.update(
                (r[0], r) for r in session.exec(select(*cols).where(col(Device.id).in_(part)))
            )
        cutoff = now - timedelta(seconds=self.settings.offline_after_s)
        out = []
        for entry in pending:
            row = found.get(entry.device_id)
            if row is None:
                continue
            _, flag, last_seen, reported = row
            online = bool(flag) and last_seen is not None and last_seen >= cutoff
            if online != entry.online or reported != entry.reported_sha256:
                out.append(
                    DeviceSeen(device_id=entry.device_id, online=online, reported_sha256=reported)
                )
        return out

    def _metrics(self, session: Session, state: RolloutState, now: datetime) -> StageMetrics:
        canary = tuple(
            d.device_id
            for d in state.devices.values()
            if d.stage == state.stage and d.phase is DevicePhase.COMMITTED
        )
        planned = sorted(
            (d for d in state.devices.values() if d.phase is DevicePhase.PLANNED),
            key=lambda d: d.position,
        )
        sample = planned[-CONTROL_SAMPLE_MAX:]
        assert state.bake_started_at is not None
        gates = state.plan.gates_for(state.stage)
        query = CohortQuery(
            bundle_sha256=state.bundle_sha256,
            canary_device_ids=canary,
            control_device_ids=tuple(d.device_id for d in sample),
            since=state.bake_started_at,
            until=now,
            warmup_s=gates.warmup_s,
            control_bundles={d.device_id: d.previous_sha256 for d in sample if d.previous_sha256},
        )
        custom = [g.metric for g in gates.custom]
        canary_stats, control_stats, canary_rows = canary_and_control(session, query, custom)
        return StageMetrics(
            stage=state.stage,
            canary=canary_stats,
            control=control_stats,
            drift=self.drift_source(session, query),
            shadow=shadow_agreement(canary_rows),
            quality=_quality(session, query),
        )

    def _reconcile(self, now: datetime) -> int:
        if self.settings.reconcile_interval_s <= 0:
            return 0
        with Session(self.engine) as session:
            try:
                n = reconcile(
                    session,
                    self.settings,
                    now,
                    interval_s=self.settings.reconcile_interval_s,
                    max_attempts=self.settings.reconcile_max_attempts,
                )
                session.commit()
            except Exception as exc:  # e.g. two processes queued the same repair
                session.rollback()
                log.info("reconcile round skipped: %s", exc)
                return 0
        return n


def _quality(session: Session, query: CohortQuery) -> Any:
    """Canary vs control accuracy for the quality gate; None (gate not judged) on failure."""
    try:
        from fleet.quality.service import quality_reading

        return quality_reading(
            session,
            bundle_sha256=query.bundle_sha256,
            canary_device_ids=query.canary_device_ids,
            control_device_ids=query.control_device_ids,
            since=query.since,
            until=query.until,
        )
    except Exception:  # the quality gate must never stop the rollout engine itself
        log.exception("quality reading failed; the quality gate is not judged this step")
        return None
