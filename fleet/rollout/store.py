"""Rows <-> machine state, the lease, and writing one transition in one transaction.

`save_transition` writes the changed device entries, the new outbox rows (commands), the
decisions, the applied operator requests and the rollout row together. The rollout row's
update is conditional on the revision read and on this process holding the lease, so a
process that lost its lease (paused, partitioned, slow) cannot write a stale step: its
transaction is rolled back and nothing it decided is sent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import and_, insert, or_, update
from sqlalchemy import select as sa_select
from sqlmodel import Session, col

from fleet.errors import FleetError
from fleet.models import Bundle, Device
from fleet.rollout.gate import CohortStats
from fleet.rollout.machine import (
    DeviceEntry,
    DevicePhase,
    RecordDecision,
    RolloutPhase,
    RolloutState,
    SendDeploy,
    SendRollback,
    Transition,
)
from fleet.rollout.spec import RolloutCreate
from fleet.rollout.table import CommandOutbox, Rollout, RolloutDecision, RolloutDevice
from fleet.settings import FleetSettings
from protocol.messages import DeployCommand, RollbackCommand, encode_message

__all__ = [
    "LeaseLost",
    "chunks",
    "claim_lease",
    "entry_of",
    "load_state",
    "release_lease",
    "save_transition",
]

log = logging.getLogger(__name__)

#: SQLite's bound-parameter limit is 32766 since 3.32; stay well below it
CHUNK = 900
T = TypeVar("T")


class LeaseLost(FleetError):
    """Another fleet process holds this rollout now; this step was not written."""

    status_code = 409
    code = "lease_lost"


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def claim_lease(
    session: Session, rollout_id: str, owner: str, now: datetime, lease_s: float
) -> bool:
    """Take (or extend) the rollout's lease if it is free, ours, or expired; commits."""
    result = session.execute(
        update(Rollout)
        .where(
            and_(
                col(Rollout.id) == rollout_id,
                or_(
                    col(Rollout.lease_owner).is_(None),
                    col(Rollout.lease_owner) == owner,
                    col(Rollout.lease_expires_at) < now,
                ),
            )
        )
        .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_s))
    )
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def release_lease(session: Session, rollout_id: str, owner: str) -> None:
    session.execute(
        update(Rollout)
        .where(and_(col(Rollout.id) == rollout_id, col(Rollout.lease_owner) == owner))
        .values(lease_owner=None, lease_expires_at=None)
    )
    session.commit()


def entry_of(row: Any) -> DeviceEntry:
    """A machine entry from a `RolloutDevice` (or a row with its columns)."""
    return DeviceEntry(
        device_id=row.device_id,
        stage=row.stage,
        position=row.position,
        phase=DevicePhase(row.phase),
        previous_sha256=row.previous_sha256,
        attempt=row.attempt,
        timeouts=row.timeouts,
        deadline=row.deadline,
        command_id=row.command_id,
        online=row.online,
        reported_sha256=row.reported_sha256,
        reported_failure=row.reported_failure,
        reason=row.reason,
    )


def _entry_values(e: DeviceEntry) -> dict[str, Any]:
    return {
        "phase": e.phase.value,
        "attempt": e.attempt,
        "timeouts": e.timeouts,
        "deadline": e.deadline,
        "command_id": e.command_id,
        "online": e.online,
        "reported_sha256": e.reported_sha256,
        "reported_failure": e.reported_failure,
        "reason": e.reason[:512],
    }


