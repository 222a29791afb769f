"""REST routes for rollouts, OTA rollbacks of groups, and bundle lineage (under /api/v1).

Operator actions answer 202: the request is stored at once and applied by the fleet process
that holds the rollout's lease, at its next step (this process is woken to do it now).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, col, select

from fleet.db import SessionDep
from fleet.errors import NotFound
from fleet.models import Bundle, BundlePublic, Device
from fleet.rollout.service import (
    create_rollout,
    describe,
    get_rollout,
    phase_counts,
    request_action,
    rollback_devices,
)
from fleet.rollout.spec import RolloutCreate
from fleet.rollout.table import Rollout, RolloutDecision, RolloutDevice, RolloutRequest

__all__ = ["rollout_router"]

rollout_router = APIRouter(prefix="/api/v1", tags=["rollouts"])


class RolloutPublic(BaseModel):
    id: str
    bundle_sha256: str
    model_name: str
    model_version: int
    phase: str
    stage: int
    stages: int
    stage_percents: list[float | None]
    pause_kind: str
    reason: str
    device_count: int
    seed: int | None
    created_at: datetime
    updated_at: datetime
    bake_started_at: datetime | None
    revision: int
    #: devices per phase, over the rollout and per stage
    devices: dict[str, int] = Field(default_factory=dict)
    stage_devices: list[dict[str, int]] = Field(default_factory=list)


class DecisionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    stage: int
    outcome: str
    reason: str
    figures: dict[str, Any]
    revision: int
    at: datetime


class RequestPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    rollout_id: str
    action: str
    reason: str
    actor: str
    keep_devices: bool
    created_at: datetime
    applied_at: datetime | None


class RolloutDetail(RolloutPublic):
    plan: dict[str, Any]
    decisions: list[DecisionPublic]
    pending_requests: list[RequestPublic]


class RolloutDevicePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    device_id: str
    stage: int
    position: int
    phase: str
    previous_sha256: str | None
    attempt: int
    timeouts: int
    deadline: datetime | None
    command_id: str | None
    online: bool
    reported_sha256: str | None
    reason: str
    updated_at: datetime


class ActionBody(BaseModel):
    reason: str = Field(default="", max_length=512)
    #: abort only: leave devices on the new version instead of rolling them back
    keep_devices: bool = False


class GroupRollback(BaseModel):
    """Roll back devices outside any rollout: by ids, by tag or by group (exactly one)."""

    device_ids: list[str] | None = Field(default=None, min_length=1, max_length=100_000)
    tag: str | None = Field(default=None, min_length=1, max_length=64)
    group: str | None = Field(default=None, min_length=1, max_length=64)
    target_bundle_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    reason: str = Field(default="", max_length=512)


class QueuedCommand(BaseModel):
    command_id: str
    device_id: str
    kind: str
    bundle_sha256: str | None


class BundleLineage(BaseModel):
    bundle: BundlePublic
    #: the manifest's own lineage record (source model, compiler, parent...)
    lineage: dict[str, Any]
    #: every version of the same model and profile in the registry, oldest first
    versions: list[BundlePublic]
    running: int
    desired: int


class BundleDevice(BaseModel):
    id: str
    online: bool
    desired_bundle_sha256: str | None
    reported_bundle_sha256: str | None
    last_seen: datetime | None


def _actor(request: Request) -> str:
    try:
        from fleet.auth import actor_of
    except ImportError:  # the auth module is optional here
        return ""
    return actor_of(request)


def _audit(session: Session, request: Request, action: str, **kw: Any) -> None:
    try:
        from fleet.audit import record
    except ImportError:
        return
    record(session, _actor(request), action, **kw)


def _kick(request: Request) -> None:
    runner = getattr(request.app.state, "rollout_runner", None)
    if runner is not None:
        runner.kick()


def _public(session: Session, rollout: Rollout) -> dict[str, Any]:
    total, stages = phase_counts(session, rollout.id)
    return {**describe(rollout), "devices": total, "stage_devices": stages}


@rollout_router.post("/rollouts", response_model=RolloutPublic, status_code=201)
def post_rollout(body: RolloutCreate, request: Request, session: SessionDep) -> Any:
    """Create a staged rollout; refused (409/422) with nothing stored if anything is wrong."""
    actor = _actor(request)
    if actor and not body.created_by:
        body = body.model_copy(update={"created_by": actor})
    rollout = create_rollout(session, request.app.state.settings, request.app.state.trust, body)
    _audit(
        session,
        request,
        "rollout.create",
        after={"rollout_id": rollout.id, "devices": rollout.device_count},
        bundle_sha256=rollout.bundle_sha256,
        target=rollout.id,
    )
    session.commit()
    session.refresh(rollout)
    _kick(request)
    return _public(session, rollout)


@rollout_router.get("/rollouts", response_model=list[RolloutPublic])
def list_rollouts(
    session: SessionDep,
    active: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Any:
    """Rollouts, newest first."""
    from fleet.rollout.machine import ACTIVE_PHASES

    q = select(Rollout).order_by(col(Rollout.created_at).desc()).limit(limit)
    if active is not None:
        phases = [p.value for p in ACTIVE_PHASES]
        q = q.where(col(Rollout.phase).in_(phases) if active else col(Rollout.phase).not_in(phases))
    return [_public(session, r) for r in session.exec(q)]


@rollout_router.get("/rollouts/{rollout_id}", response_model=RolloutDetail)
def get_rollout_detail(rollout_id: str, session: SessionDep) -> Any:
    """One rollout: state, device counts, plan, decisions (newest first), pending requests."""
    rollout = get_rollout(session, rollout_id)
    decisions = session.exec(
        select(RolloutDecision)
        .where(RolloutDecision.rollout_id == rollout_id)
        .order_by(col(RolloutDecision.id).desc())
        .limit(200)
    ).all()
    pending = session.exec(
        select(RolloutRequest).where(
            RolloutRequest.rollout_id == rollout_id, col(RolloutRequest.applied_at).is_(None)
        )
    ).all()
    return {
        **_public(session, rollout),
        "plan": rollout.plan,
        "decisions": [DecisionPublic.model_validate(d) for d in decisions],
        "pending_requests": [RequestPublic.model_validate(r) for r in pending],
    }


@rollout_router.get("/rollouts/{rollout_id}/devices", response_model=list[RolloutDevicePublic])
def get_rollout_devices(
    rollout_id: str,
    session: SessionDep,
    phase: str | None = None,
    stage: int | None = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
) -> Any:
    """The rollout's device table, in deployment order."""
    get_rollout(session, rollout_id)
    q = (
        select(RolloutDevice)
        .where(RolloutDevice.rollout_id == rollout_id)
        .order_by(col(RolloutDevice.position))
        .limit(limit)
    )
    if phase is not None:
        q = q.where(RolloutDevice.phase == phase)
    if stage is not None:
        q = q.where(RolloutDevice.stage == stage)
    return session.exec(q).all()


