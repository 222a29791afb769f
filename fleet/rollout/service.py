"""Rollout operations behind the REST routes and the CLI: create, request, roll back, show.

Creation checks everything before writing anything (bundle known and still trusted, target
set non-empty, canary devices inside it, no device already in an active rollout) and then
writes the rollout, its device table and its first decision in one transaction.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import insert
from sqlmodel import Session, col, select

from fleet.errors import BundleRejected, Conflict, InvalidRequest, NotFound
from fleet.models import Bundle, Device, utcnow
from fleet.rollout.machine import ACTIVE_PHASES, RolloutPhase
from fleet.rollout.selection import Candidate, assign_stages
from fleet.rollout.spec import RolloutCreate
from fleet.rollout.store import chunks
from fleet.rollout.table import (
    CommandOutbox,
    Rollout,
    RolloutDecision,
    RolloutDevice,
    RolloutRequest,
)
from fleet.settings import FleetSettings
from protocol.bundle import BundleReader
from protocol.errors import ProtocolError
from protocol.messages import RollbackCommand, encode_message, new_id
from protocol.trust import TrustRoot

__all__ = [
    "ALLOWED",
    "create_rollout",
    "phase_counts",
    "request_action",
    "rollback_devices",
    "target_devices",
]

log = logging.getLogger(__name__)

Action = Literal["approve", "pause", "abort", "rollback"]

#: which phases accept which operator action (anything else is a 409)
ALLOWED: dict[str, frozenset[RolloutPhase]] = {
    "approve": frozenset({RolloutPhase.PAUSED}),
    "pause": frozenset({RolloutPhase.PENDING, RolloutPhase.DEPLOYING, RolloutPhase.BAKING}),
    "abort": frozenset(ACTIVE_PHASES - {RolloutPhase.ROLLING_BACK}),
    "rollback": frozenset((ACTIVE_PHASES - {RolloutPhase.ROLLING_BACK}) | {RolloutPhase.COMPLETED}),
}


def _selected(device: Device, bundle: Bundle) -> bool:
    selectors = bundle.manifest.get("device_selectors") or []
    if not selectors:
        return True
    mine = {device.id, *(f"tag:{t}" for t in device.tags or [])}
    return bool(mine.intersection(selectors))


def target_devices(session: Session, body: RolloutCreate, bundle: Bundle) -> list[Device]:
    """The devices the rollout may touch; raises for what cannot be right."""
    target = body.target
    if target.profile is not None and target.profile != bundle.profile:
        raise Conflict(
            f"bundle {bundle.sha256[:12]} is for profile {bundle.profile!r}; the target asks "
            f"for profile {target.profile!r}"
        )
    if target.device_ids is not None:
        ids = list(dict.fromkeys(target.device_ids))
        found: dict[str, Device] = {}
        for part in chunks(ids):
            found.update(
                (d.id, d) for d in session.exec(select(Device).where(col(Device.id).in_(part)))
            )
        missing = [i for i in ids if i not in found]
        if missing:
            raise InvalidRequest(
                f"unknown devices in the target: {missing[:20]}", extra={"device_ids": missing}
            )
        wrong = [i for i in ids if found[i].profile != bundle.profile]
        if wrong:
            raise Conflict(
                f"bundle {bundle.sha256[:12]} is for profile {bundle.profile!r}; these target "
                f"devices are not: {wrong[:20]}",
                extra={"device_ids": wrong},
            )
        devices = [found[i] for i in ids]
    else:
        devices = list(
            session.exec(
                select(Device).where(Device.profile == bundle.profile).order_by(col(Device.id))
            )
        )
    if target.group is not None:
        devices = [d for d in devices if target.group in (d.groups or [])]
    if target.tags:
        devices = [d for d in devices if set(target.tags) <= set(d.tags or [])]
    return [d for d in devices if _selected(d, bundle)]


def _verify_bundle(bundle: Bundle, trust: TrustRoot, bundle_dir: Path | None) -> None:
    """The trust root may have changed since upload: check the signature again, and expiry."""
    path = Path(bundle.path)
    if bundle_dir is not None and not path.is_file():
        path = bundle_dir / f"{bundle.sha256}.efb"
    if not path.is_file():
        raise InvalidRequest(f"bundle {bundle.sha256} is registered but its file is missing")
    try:
        BundleReader(path).verify(trust)
    except ProtocolError as exc:
        raise BundleRejected(
            f"bundle {bundle.sha256[:12]} no longer verifies against the trust root: {exc}",
            extra={"reason": exc.code},
        ) from exc


def create_rollout(
    session: Session,
    settings: FleetSettings,
    trust: TrustRoot,
    body: RolloutCreate,
    *,
    now: datetime | None = None,
) -> Rollout:
    """Validate and store a new rollout (phase pending); the runner starts it."""
    now = now or utcnow()
    bundle = session.get(Bundle, body.bundle_sha256)
    if bundle is None:
        raise InvalidRequest(f"bundle {body.bundle_sha256} is not in the registry; upload it first")
    _verify_bundle(bundle, trust, settings.bundle_dir)
    devices = target_devices(session, body, bundle)
    if not devices:
        raise InvalidRequest(
            "the target set is empty: no registered device matches "
            f"{body.target.model_dump(exclude_none=True, exclude_defaults=True) or 'the bundle'}"
            f" with profile {bundle.profile!r}"
        )
    in_target = {d.id for d in devices}
    for i, stage in enumerate(body.stages):
        outside = [d for d in stage.devices if d not in in_target]
        if outside:
            raise InvalidRequest(f"stage {i} names devices outside the target set: {outside[:20]}")
    busy: list[tuple[str, str]] = []
    active = [p.value for p in ACTIVE_PHASES]
    for part in chunks(sorted(in_target)):
        busy.extend(
            session.exec(
                select(RolloutDevice.device_id, RolloutDevice.rollout_id)
                .join(Rollout, col(Rollout.id) == col(RolloutDevice.rollout_id))
                .where(col(RolloutDevice.device_id).in_(part), col(Rollout.phase).in_(active))
            )
        )
    if busy:
        rollouts = sorted({r for _, r in busy})
        raise Conflict(
            f"{len(busy)} target devices are already in an active rollout ({', '.join(rollouts)}); "
            "finish, abort or narrow it first",
            extra={"device_ids": sorted(d for d, _ in busy)[:100], "rollout_ids": rollouts},
        )
    seed = body.seed if body.seed is not None else secrets.randbits(62)
    plan = body.model_copy(update={"seed": seed})
    assignment = assign_stages(
        [Candidate(device_id=d.id, tags=tuple(d.tags or ())) for d in devices],
        plan.stages,
        seed=seed,
        spread_by_tag=plan.spread_by_tag,
    )
    by_id = {d.id: d for d in devices}
    rollout = Rollout(
        id=new_id(),
        bundle_sha256=bundle.sha256,
        model_name=bundle.model_name,
        model_version=bundle.model_version,
        plan=plan.model_dump(mode="json"),
        phase=RolloutPhase.PENDING.value,
        device_count=len(assignment),
        created_at=now,
        updated_at=now,
    )
    session.add(rollout)
    session.flush()
    rows = [
        {
            "rollout_id": rollout.id,
            "device_id": device_id,
            "stage": stage,
            "position": position,
            "phase": "planned",
            "previous_sha256": by_id[device_id].reported_bundle_sha256,
            "updated_at": now,
        }
        for position, (device_id, stage) in enumerate(assignment)
    ]
    for part in chunks(rows):
        session.execute(insert(RolloutDevice), list(part))
    per_stage = Counter(stage for _, stage in assignment)
    session.add(
        RolloutDecision(
            rollout_id=rollout.id,
            stage=-1,
            outcome="created",
            reason=f"{len(assignment)} devices in {len(plan.stages)} stages"
            + (f" by {plan.created_by}" if plan.created_by else ""),
            figures={
                "seed": seed,
                "stage_devices": [per_stage[i] for i in range(len(plan.stages))],
            },
            revision=0,
            at=now,
        )
    )
    return rollout


def get_rollout(session: Session, rollout_id: str) -> Rollout:
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFound(f"rollout {rollout_id!r} does not exist")
    return rollout


def request_action(
    session: Session,
    rollout_id: str,
    action: Action,
    *,
    reason: str = "",
    actor: str = "",
    keep_devices: bool = False,
) -> RolloutRequest:
    """Queue an operator's request; the process holding the rollout's lease applies it."""
    rollout = get_rollout(session, rollout_id)
    phase = RolloutPhase(rollout.phase)
    if phase not in ALLOWED[action]:
        raise Conflict(
            f"cannot {action} rollout {rollout_id}: it is {phase.value}"
            + (f" ({rollout.reason})" if rollout.reason else ""),
            extra={"phase": phase.value},
        )
    request = RolloutRequest(
        id=new_id(),
        rollout_id=rollout_id,
        action=action,
        reason=reason,
        actor=actor,
        keep_devices=keep_devices,
    )
    session.add(request)
    return request


def rollback_devices(
    session: Session,
    *,
    device_ids: list[str] | None = None,
    tag: str | None = None,
    group: str | None = None,
    target_bundle_sha256: str | None = None,
    reason: str = "",
    now: datetime | None = None,
) -> list[CommandOutbox]:
    """Queue a RollbackCommand for each chosen device (by ids, tag or group) in the outbox."""
    now = now or utcnow()
    if sum(x is not None for x in (device_ids, tag, group)) != 1:
        raise InvalidRequest("give exactly one of device_ids, tag or group")
    if device_ids is not None:
        ids = list(dict.fromkeys(device_ids))
        devices = []
        for part in chunks(ids):
            devices.extend(session.exec(select(Device).where(col(Device.id).in_(part))))
        missing = sorted(set(ids) - {d.id for d in devices})
        if missing:
            raise NotFound(f"unknown devices: {missing[:20]}", extra={"device_ids": missing})
    else:
        every = session.exec(select(Device).order_by(col(Device.id))).all()
        if tag is not None:
            devices = [d for d in every if tag in (d.tags or [])]
        else:
            devices = [d for d in every if group in (d.groups or [])]
        if not devices:
            raise InvalidRequest(
                f"no device carries {'tag' if tag is not None else 'group'} {tag or group!r}"
            )
    known_target = (
        target_bundle_sha256 is not None and session.get(Bundle, target_bundle_sha256) is not None
    )
    rows = []
    for device in devices:
        command = RollbackCommand(
            device_id=device.id, target_bundle_sha256=target_bundle_sha256, reason=reason
        )
        row = CommandOutbox(
            id=command.command_id,
            device_id=device.id,
            kind="rollback",
            bundle_sha256=target_bundle_sha256,
            payload=encode_message(command).decode(),
            created_at=now,
        )
        # desired state names registry bundles only (None: "what it ran before")
        device.desired_bundle_sha256 = target_bundle_sha256 if known_target else None
        device.desired_at = now
        session.add(device)
        session.add(row)
        rows.append(row)
    return rows


def phase_counts(session: Session, rollout_id: str) -> tuple[dict[str, int], list[dict[str, int]]]:
    """Device phases over the whole rollout, and per stage."""
    rows = session.exec(
        select(RolloutDevice.stage, RolloutDevice.phase).where(
            RolloutDevice.rollout_id == rollout_id
        )
    ).all()
    total: Counter[str] = Counter()
    per_stage: dict[int, Counter[str]] = {}
    for stage, phase in rows:
        total[phase] += 1
        per_stage.setdefault(stage, Counter())[phase] += 1
    stages = [dict(per_stage.get(i, Counter())) for i in range(max(per_stage, default=-1) + 1)]
    return dict(total), stages


def describe(rollout: Rollout) -> dict[str, Any]:
    """The public summary of one rollout row."""
    plan = rollout.plan
    return {
        "id": rollout.id,
        "bundle_sha256": rollout.bundle_sha256,
        "model_name": rollout.model_name,
        "model_version": rollout.model_version,
        "phase": rollout.phase,
        "stage": rollout.stage,
        "stages": len(plan.get("stages", [])),
        "stage_percents": [s.get("percent") for s in plan.get("stages", [])],
        "pause_kind": rollout.pause_kind,
        "reason": rollout.reason,
        "device_count": rollout.device_count,
        "seed": plan.get("seed"),
        "created_at": rollout.created_at,
        "updated_at": rollout.updated_at,
        "bake_started_at": rollout.bake_started_at,
        "revision": rollout.revision,
    }