def load_state(session: Session, row: Rollout) -> RolloutState:
    """The machine state of one rollout, as stored."""
    table = RolloutDevice.__table__  # type: ignore[attr-defined]
    # plain rows, not ORM objects: 10,000 instances cost ~1 s of bookkeeping here
    entries = session.connection().execute(sa_select(table).where(table.c.rollout_id == row.id))
    return RolloutState(
        rollout_id=row.id,
        bundle_sha256=row.bundle_sha256,
        plan=RolloutCreate.model_validate(row.plan),
        phase=RolloutPhase(row.phase),
        stage=row.stage,
        stage_started_at=row.stage_started_at,
        bake_started_at=row.bake_started_at,
        pause_kind=row.pause_kind,
        reason=row.reason,
        rollback_started_at=row.rollback_started_at,
        rollback_final=RolloutPhase(row.rollback_final),
        last_control=CohortStats.from_json(row.last_control) if row.last_control else None,
        devices={e.device_id: entry_of(e) for e in entries},
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class SavedStep:
    revision: int
    commands: int
    decisions: int


def _command_row(
    state: RolloutState, action: SendDeploy | SendRollback, bundle: Bundle, settings: FleetSettings
) -> dict[str, Any]:
    command: DeployCommand | RollbackCommand
    if isinstance(action, SendDeploy):
        command = DeployCommand(
            device_id=action.device_id,
            command_id=action.command_id,
            # the message id follows the command id, so a re-send is the same message too
            message_id=action.command_id,
            bundle_sha256=bundle.sha256,
            bundle_size=bundle.size,
            bundle_url=settings.bundle_url(bundle.sha256),
            model_name=bundle.model_name,
            model_version=bundle.model_version,
            rollout_id=state.rollout_id,
            shadow=action.shadow,
        )
        kind, target = "deploy", bundle.sha256
    else:
        command = RollbackCommand(
            device_id=action.device_id,
            command_id=action.command_id,
            message_id=action.command_id,
            target_bundle_sha256=action.target_sha256,
            rollout_id=state.rollout_id,
            reason=f"rollout {state.rollout_id}: {state.reason}"[:512],
        )
        kind, target = "rollback", action.target_sha256
    return {
        "id": action.command_id,
        "rollout_id": state.rollout_id,
        "device_id": action.device_id,
        "kind": kind,
        "stage": action.stage,
        "attempt": action.attempt,
        "bundle_sha256": target,
        "payload": encode_message(command).decode(),
        "created_at": None,  # filled below
        "send_count": 0,
    }


def save_transition(
    session: Session,
    row: Rollout,
    transition: Transition,
    *,
    owner: str,
    now: datetime,
    settings: FleetSettings,
    applied_requests: Iterable[Any] = (),
    events_seen_at: datetime | None = None,
) -> SavedStep:
    """Write the transition (not committed); raises LeaseLost if the row moved on."""
    state = transition.state
    revision = row.revision + 1
    result = session.execute(
        update(Rollout)
        .where(
            and_(
                col(Rollout.id) == row.id,
                col(Rollout.revision) == row.revision,
                col(Rollout.lease_owner) == owner,
            )
        )
        .values(
            phase=state.phase.value,
            stage=state.stage,
            stage_started_at=state.stage_started_at,
            bake_started_at=state.bake_started_at,
            pause_kind=state.pause_kind,
            reason=state.reason,
            rollback_started_at=state.rollback_started_at,
            rollback_final=state.rollback_final.value,
            last_control=state.last_control.to_json() if state.last_control else None,
            updated_at=now,
            revision=revision,
            events_seen_at=events_seen_at if events_seen_at is not None else row.events_seen_at,
        )
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        raise LeaseLost(f"rollout {row.id} moved on (revision or lease); step not written")

    if transition.changed:
        values = []
        for device_id in transition.changed:
            e = state.devices[device_id]
            cols = {**_entry_values(e), "updated_at": now}
            values.append(
                {"b_rid": row.id, "b_did": device_id, **{f"v_{k}": v for k, v in cols.items()}}
            )
        table = RolloutDevice.__table__  # type: ignore[attr-defined]
        stmt = (
            update(table)
            .where(
                and_(
                    table.c.rollout_id == _bind("b_rid"),
                    table.c.device_id == _bind("b_did"),
                )
            )
            .values({k[2:]: _bind(k) for k in values[0] if k.startswith("v_")})
        )
        session.connection().execute(stmt, values)

    sends = [a for a in transition.actions if isinstance(a, SendDeploy | SendRollback)]
    if sends:
        bundle = session.get(Bundle, state.bundle_sha256)
        assert bundle is not None, "a rollout's bundle row is never deleted"
        rows = [_command_row(state, a, bundle, settings) for a in sends]
        for r in rows:
            r["created_at"] = now
        outbox = CommandOutbox.__table__  # type: ignore[attr-defined]
        for part in chunks(rows):
            session.connection().execute(insert(outbox), list(part))
        # desired state follows every command; the reconciler repairs from it later
        deploy_ids = [a.device_id for a in sends if isinstance(a, SendDeploy)]
        for part in chunks(deploy_ids):
            session.execute(
                update(Device)
                .where(col(Device.id).in_(part))
                .values(desired_bundle_sha256=state.bundle_sha256, desired_at=now)
                .execution_options(synchronize_session=False)
            )
        by_target: dict[str | None, list[str]] = {}
        for a in sends:
            if isinstance(a, SendRollback):
                by_target.setdefault(a.target_sha256, []).append(a.device_id)
        for target, ids in by_target.items():
            if target is not None and session.get(Bundle, target) is None:
                # desired state names registry bundles only; this one predates the registry
                target = None
            for part in chunks(ids):
                session.execute(
                    update(Device)
                    .where(col(Device.id).in_(part))
                    .values(desired_bundle_sha256=target, desired_at=now)
                    .execution_options(synchronize_session=False)
                )

    decisions = [a for a in transition.actions if isinstance(a, RecordDecision)]
    for d in decisions:
        session.add(
            RolloutDecision(
                rollout_id=row.id,
                stage=d.stage,
                outcome=d.outcome,
                reason=d.reason,
                figures=dict(d.figures),
                revision=revision,
                at=now,
            )
        )
    for req in applied_requests:
        req.applied_at = now
        session.add(req)
    return SavedStep(revision=revision, commands=len(sends), decisions=len(decisions))


def _bind(name: str) -> Any:
    from sqlalchemy import bindparam

    return bindparam(name)