@rollout_router.get("/rollouts/{rollout_id}/decisions", response_model=list[DecisionPublic])
def get_rollout_decisions(rollout_id: str, session: SessionDep) -> Any:
    """Every decision, oldest first, each with its figures."""
    get_rollout(session, rollout_id)
    return session.exec(
        select(RolloutDecision)
        .where(RolloutDecision.rollout_id == rollout_id)
        .order_by(col(RolloutDecision.id))
    ).all()


def _action(
    action: Literal["approve", "pause", "abort", "rollback"],
    rollout_id: str,
    request: Request,
    session: Session,
    body: ActionBody | None,
) -> Any:
    body = body or ActionBody()
    req = request_action(
        session,
        rollout_id,
        action,
        reason=body.reason,
        actor=_actor(request),
        keep_devices=body.keep_devices,
    )
    _audit(
        session,
        request,
        f"rollout.{action}",
        after={"request_id": req.id, "reason": body.reason, "keep_devices": body.keep_devices},
        target=rollout_id,
    )
    session.commit()
    session.refresh(req)
    _kick(request)
    return RequestPublic.model_validate(req)


@rollout_router.post(
    "/rollouts/{rollout_id}/approve", response_model=RequestPublic, status_code=202
)
def approve(
    rollout_id: str,
    request: Request,
    session: SessionDep,
    body: Annotated[ActionBody | None, Body()] = None,
) -> Any:
    """Continue a paused rollout (to the next stage, or where an operator paused it)."""
    return _action("approve", rollout_id, request, session, body)


@rollout_router.post("/rollouts/{rollout_id}/pause", response_model=RequestPublic, status_code=202)
def pause(
    rollout_id: str,
    request: Request,
    session: SessionDep,
    body: Annotated[ActionBody | None, Body()] = None,
) -> Any:
    """Hold the rollout where it is until approved."""
    return _action("pause", rollout_id, request, session, body)


@rollout_router.post("/rollouts/{rollout_id}/abort", response_model=RequestPublic, status_code=202)
def abort(
    rollout_id: str,
    request: Request,
    session: SessionDep,
    body: Annotated[ActionBody | None, Body()] = None,
) -> Any:
    """Stop: roll back every device that took the bundle (or keep them, keep_devices)."""
    return _action("abort", rollout_id, request, session, body)


@rollout_router.post(
    "/rollouts/{rollout_id}/rollback", response_model=RequestPublic, status_code=202
)
def rollback_rollout(
    rollout_id: str,
    request: Request,
    session: SessionDep,
    body: Annotated[ActionBody | None, Body()] = None,
) -> Any:
    """Roll back every device that took the bundle (also after the rollout completed)."""
    return _action("rollback", rollout_id, request, session, body)


@rollout_router.post("/rollbacks", response_model=list[QueuedCommand], status_code=202)
def post_rollbacks(body: GroupRollback, request: Request, session: SessionDep) -> Any:
    """OTA rollback of devices by ids, tag or group (outside rollouts); queued, then sent."""
    rows = rollback_devices(
        session,
        device_ids=body.device_ids,
        tag=body.tag,
        group=body.group,
        target_bundle_sha256=body.target_bundle_sha256,
        reason=body.reason,
    )
    _audit(
        session,
        request,
        "devices.rollback",
        after={"device_ids": [r.device_id for r in rows][:1000], "reason": body.reason},
        bundle_sha256=body.target_bundle_sha256,
        target=body.tag or body.group or ",".join(body.device_ids or [])[:256],
    )
    session.commit()
    _kick(request)
    return [
        QueuedCommand(
            command_id=r.id, device_id=r.device_id, kind=r.kind, bundle_sha256=r.bundle_sha256
        )
        for r in rows
    ]


@rollout_router.get("/bundles/{sha256}/lineage", response_model=BundleLineage)
def bundle_lineage(sha256: str, session: SessionDep) -> Any:
    """The bundle's lineage record, the model's other versions, and how many devices run it."""
    bundle = session.get(Bundle, sha256)
    if bundle is None:
        raise NotFound(f"bundle {sha256} is not in the registry")
    versions = session.exec(
        select(Bundle)
        .where(Bundle.model_name == bundle.model_name, Bundle.profile == bundle.profile)
        .order_by(col(Bundle.model_version), col(Bundle.uploaded_at))
    ).all()
    from sqlalchemy import func

    running = session.exec(
        select(func.count()).select_from(Device).where(Device.reported_bundle_sha256 == sha256)
    ).one()
    desired = session.exec(
        select(func.count()).select_from(Device).where(Device.desired_bundle_sha256 == sha256)
    ).one()
    return BundleLineage(
        bundle=BundlePublic.model_validate(bundle, from_attributes=True),
        lineage=dict(bundle.manifest.get("lineage") or {}),
        versions=[BundlePublic.model_validate(v, from_attributes=True) for v in versions],
        running=running,
        desired=desired,
    )


@rollout_router.get("/bundles/{sha256}/devices", response_model=list[BundleDevice])
def bundle_devices(
    sha256: str,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
) -> Any:
    """Devices that run this bundle, or should."""
    rows = session.exec(
        select(Device)
        .where(
            (col(Device.reported_bundle_sha256) == sha256)
            | (col(Device.desired_bundle_sha256) == sha256)
        )
        .order_by(col(Device.id))
        .limit(limit)
    ).all()
    return [
        BundleDevice(
            id=d.id,
            online=d.online,
            desired_bundle_sha256=d.desired_bundle_sha256,
            reported_bundle_sha256=d.reported_bundle_sha256,
            last_seen=d.last_seen,
        )
        for d in rows
    ]
